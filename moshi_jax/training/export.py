"""`moshi-jax export`: one step of a training run -> reference-layout safetensors + the config.json its loaders read.

    moshi-jax export runs/tiny -o out/                       # latest checkpoint, merged weights, float32
    moshi-jax export runs/ft --step 5000 -o out/ --dtype bfloat16
    moshi-jax export runs/ft --best --lora-only -o out/      # moshi-finetune adapter of the best eval step

Which exporter runs is decided by the run's saved config (`<run_dir>/config.json`, also stored in every
checkpoint): its `program` key names an entry of `EXPORTERS` (absent: "lm", the Moshi LM). A codec program
registers its own kind there ("kind": "module:function" taking (ExportRequest, saved config dict, step) and
returning an ExportResult) and records `"program": KIND` in its saved config.

The step: `--step N` (a checkpoint that is still on disk), `--best` (see `best_step`), else the latest.
The LM exporter restores the run's trainable params from that Orbax checkpoint (the optimizer state is not read)
onto a mesh of the local devices; a LoRA run's frozen base is rebuilt from its init source as the training loop
does on resume (`init_from`, `init_lora_from`; a random base from the run's seed).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("moshi_jax.export")

# kind -> "module:function"; a program kind is the saved config's "program" entry (default "lm").
EXPORTERS: dict[str, str] = {"lm": "moshi_jax.training.export:export_lm",
                             "mimi": "moshi_jax.training.train_mimi:export_checkpoint"}
DTYPES = ("float32", "bfloat16")


class ExportError(ValueError):
    """A run / step / option that cannot be exported (one-line message)."""


@dataclasses.dataclass(frozen=True)
class ExportRequest:
    run_dir: Path
    out_dir: Path
    step: int | None = None  # None: --best or the latest
    best: bool = False
    dtype: str = "float32"
    lora_only: bool = False
    progress: bool = True


@dataclasses.dataclass
class ExportResult:
    kind: str
    step: int
    files: list[Path]
    notes: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        lines = [f"exported step {self.step} of a {self.kind} run:"]
        for f in self.files:
            lines.append(f"  {f}  ({_describe(f)})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _describe(path: Path) -> str:
    size = path.stat().st_size
    human = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"
    if path.suffix != ".safetensors":
        return human
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        keys = list(f.keys())
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in keys)
        dtypes = sorted({f.get_slice(k).get_dtype() for k in keys})
    return f"{human}, {len(keys)} tensors, {n / 1e6:.3f}M values, {'/'.join(dtypes)}"


# ----------------------------------------------------------------------------------------------- the run


def read_run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.json"
    if not Path(run_dir).is_dir():
        raise ExportError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise ExportError(f"{run_dir} has no config.json: not a moshi-jax training run directory")
    return json.loads(path.read_text())


def run_kind(saved: dict) -> str:
    return str(saved.get("program") or "lm")


def checkpoint_dir(run_dir: Path, saved: dict) -> Path:
    """The run's Orbax checkpoint dir: `checkpoint.dir` when it is set and exists, else <run_dir>/checkpoints
    (the run may have moved since it was trained: relative paths were relative to its working directory)."""
    given = (saved.get("checkpoint") or {}).get("dir") or ""
    if given and Path(given).is_dir():
        return Path(given)
    return Path(run_dir) / "checkpoints"


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
    """Steps with a finished checkpoint (Orbax writes into a temporary name and renames when done)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())


def eval_losses(run_dir: Path) -> dict[int, float]:
    """{step: eval loss} from <run_dir>/metrics.jsonl (the training loop's record of every logged metric; a step
    evaluated again after a resume keeps its last record)."""
    path = Path(run_dir) / "metrics.jsonl"
    out: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if rec.get("prefix") == "eval" and "loss" in rec and math.isfinite(rec["loss"]):
                out[int(rec["step"])] = float(rec["loss"])
    return out


def best_step(run_dir: Path, steps: Iterable[int]) -> tuple[int, float, list[str]]:
    """--best: of the checkpoints still on disk, the step with the lowest eval loss (the `loss` of the eval logged
    at that step, i.e. `eval_every` / the last step). Returns (step, loss, notes); ExportError when no kept
    checkpoint has an eval (set eval_every and data.eval_sources, with checkpoint.every a multiple of eval_every)."""
    losses = eval_losses(run_dir)
    steps = sorted(steps)
    if not losses:
        raise ExportError(f"--best: {run_dir}/metrics.jsonl has no eval loss (train with data.eval_sources and "
                          "eval_every > 0)")
    kept = {s: losses[s] for s in steps if s in losses}
    if not kept:
        raise ExportError(f"--best: none of the kept checkpoints {steps} has an eval loss (evals at steps "
                          f"{sorted(losses)[:10]}); make checkpoint.every a multiple of eval_every")
    step = min(kept, key=lambda s: (kept[s], s))
    notes = [f"--best: eval loss {kept[step]:.4f} at step {step} (lowest of {len(kept)} evaluated checkpoints)"]
    overall = min(losses, key=lambda s: (losses[s], s))
    if losses[overall] < kept[step]:
        notes.append(f"the lowest eval loss overall was at step {overall} ({losses[overall]:.4f}), whose "
                     "checkpoint is no longer kept")
    return step, kept[step], notes


def choose_step(req: ExportRequest, ckpt_dir: Path) -> tuple[int, list[str]]:
    steps = checkpoint_steps(ckpt_dir)
    if not steps:
        raise ExportError(f"no checkpoint in {ckpt_dir}")
    if req.step is not None and req.best:
        raise ExportError("give --step or --best, not both")
    if req.step is not None:
        if req.step not in steps:
            raise ExportError(f"no checkpoint of step {req.step} in {ckpt_dir}; kept steps: {steps}")
        return req.step, []
    if req.best:
        step, _, notes = best_step(req.run_dir, steps)
        return step, notes
    return steps[-1], []


def export_run(req: ExportRequest) -> ExportResult:
    """Export one step of the run `req.run_dir` with the exporter of its program kind."""
    if req.dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {DTYPES}, got {req.dtype!r}")
    saved = read_run_config(req.run_dir)
    kind = run_kind(saved)
    if kind not in EXPORTERS:
        raise ExportError(f"{req.run_dir}: no exporter for program kind {kind!r} (known: {sorted(EXPORTERS)})")
    step, notes = choose_step(req, checkpoint_dir(req.run_dir, saved))
    module, _, fn = EXPORTERS[kind].partition(":")
    result = getattr(importlib.import_module(module), fn)(req, saved, step)
    result.notes[:0] = notes
    return result


# ----------------------------------------------------------------------------------------------- the LM


def _export_mesh():
    """A 1-D fsdp mesh over the local devices (restores reshard onto it, whatever mesh trained the run)."""
    import jax

    from moshi_jax.training import mesh as mesh_lib

    return mesh_lib.make_mesh((1, jax.device_count(), 1))


def restore_params(ckpt_dir: Path, step: int, spec) -> Any:
    """The trainable params of `step` (TrainState.params, placed with `spec`'s shardings); the optimizer state
    and data iterator are not read (partial restore)."""
    import orbax.checkpoint as ocp

    from moshi_jax.training.checkpointing import STATE, Checkpointer

    with Checkpointer(ckpt_dir, async_save=False) as ckpt:
        ckpt.check_compatible(step, spec.abstract_state)
    item = {"params": spec.abstract_state.params}
    mgr = ocp.CheckpointManager(Path(ckpt_dir).absolute(), item_handlers={STATE: ocp.PyTreeCheckpointHandler()})
    try:
        restored = mgr.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)}))
    finally:
        mgr.close()
    return restored[STATE]["params"]


def _base_config(cfg) -> dict:
    """config.json keys of the base repository the run started from (file names, model_type, lm_gen_config, ...)
    when `init_from` is a file of a repository with a config.json; {} otherwise."""
    from moshi_jax import hub

    if not cfg.init_from:
        return {}
    try:
        path = hub.resolve_weights(cfg.init_from, "moshi_name")
    except hub.HubError:
        return {}
    conf = Path(path).with_name("config.json")
    return json.loads(conf.read_text()) if conf.is_file() else {}


def _write_safetensors(items: Iterable[tuple[str, np.ndarray]], n: int, path: Path, dtype: str, progress: bool,
                       desc: str) -> Path:
    import ml_dtypes
    from safetensors.numpy import save_file
    from tqdm import tqdm

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    tensors = {}
    for k, v in tqdm(items, total=n, desc=desc, unit="tensor", disable=not progress):
        tensors[k] = np.ascontiguousarray(np.asarray(v, np.float32).astype(np_dtype))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)  # never a half-written file under the final name
    return path


def _write_json(obj: dict, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
    return path


def _frozen_base(cfg, program, spec, tx) -> Any:
    """A LoRA run's frozen base params (float32), rebuilt from its init source as on resume: the init_from
    weights (with an init_lora_from adapter's embedding tables), or the seeded random init."""
    import jax
    import jax.numpy as jnp

    from moshi_jax.training import loop

    log.info("rebuilding the frozen base from %s", cfg.init_from or f"a random init (seed {cfg.seed})")
    if program.init_params is None:
        return loop._initial_state(cfg, program, spec, tx)[1]
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), program.init_params())
    return spec.partition.split(params)[1]


def export_lm(req: ExportRequest, saved: dict, step: int) -> ExportResult:
    """Moshi LM run -> `model.safetensors` (merged, released layout) + config.json, or with `lora_only`
    `lora.safetensors` (moshi-finetune adapter) + config.json with lora / lora_rank / lora_scaling."""
    import jax

    from moshi_jax.lm import checkpoint as lm_ckpt
    from moshi_jax.training import config as config_lib
    from moshi_jax.training import loop, lora_adapter
    from moshi_jax.training.optimizer import make_optimizer
    from moshi_jax.training.train_lm import lm_program
    from moshi_jax.training.train_state import build_state_spec, export_params

    try:
        cfg = config_lib.from_dict(config_lib.TrainConfig, saved)
    except (config_lib.ConfigError, TypeError) as e:
        raise ExportError(f"{req.run_dir}/config.json is not an LM training config: {e}") from e
    if req.lora_only and not cfg.lora.enabled:
        raise ExportError(f"--lora-only: {req.run_dir} is a full fine-tuning run (lora.enabled=false); export its "
                          "merged weights instead")
    lm_cfg = config_lib.build_lm_config(cfg)
    program = lm_program(cfg, lm_cfg)
    mesh = _export_mesh()
    tx = make_optimizer(cfg.optimizer, cfg.steps)
    spec = build_state_spec(program.task, tx, mesh, loop.axis_rules(cfg), cfg.lora)
    ckpt_dir = checkpoint_dir(req.run_dir, saved)
    log.info("restoring step %d from %s", step, ckpt_dir)
    trainable = restore_params(ckpt_dir, step, spec)
    notes: list[str] = []
    out = Path(req.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_conf = {k: v for k, v in _base_config(cfg).items() if k not in lora_adapter.LORA_KEYS + ("lora_name",)}
    files: list[Path] = []

    frozen: Any = {}
    if spec.partition.is_lora and not (req.lora_only and cfg.init_from):  # an adapter over a file needs no base
        frozen = _frozen_base(cfg, program, spec, tx)

    if req.lora_only:
        host = jax.device_get(trainable)
        layouts, rank = spec.partition.layouts, cfg.lora.rank
        n = 2 * len(lora_adapter.linear_slots(lm_cfg, layouts)) + len(jax.tree.leaves(host["base"]))
        items = lora_adapter.iter_adapter(host["lora"], layouts, lm_cfg, rank, host["base"])
        files.append(_write_safetensors(items, n, out / "lora.safetensors", req.dtype, req.progress, "adapter"))
        conf = lora_adapter.adapter_config(lm_cfg, rank, cfg.lora.scaling, base_conf)
        if not cfg.init_from:  # the adapter is relative to a random base: ship that base too
            base = jax.device_get(jax.jit(lambda f: spec.partition.combine(
                {"lora": jax.tree.map(jax.numpy.zeros_like, trainable["lora"]), "base": trainable["base"]}, f,
                jax.numpy.float32))(frozen))
            files.append(_write_safetensors(lm_ckpt.iter_reference(base, lm_cfg), len(lm_ckpt.reference_layout(
                lm_cfg)), out / "model.safetensors", req.dtype, req.progress, "base"))
            conf["moshi_name"] = "model.safetensors"
            notes.append("the run started from a random base (no init_from): its base weights are written as "
                         "model.safetensors beside the adapter")
        else:
            notes.append(f"base weights: {cfg.init_from} (the reference server: --config-path config.json "
                         "--lora-weight lora.safetensors with --moshi-weight / --hf-repo of that base)")
        files.append(_write_json(conf, out / "config.json"))
    else:
        state = spec.abstract_state.replace(params=trainable)  # only .params is read by export_params
        params = jax.device_get(export_params(spec, state, frozen))
        files.append(_write_safetensors(lm_ckpt.iter_reference(params, lm_cfg), len(lm_ckpt.reference_layout(
            lm_cfg)), out / "model.safetensors", req.dtype, req.progress, "weights"))
        conf = {**base_conf, **lm_cfg.to_reference_kwargs(), "moshi_name": "model.safetensors"}
        files.append(_write_json(conf, out / "config.json"))
        if cfg.lora.enabled:
            notes.append(f"LoRA merged into the weights (rank {cfg.lora.rank}, scaling {cfg.lora.scaling:g})")
    return ExportResult("lm", step, files, notes)
