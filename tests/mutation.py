"""Mutation testing: does the suite notice a small deliberate bug in a module?

    python -m tests.mutation moshi_jax/lm/delays.py [more modules...] [--budget-min 20] [--list]

For each one-line mutant of the module (flip a comparison, off-by-one on a constant, swap an operator, negate a
condition, drop a cast, turn a `raise` into `pass`, ...) the tests that reach the module run in a temporary copy
of the tree with the mutant in place. A mutant is *killed* when a test fails (or the run exceeds its per-mutant
time limit: an endless loop is a caught bug), *survives* when every test passes. Survivors are printed with
file:line and the mutation: each is either a missing test or an equivalent mutant (one that cannot change what a
user sees), and the README's testing section lists the known equivalent ones.

Which tests run, cheapest first (a mutant is killed at the first tier that fails, with pytest -x):
  1. the module's own tests: the files listed for it in `FOCUSED_TESTS` (modules without a test file of their
     own, or whose own file is slow next to a focused one), else tests/<pkg>/test_<name>.py (the layout mirror);
  2. every other test file that imports the module by name (`moshi_jax.x.y` / `from moshi_jax.x import y`);
  3. the files given with --tests (e.g. a test that reaches the module only through another one).

Lines marked `# pragma: no mutate` are skipped, so are docstrings, annotations and f-string/error-message text.
This is a developer command (minutes per module on CPU), not part of CI.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_SKIP_COPY = {".git", ".venv", ".venv-tpu", ".venv-ci", "__pycache__", ".pytest_cache", ".ruff_cache", "runs"}

_COMPARE_SWAP = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
}
_BINOP_SWAP = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd,
    ast.LShift: ast.RShift, ast.RShift: ast.LShift, ast.MatMult: ast.Mult,
}
# Modules whose "own tests" are not (only) tests/<pkg>/test_<name>.py: the smallest set of tests that exercises
# the whole module, as pytest arguments (files, `-k` selections). The building blocks of one transformer stack
# are pinned together against the reference stack; matmul's CPU path choice lives in backend's tests.
_STACK_PARITY = "tests/nn/test_transformer_parity.py"
FOCUSED_TESTS: dict[str, list[str]] = {
    "moshi_jax/nn/attention.py": [_STACK_PARITY, "tests/nn/test_attention.py", "-k",
                                  "one_shot or streaming or test_attention"],
    "moshi_jax/nn/mlp.py": [_STACK_PARITY, "-k", "one_shot or mlp"],
    "moshi_jax/nn/norms.py": [_STACK_PARITY, "-k", "norm"],
    "moshi_jax/nn/rope.py": [_STACK_PARITY, "-k", "one_shot or streaming"],
    "moshi_jax/nn/transformer.py": ["tests/nn/test_transformer_parity.py", "tests/nn/test_streaming_transformer.py"],
    "moshi_jax/nn/matmul.py": ["tests/nn/test_matmul.py", "tests/nn/test_backend.py"],
    "moshi_jax/nn/kv_cache.py": ["tests/nn/test_kv_cache.py", "tests/nn/test_kv_cache_int8.py"],
    "moshi_jax/nn/sampling.py": ["tests/nn/test_sampling.py", "tests/nn/test_sampling_items.py"],
    "moshi_jax/lm/model.py": ["tests/lm/test_model_parity.py", "tests/lm/test_model_init.py",
                              "tests/lm/test_model_streaming.py"],
    "moshi_jax/lm/generate.py": ["tests/lm/test_generate.py", "tests/lm/test_generate_items.py"],
    "moshi_jax/lm/checkpoint.py": ["tests/lm/test_checkpoint.py", "tests/lm/test_checkpoint_finite.py"],
}

_CAST_METHODS = {"astype"}  # x.astype(t) -> x
_CAST_FUNCS = {"int", "float", "bool", "abs", "list", "tuple", "stop_gradient"}  # f(x) -> x


@dataclasses.dataclass
class Mutant:
    path: str  # relative to ROOT
    line: int
    original: str
    mutated: str
    source: str  # the whole mutated module

    def label(self) -> str:
        return f"{self.path}:{self.line}: {self.original}  ->  {self.mutated}"


def _const_mutations(value) -> list:
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1]
    if isinstance(value, float):
        return [value + 1.0] if value == 0.0 else [value * 2]
    return []


def _node_mutations(node: ast.AST) -> Iterator[tuple[ast.AST, str]]:
    """(replacement node, short description) for one node; the replacement takes the node's place."""
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            new = _COMPARE_SWAP.get(type(op))
            if new:
                n = copy.deepcopy(node)
                n.ops[i] = new()
                yield n, ""
    elif isinstance(node, ast.BinOp):
        new = _BINOP_SWAP.get(type(node.op))
        if new:
            n = copy.deepcopy(node)
            n.op = new()
            yield n, ""
        if isinstance(node.op, ast.Add | ast.Sub):  # a - b -> a, a + b -> a (a dropped term)
            yield copy.deepcopy(node.left), "dropped term"
    elif isinstance(node, ast.BoolOp):
        n = copy.deepcopy(node)
        n.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        yield n, ""
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub | ast.Invert):
        if isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            for v in _const_mutations(-node.operand.value):
                yield ast.Constant(v), ""
        else:
            yield copy.deepcopy(node.operand), "dropped unary"
    elif isinstance(node, ast.Constant) and not isinstance(node.value, str | bytes) and node.value is not None:
        for v in _const_mutations(node.value):
            yield ast.Constant(v), ""
    elif isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in _CAST_METHODS and not node.keywords:
            yield copy.deepcopy(f.value), "dropped cast"
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
        if name in _CAST_FUNCS and len(node.args) == 1 and not node.keywords:
            yield copy.deepcopy(node.args[0]), "dropped call"
        if name in {"min", "max", "minimum", "maximum"}:
            n = copy.deepcopy(node)
            swap = {"min": "max", "max": "min", "minimum": "maximum", "maximum": "minimum"}[name]
            if isinstance(n.func, ast.Attribute):
                n.func.attr = swap
            else:
                n.func.id = swap
            yield n, ""
    elif isinstance(node, ast.If | ast.While | ast.IfExp) and not isinstance(node.test, ast.Compare):
        yield ("test", ast.UnaryOp(ast.Not(), copy.deepcopy(node.test))), "negated condition"
    elif isinstance(node, ast.Raise):
        yield ast.Pass(), "raise -> pass"
    elif isinstance(node, ast.AugAssign):
        new = _BINOP_SWAP.get(type(node.op))
        if new:
            n = copy.deepcopy(node)
            n.op = new()
            yield n, ""


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes never to mutate inside: docstrings, annotations, f-strings, decorators, `__all__`, asserts."""
    skip: set[int] = set()

    def mark(n):
        for sub in ast.walk(n):
            skip.add(id(sub))

    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            mark(first)
        if isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        if isinstance(node, ast.arg) and node.annotation is not None:
            mark(node.annotation)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.returns is not None:
                mark(node.returns)
            for d in node.decorator_list:
                mark(d)
        if isinstance(node, ast.JoinedStr | ast.Import | ast.ImportFrom | ast.Assert):
            mark(node)
        if isinstance(node, ast.Raise) and node.exc is not None:
            mark(node.exc)  # the exception's message; the raise itself is still mutated
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            mark(node)
    return skip


def _offsets(text: str) -> list[int]:
    starts, pos = [0], 0
    for line in text.splitlines(keepends=True):
        pos += len(line)
        starts.append(pos)
    return starts


def mutants_of(path: Path) -> list[Mutant]:
    text = path.read_text()
    tree = ast.parse(text)
    lines = text.splitlines()
    line_start = _offsets(text)
    skip = _skipped_nodes(tree)
    rel = str(path.resolve().relative_to(ROOT))
    out: list[Mutant] = []
    seen: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip or not hasattr(node, "lineno"):
            continue
        if "pragma: no mutate" in lines[node.lineno - 1]:
            continue
        for repl, what in _node_mutations(node):
            target = node
            if isinstance(repl, tuple):  # ("test", expr): replace the condition of an if / while / ternary
                target, repl = node.test, repl[1]
            if target.lineno is None or target.end_lineno is None:
                continue
            # col offsets are UTF-8 byte offsets; map them to character offsets on their lines
            a = line_start[target.lineno - 1] + len(
                lines[target.lineno - 1].encode()[: target.col_offset].decode(errors="ignore"))
            b = line_start[target.end_lineno - 1] + len(
                lines[target.end_lineno - 1].encode()[: target.end_col_offset].decode(errors="ignore"))
            original = text[a:b]
            new = ast.unparse(repl)
            if isinstance(target, ast.expr):
                new = f"({new})"
            source = text[:a] + new + text[b:]
            try:
                ast.parse(source)
            except SyntaxError:
                continue
            if source in seen or source == text:
                continue
            seen.add(source)
            short = " ".join(original.split())
            if len(short) > 70:
                short = short[:67] + "..."
            out.append(Mutant(rel, target.lineno, short, new + (f"  [{what}]" if what else ""), source))
    out.sort(key=lambda m: m.line)
    return out


def tests_for(module: Path, extra: list[str]) -> list[list[str]]:
    """Test-file tiers for a module (see the module docstring)."""
    rel = module.resolve().relative_to(ROOT)
    dotted = ".".join(rel.with_suffix("").parts)
    pkg, name = dotted.rsplit(".", 1)
    own = ROOT / "tests" / Path(*rel.parts[1:-1]) / f"test_{name}.py"
    focused = FOCUSED_TESTS.get(str(rel))
    if focused:
        tiers = [focused]
    else:
        tiers = [[str(own.relative_to(ROOT))]] if own.is_file() else []
    first = {ROOT / f for f in tiers[0] if f.endswith(".py")} if tiers else set()
    pattern = re.compile(rf"\b{re.escape(dotted)}\b|from {re.escape(pkg)} import [^\n]*\b{re.escape(name)}\b")
    users = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                   if p not in first and pattern.search(p.read_text()))
    if users:
        tiers.append(users)
    if extra:
        tiers.append(extra)
    return tiers


class _Runner:
    """Runs pytest on test files of the temporary tree, one fresh process per run.

    By default the processes are forked from this one after it imported the heavy third-party packages (jax,
    numpy, torch, pytest; never moshi_jax, and no jax backend is started), so a run does not pay their import
    time again; jax's persistent compilation cache (in the temporary tree) is shared by the runs. `--spawn`
    starts each run as a plain `python -m pytest` instead."""

    def __init__(self, tree: Path, fork: bool):
        self.tree = tree
        self.fork = fork and hasattr(os, "fork")
        self.cache = tree / ".jax-cache"
        if self.fork:
            os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
            import importlib

            for name in ("numpy", "jax", "jax.numpy", "flax", "optax", "chex", "pytest", "torch", "moshi"):
                try:
                    importlib.import_module(name)
                except Exception:  # noqa: BLE001 - optional packages
                    pass

    def run(self, files: list[str], timeout: float) -> tuple[str, float]:
        t0 = time.monotonic()
        args = ["-x", "-q", "-p", "no:cacheprovider", "--no-header", "-rN", *files]
        if not self.fork:
            env = dict(os.environ, PYTHONPATH=str(self.tree), PYTHONDONTWRITEBYTECODE="1")
            try:
                r = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=self.tree, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
            except subprocess.TimeoutExpired:
                return "timeout", time.monotonic() - t0
            rc = r.returncode
        else:
            pid = os.fork()
            if pid == 0:  # child: run pytest on the tree, exit with its status
                rc = 3
                try:
                    os.chdir(self.tree)
                    fd = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                    sys.path.insert(0, str(self.tree))
                    sys.dont_write_bytecode = True
                    os.environ["PYTHONPATH"] = str(self.tree)
                    import jax
                    import pytest

                    jax.config.update("jax_compilation_cache_dir", str(self.cache))
                    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
                    rc = int(pytest.main(args))
                finally:
                    os._exit(rc)
            # block until the child exits or the time limit passes (its pidfd turns readable when it exits)
            pidfd = os.pidfd_open(pid)
            try:
                exited, _, _ = select.select([pidfd], [], [], timeout)
            finally:
                os.close(pidfd)
            if not exited:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                return "timeout", time.monotonic() - t0
            rc = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        dt = time.monotonic() - t0
        if rc in (0, 5):  # passed / no tests collected
            return "passed", dt
        if rc == 1:
            return "failed", dt
        return f"error (pytest exit {rc})", dt


def _copy_tree(dst: Path) -> None:
    for item in ROOT.iterdir():
        if item.name in _SKIP_COPY or item.name.startswith(".venv"):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, ignore=shutil.ignore_patterns(*_SKIP_COPY))
        else:
            shutil.copy2(item, dst / item.name)


def run_module(module: Path, extra: list[str], deadline: float, per_mutant_factor: float, list_only: bool,
               log, fork: bool = True, own_only: bool = False, lines: set[int] | None = None,
               shuffle: int | None = None, skip: int = 0) -> dict:
    mutants = [m for m in mutants_of(module) if not lines or m.line in lines]
    if shuffle is not None:  # a run cut short by the time budget is then a random sample of the mutants
        import random

        random.Random(shuffle).shuffle(mutants)
    skipped, mutants = mutants[:skip], mutants[skip:]  # already run by an earlier, cut-short run
    tiers = tests_for(module, extra)
    if own_only:
        tiers = tiers[:1] + ([extra] if extra else [])
    log(f"\n== {module.relative_to(ROOT)}: {len(mutants)} mutants"
        + (f" (the first {len(skipped)} skipped)" if skipped else "") + "; tests: "
        + " | ".join(" ".join(t) for t in tiers))
    if list_only:
        for m in mutants:
            log("   " + m.label())
        return {"module": str(module.relative_to(ROOT)), "mutants": len(mutants)}
    if not tiers:
        log("   no tests reach this module")
        return {"module": str(module.relative_to(ROOT)), "mutants": len(mutants), "killed": 0,
                "survived": [m.label() for m in mutants], "not_run": 0}
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        target = tree / module.relative_to(ROOT)
        original = target.read_text()
        runner = _Runner(tree, fork)
        # Baseline: the tests must pass on the unmutated tree; their time sets each tier's limit.
        limits = []
        for files in tiers:
            status, dt = runner.run(files, timeout=1800)
            if status != "passed":
                raise SystemExit(f"baseline tests fail on the unmutated tree ({' '.join(files)}): {status}")
            limits.append(max(30.0, per_mutant_factor * dt))
            log(f"   baseline {dt:5.1f} s  {' '.join(files)}")
        killed, survived, not_run = 0, [], 0
        try:
            for i, m in enumerate(mutants):
                if time.monotonic() > deadline or _STOP:
                    not_run = len(mutants) - i
                    log(f"   time budget spent: {not_run} mutants not run")
                    break
                target.write_text(m.source)
                verdict = "survived"
                for files, limit in zip(tiers, limits, strict=True):
                    status, _ = runner.run(files, limit)
                    if status in ("failed", "timeout") or status.startswith("error"):
                        verdict = "killed" if status == "failed" else status.split("\n")[0]
                        break
                if verdict == "survived":
                    survived.append(m.label())
                    log(f"   SURVIVED {m.label()}")
                else:
                    killed += 1
                    log(f"   [{i + 1}/{len(mutants)}] {verdict}: {m.label()}", verbose=True)
        finally:
            target.write_text(original)
    run = killed + len(survived)
    score = 100.0 * killed / run if run else 100.0
    log(f"   {module.relative_to(ROOT)}: {run} mutants run, {killed} killed, {len(survived)} survived, "
        f"score {score:.1f}%" + (f", {not_run} not run" if not_run else ""))
    return {"module": str(module.relative_to(ROOT)), "mutants": len(mutants), "killed": killed,
            "survived": survived, "not_run": not_run, "skipped": len(skipped), "score": score}


_STOP: list[int] = []  # set by SIGTERM: finish the running mutant, then report as if the budget were spent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.mutation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Survivors are printed as file:line: original -> mutant.")
    p.add_argument("modules", nargs="+", help="module files (or directories: every .py in them)")
    p.add_argument("--tests", nargs="*", default=[], help="extra test files, run last (a third tier)")
    p.add_argument("--budget-min", type=float, default=30.0, help="total time budget in minutes (default 30)")
    p.add_argument("--timeout-factor", type=float, default=3.0,
                   help="a mutant's tier is killed after this many times the tier's baseline time (min 30 s)")
    p.add_argument("--list", action="store_true", help="only list the mutants")
    p.add_argument("-v", "--verbose", action="store_true", help="also print every killed mutant")
    p.add_argument("--own-only", action="store_true",
                   help="only the module's own tests (FOCUSED_TESTS or its test file; and --tests), not every "
                        "test file importing it")
    p.add_argument("--lines", help="only the mutants on these lines, e.g. 28,50 (to re-check survivors)")
    p.add_argument("--shuffle", type=int, metavar="SEED",
                   help="run the mutants in a random order, so that a run cut by --budget-min is a random sample")
    p.add_argument("--skip", type=int, default=0, metavar="N",
                   help="skip the first N mutants (of the --shuffle order): continue a run cut by its budget")
    p.add_argument("--spawn", action="store_true", help="start every run as a new python (no fork)")
    p.add_argument("--report", help="write the results as JSON to this file")
    args = p.parse_args(argv)

    def log(msg, verbose=False):
        if verbose and not args.verbose:
            return
        print(msg, flush=True)

    modules: list[Path] = []
    for m in args.modules:
        path = (Path.cwd() / m).resolve()
        if path.is_dir():
            modules += sorted(q for q in path.rglob("*.py") if q.name != "__init__.py")
        elif path.is_file():
            modules.append(path)
        else:
            p.error(f"no such module: {m}")
    deadline = time.monotonic() + 60 * args.budget_min
    import signal

    previous_handler = signal.signal(signal.SIGTERM, lambda *_: _STOP.append(1))
    lines = {int(x) for x in args.lines.split(",")} if args.lines else None
    try:
        results = [run_module(m, args.tests, deadline, args.timeout_factor, args.list, log, not args.spawn,
                              args.own_only, lines, args.shuffle, args.skip) for m in modules]
    finally:  # a caller (e.g. the tool's own tests, inside pytest) keeps its own SIGTERM handling
        signal.signal(signal.SIGTERM, previous_handler)
    if not args.list:
        log("\n== summary")
        for r in results:
            n = r["killed"] + len(r["survived"])
            log(f"   {r['module']:45s} {n:4d} run {r['killed']:4d} killed {len(r['survived']):3d} survived"
                + (f"  {100 * r['killed'] / n:5.1f}%" if n else "")
                + (f"  ({r['not_run']} not run)" if r["not_run"] else ""))
    if args.report:
        import json

        Path(args.report).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
