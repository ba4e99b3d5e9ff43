"""Ahead-of-time compile of the LM train step for a TPU slice, on a machine without TPUs (libtpu compile-only).

    python -m train.tpu_aot setup                         # create .venv-tpu: libtpu only (~700 MB, ~15 s)
    python -m train.tpu_aot compile tiny --topology v5e:2x2 [key=value ...]      # runs inside .venv-tpu
    python -m train.tpu_aot compile 7b --topology v5p:2x2x2 --mesh 1,8,1 --json out.json

libtpu must not live in the main environment (on a CPU machine it would make jax probe for TPUs), so `setup`
creates a separate venv holding only the libtpu wheel pinned by jax's own `tpu` extra, plus a `.pth` file
that puts the main environment's packages (jax, flax, optax, ...) after it on `sys.path`. `compile` re-executes
itself with that venv's Python when it is not already running there, builds a mesh of the topology's devices
(`jax.experimental.topologies.get_topology_desc`), lowers and compiles the sharded, donated train step from
abstract shapes only (no parameter is allocated) and prints XLA's per-device memory analysis and FLOPs as JSON.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = REPO / ".venv-tpu"
VENV_ENV_VAR = "MOSHI_JAX_TPU_VENV"


def venv_path() -> Path:
    return Path(os.environ.get(VENV_ENV_VAR) or DEFAULT_VENV)


def venv_python(venv: Path | None = None) -> Path:
    return (venv or venv_path()) / "bin" / "python"


def libtpu_requirement() -> str:
    """The libtpu pin of the installed jax's `tpu` extra (e.g. 'libtpu==0.0.42.*')."""
    for req in importlib.metadata.requires("jax") or []:
        if req.startswith("libtpu") and "extra == \"tpu\"" in req:
            return req.split(";")[0].replace(" ", "")
    raise RuntimeError("the installed jax declares no libtpu version in its `tpu` extra")


def venv_is_ready(venv: Path | None = None) -> tuple[bool, str]:
    """(ready, reason): the venv exists and its Python can import libtpu and jax."""
    py = venv_python(venv)
    if not py.exists():
        return False, f"no TPU compile venv at {py.parent.parent} (create it: python -m train.tpu_aot setup)"
    probe = subprocess.run([str(py), "-c", "import libtpu, jax; print(jax.__version__)"], capture_output=True,
                           text=True, timeout=120)
    if probe.returncode:
        return False, f"{py} cannot import libtpu + jax: {probe.stderr.strip()[-300:]}"
    return True, probe.stdout.strip()


def setup(venv: Path | None = None) -> Path:
    """Create the libtpu-only venv layered over the current environment."""
    venv = venv or venv_path()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv_python(venv)), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    req = libtpu_requirement()
    # pip of the current environment installs into the new venv's site-packages (--target), no deps: jax,
    # jaxlib etc. come from the base environment through the .pth file below.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(site),
                    req], check=True)
    base = sysconfig.get_paths()["purelib"]
    # addsitedir (not a plain path line) so the base environment's own .pth files (editable installs) apply too.
    (site / "zz_moshi_jax_base_env.pth").write_text(f"import site; site.addsitedir({base!r})\n")
    ok, why = venv_is_ready(venv)
    if not ok:
        raise RuntimeError(why)
    print(f"created {venv} ({req}, over {base}) in {time.perf_counter() - t0:.1f}s")
    return venv


# ----------------------------------------------------------------------------------------------- compile


def _topology_mesh(topology: str, mesh_shape: tuple[int, ...] | None):
    import jax
    from jax.experimental import topologies

    from moshi_jax.training import mesh as mesh_lib

    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    devices = list(topo.devices)
    shape = mesh_shape or (1, -1, 1)
    del jax
    return mesh_lib.make_mesh(shape, devices), devices[0].device_kind


def compile_lm(config: str, overrides: list[str], topology: str, mesh_shape: tuple[int, ...] | None = None,
               batch_size: int | None = None) -> dict:
    """Lower + compile `config`'s LM train step for `topology`; returns sizes, memory (bytes per device) and
    FLOPs. `batch_size` (default: the config's) is the global batch."""
    import jax

    from moshi_jax.training import config as config_lib
    from moshi_jax.training import mesh as mesh_lib
    from moshi_jax.training.optimizer import make_optimizer, make_schedule
    from moshi_jax.training.step import aot_compile_step
    from moshi_jax.training.train_state import build_state_spec, count_params
    from train.train_lm import lm_program

    cfg = config_lib.load_config(config, overrides)
    if batch_size is not None:
        cfg = config_lib.apply_overrides(cfg, [f"data.batch_size={batch_size}"])
    lm_cfg = config_lib.build_lm_config(cfg)
    mesh, kind = _topology_mesh(topology, mesh_shape)
    rules = cfg.mesh.rules if cfg.mesh.rules is not None else mesh_lib.LOGICAL_AXIS_RULES
    program = lm_program(cfg, lm_cfg)
    tx = make_optimizer(cfg.optimizer, cfg.steps)
    B, T = cfg.data.batch_size, cfg.data.seq_frames
    batch_sh = program.batch_shardings(mesh)
    shapes = {"codes": ((B, 1 + lm_cfg.n_q, T), "int32")}
    res = aot_compile_step(program.task, tx, make_schedule(cfg.optimizer, cfg.steps), mesh, rules, shapes,
                           batch_sh, lora=cfg.lora, microbatches=cfg.optimizer.microbatches,
                           compute_dtype=cfg.compute_dtype)
    spec = build_state_spec(program.task, tx, mesh, rules, cfg.lora)
    state_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(spec.abstract_state))
    frozen_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(spec.abstract_frozen))
    mem = res.memory
    per_device = mem.get("argument_size_in_bytes", 0) + mem.get("output_size_in_bytes", 0) \
        - mem.get("alias_size_in_bytes", 0) + mem.get("temp_size_in_bytes", 0)
    return {
        "config": config, "overrides": overrides, "topology": topology, "device_kind": kind,
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "batch": [B, 1 + lm_cfg.n_q, T],
        "compute_dtype": cfg.compute_dtype, "remat": cfg.remat, "lora": cfg.lora.enabled,
        "microbatches": cfg.optimizer.microbatches,
        "params": count_params(spec.abstract_params), "trainable_params": count_params(spec.abstract_state.params),
        "train_state_bytes_total": state_bytes, "frozen_bytes_total": frozen_bytes,
        "flops_per_device_step": res.flops, "model_flops_per_step": program.flops_per_step,
        "compile_seconds": res.compile_seconds, "num_devices": res.num_devices,
        "peak_bytes_per_device_estimate": per_device, **mem,
    }


def compile_codec(config: str, overrides: list[str], topology: str, mesh_shape: tuple[int, ...] | None = None,
                  batch_size: int | None = None) -> dict:
    """The same for a codec config (program=mimi): moshi_jax.training.train_mimi.aot_compile_codec."""
    from moshi_jax.training import config as config_lib
    from moshi_jax.training.train_mimi import aot_compile_codec

    cfg = config_lib.load_config(config, overrides)
    if batch_size is not None:
        cfg = config_lib.apply_overrides(cfg, [f"data.batch_size={batch_size}"])
    mesh, kind = _topology_mesh(topology, mesh_shape or (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    return {**aot_compile_codec(cfg, mesh), "config": config, "overrides": overrides, "topology": topology,
            "device_kind": kind}


def _compile(config: str, overrides: list[str], topology: str, mesh_shape, batch_size) -> dict:
    """Dispatch on the config's program kind (lm | mimi)."""
    from moshi_jax.training import config as config_lib

    program = config_lib.load_config(config, overrides, check_model=False).program
    return (compile_codec if program == "mimi" else compile_lm)(config, overrides, topology, mesh_shape, batch_size)


def _in_tpu_venv() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def _parse_mesh(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    parts = tuple(int(p) for p in re.split(r"[,x]", text))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--mesh needs 3 sizes data,fsdp,tensor, got {text!r}")
    return parts


def format_summary(r: dict) -> str:
    gib = 2 ** 30
    lines = [f"AOT train step: config {r['config']} {' '.join(r['overrides'])} on {r['topology']} "
             f"({r['num_devices']} x {r['device_kind']}, mesh {r['mesh']})",
             f"  params {r['params'] / 1e9:.3f}B, trainable {r['trainable_params'] / 1e6:.1f}M"
             f"{' (LoRA)' if r['lora'] else ''}; batch {r['batch']}, {r['compute_dtype']}, remat {r['remat']}",
             f"  compile {r['compile_seconds']:.1f}s; per device: arguments "
             f"{r.get('argument_size_in_bytes', 0) / gib:.2f} GiB, outputs {r.get('output_size_in_bytes', 0) / gib:.2f}"
             f" GiB, aliased (donated) {r.get('alias_size_in_bytes', 0) / gib:.2f} GiB, temporaries "
             f"{r.get('temp_size_in_bytes', 0) / gib:.2f} GiB -> peak ~{r['peak_bytes_per_device_estimate'] / gib:.2f}"
             f" GiB",
             f"  XLA flops per device per step {r['flops_per_device_step']:.3e}; model flops per step "
             f"{r['model_flops_per_step']:.3e}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.tpu_aot", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="create the libtpu-only venv (default .venv-tpu, or $MOSHI_JAX_TPU_VENV)")
    s.add_argument("--venv", type=Path, default=None)
    c = sub.add_parser("compile", help="compile a config's train step for a TPU topology; print memory + flops")
    c.add_argument("config", help="configs/<name>.py preset (tiny, 100m, 2b, 7b) or a path")
    c.add_argument("overrides", nargs="*", help="key=value config overrides")
    c.add_argument("--topology", default="v5e:2x2", help="TPU topology name, e.g. v5e:2x2, v5e:4x4, v5p:2x2x2")
    c.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes (default 1,-1,1: all chips on fsdp)")
    c.add_argument("--batch-size", type=int, default=None, help="global batch (default: the config's)")
    c.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    if args.cmd == "setup":
        setup(args.venv)
        return 0
    if not _in_tpu_venv():  # re-run inside the TPU venv
        ok, why = venv_is_ready()
        if not ok:
            print(why, file=sys.stderr)
            return 2
        env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
        # This environment's packages first (whichever env created the TPU venv): the worker then runs the
        # same jax / flax as the caller, plus libtpu from the TPU venv.
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), sysconfig.get_paths()["purelib"],
                                             env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        argv = sys.argv[1:] if argv is None else argv
        return subprocess.run([str(venv_python()), "-m", "train.tpu_aot", *argv], env=env, cwd=REPO).returncode
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no TPU here: the host backend stays CPU, TPU is compile-only
    # Compile-only use never touches a chip: let several such processes run at once (libtpu otherwise takes
    # /tmp/libtpu_lockfile and a second process fails).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    result = _compile(args.config, args.overrides, args.topology, _parse_mesh(args.mesh), args.batch_size)
    print(format_summary(result), file=sys.stderr)
    text = json.dumps(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
