"""The generic training loop: config -> mesh -> jit -> Orbax -> metrics -> export + report, for any `Program`.

A `Program` is what one model family brings (moshi_jax.training.train_lm for the Moshi LM): the task (init +
loss), checkpointable data iterators (Grain), and optional init / export hooks. `train_loop` owns everything
else: the sharded state spec, the jitted train / eval steps with explicit shardings and donated state, resume
from the latest Orbax checkpoint (data order included), metrics, the report.

A program whose update is not "one loss, one optimizer" (Mimi's GAN: generator + discriminator, two optimizers,
codebook EMAs) brings its own `ProgramSteps` through `Program.build_steps` instead of a `TrainTask`
(moshi_jax.training.train_mimi); everything else in the loop is shared.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from moshi_jax.io_atomic import atomic_write_text
from moshi_jax.training import config as config_lib
from moshi_jax.training import distributed
from moshi_jax.training.checkpointing import Checkpointer, CheckpointMismatchError
from moshi_jax.training.config import TrainConfig
from moshi_jax.training.metrics import MetricsLogger, guess_peak_flops
from moshi_jax.training.optimizer import make_optimizer, make_schedule
from moshi_jax.training.step import ShardedStep, make_eval_step, make_train_step
from moshi_jax.training.train_state import (
    TrainTask,
    build_state_spec,
    count_params,
    export_params,
    init_from_params,
    init_train_state,
)

logger = logging.getLogger("moshi_jax.train")


class TrainingDivergedError(RuntimeError):
    """A step's loss or gradient norm was NaN/inf under nan_policy=stop, or the params to export are not finite."""


class ProgramSteps(abc.ABC):
    """A program's state and jitted steps, as the loop drives them. `TaskSteps` builds them from a `TrainTask`
    (one loss, one optimizer: the LM); a program with its own update (a GAN) returns its own from
    `Program.build_steps(cfg, mesh, rules)`. The state is one pytree, checkpointed whole; `frozen` is an extra
    per-run tree (LoRA's frozen base) that is passed to the steps but not checkpointed ({} when unused)."""

    abstract_state: Any  # ShapeDtypeStructs carrying the state's shardings (restore target)
    n_params: int
    n_trainable: int

    @abc.abstractmethod
    def init(self) -> tuple[Any, Any]:
        """-> (state, frozen), created with their shardings."""
        ...

    def frozen_for_resume(self) -> Any:
        """The non-checkpointed `frozen` tree of a resumed run."""
        return {}

    @abc.abstractmethod
    def train(self, state, batch: dict, frozen) -> tuple[Any, dict]:
        ...

    @abc.abstractmethod
    def evaluate(self, state, batch: dict, frozen) -> dict:
        ...

    @abc.abstractmethod
    def export_params(self, state, frozen) -> Any:
        """The params handed to `Program.export` (float32, device arrays)."""
        ...


class TaskSteps(ProgramSteps):
    """The steps of a `TrainTask` program: sharded state spec, `make_train_step` / `make_eval_step`."""

    def __init__(self, cfg: TrainConfig, program: Program, mesh: Mesh, rules):
        self.cfg, self.program = cfg, program
        self.tx = make_optimizer(cfg.optimizer, cfg.steps)
        schedule = make_schedule(cfg.optimizer, cfg.steps)
        self.spec = spec = build_state_spec(program.task, self.tx, mesh, rules, cfg.lora)
        batch_sh = program.batch_shardings(mesh)
        self._train = ShardedStep(make_train_step(program.task, spec.partition, self.tx, schedule,
                                                  microbatches=cfg.optimizer.microbatches,
                                                  compute_dtype=cfg.compute_dtype), spec, batch_sh)
        self._eval = ShardedStep(make_eval_step(program.task, spec.partition, cfg.compute_dtype), spec, batch_sh,
                                 donate=False, returns_state=False)
        self.abstract_state = spec.abstract_state
        self.n_params = count_params(spec.abstract_params)
        self.n_trainable = count_params(spec.abstract_state.params)

    def init(self):
        return _initial_state(self.cfg, self.program, self.spec, self.tx)

    def frozen_for_resume(self):
        if self.spec.partition.is_lora:  # the frozen base is not checkpointed: rebuild it from the init source
            return _initial_state(self.cfg, self.program, self.spec, self.tx)[1]
        return {}

    def train(self, state, batch, frozen):
        return self._train(state, batch, frozen)

    def evaluate(self, state, batch, frozen):
        return self._eval(state, batch, frozen)

    def export_params(self, state, frozen):
        return export_params(self.spec, state, frozen)


@dataclasses.dataclass
class Program:
    """What `train_loop` needs from a model family."""

    task: TrainTask | None  # None when `build_steps` is given
    batch_shardings: Callable[[Mesh], dict[str, NamedSharding]]  # {batch key fed to the step: sharding}
    train_iter: Callable[[], Iterator[dict]]  # a fresh, checkpointable (Grain) iterator of host batches
    eval_iter: Callable[[], Iterator[dict]] | None = None
    tokens_per_step: int = 0  # tokens per optimizer step, for tokens/s
    flops_per_step: float = 0.0  # analytic model FLOPs per optimizer step, for MFU
    init_params: Callable[[], Any] | None = None  # pretrained params (None: random init)
    export: Callable[[Any, Path], list[Path]] | None = None  # merged float32 params -> written files
    # LoRA runs with init_params: the initial LoRA tree (e.g. an imported adapter) for the run's ParamPartition;
    # None: fresh factors (B = 0).
    init_lora: Callable[[Any], Any] | None = None
    # The program's own state and steps (cfg, mesh, rules) -> ProgramSteps; None: `TaskSteps` of `task`.
    build_steps: Callable[[TrainConfig, Mesh, Any], ProgramSteps] | None = None


def to_global(batch: dict, shardings: dict[str, NamedSharding]) -> dict:
    """Host batch (this process's rows) -> global jax.Arrays with the batch shardings (keys not in
    `shardings` are dropped: metadata the step does not use)."""
    missing = set(shardings) - set(batch)
    if missing:
        raise KeyError(f"batch lacks {sorted(missing)}; it has {sorted(batch)}")
    return {k: jax.make_array_from_process_local_data(s, np.asarray(batch[k])) for k, s in shardings.items()}


def train_loop(cfg: TrainConfig, program: Program, mesh: Mesh, rules, *, stop_after: int | None = None) -> dict:
    """Train to `cfg.steps` (or stop after `stop_after` more steps, as a preemption would, saving a checkpoint),
    resuming from the latest checkpoint. Returns the report (also written to `<run_dir>/report.{json,md}`)."""
    t_start = time.perf_counter()
    config_lib.check_paths(cfg)
    run_dir = cfg.resolved_run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    config_json = config_lib.to_json(cfg)
    primary = distributed.is_primary()  # several processes: process 0 writes the run's files, all checkpoint
    if primary:
        atomic_write_text(run_dir / "config.json", config_json)

    from moshi_jax.training.mesh import batch_divisor

    per_microbatch = cfg.data.batch_size // cfg.optimizer.microbatches
    if per_microbatch % batch_divisor(mesh):
        raise config_lib.ConfigError(
            f"data.batch_size {cfg.data.batch_size} / optimizer.microbatches {cfg.optimizer.microbatches} = "
            f"{per_microbatch} rows per microbatch, not divisible by the {batch_divisor(mesh)} batch shards of mesh "
            f"{dict(mesh.shape)} (data x fsdp)")
    steps = TaskSteps(cfg, program, mesh, rules) if program.build_steps is None else program.build_steps(
        cfg, mesh, rules)
    batch_sh = program.batch_shardings(mesh)

    ckpt = Checkpointer(cfg.checkpoint_dir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    it = program.train_iter()
    latest = ckpt.latest_good_step() if cfg.checkpoint.resume else None  # damaged steps: logged, set aside
    frozen: Any = {}
    if latest is not None:
        _check_resumable(cfg, ckpt.saved_config(latest), ckpt.directory / str(latest))
        distributed.check_data_state(ckpt.directory / str(latest))
        frozen = steps.frozen_for_resume()
        state = ckpt.restore(latest, steps.abstract_state, it)
        logger.info("resumed from %s at step %d", ckpt.directory, latest)
    else:
        state, frozen = steps.init()
    start_step = int(state.step)

    n_params, n_trainable = steps.n_params, steps.n_trainable
    peak = cfg.metrics.peak_flops_per_device or guess_peak_flops()
    logger.info("model params %.3gM, trainable %.3gM, mesh %s, devices %d", n_params / 1e6, n_trainable / 1e6,
                dict(mesh.shape), mesh.size)
    mlog = MetricsLogger(run_dir, cfg.steps, cfg.metrics.log_every, cfg.metrics.tensorboard,
                         cfg.metrics.progress_bar, initial_step=start_step, primary=primary)
    end = cfg.steps if stop_after is None else min(cfg.steps, start_step + stop_after)
    pending: list[tuple[int, dict]] = []
    last_sync, steps_since_sync = time.perf_counter(), 0
    step_times: list[float] = []
    step = start_step
    skipped = 0  # updates skipped for a non-finite loss / gradient norm (nan_policy=skip)
    try:
        while step < end:
            try:
                batch = next(it)
            except StopIteration:
                raise RuntimeError(f"training data exhausted at step {step}; make the pipeline repeat") from None
            state, metrics = steps.train(state, to_global(batch, batch_sh), frozen)
            step += 1
            steps_since_sync += 1
            pending.append((step, metrics))
            if cfg.nan_policy == "stop" and ckpt.should_save(step):  # no checkpoint past a diverged step
                _check_nonfinite(jax.device_get([(s, m["nonfinite"], m["loss"], m["grad_norm"])
                                                 for s, m in pending]), "stop")
            ckpt.save(step, state, it, config_json)
            if step % cfg.metrics.log_every == 0 or step == end:
                host = jax.device_get(pending)  # the only host sync of the loop
                skipped += _check_nonfinite([(s, m["nonfinite"], m["loss"], m["grad_norm"]) for s, m in host],
                                            cfg.nan_policy)
                now = time.perf_counter()
                dt = (now - last_sync) / steps_since_sync
                if step - steps_since_sync > start_step:  # the first interval includes compilation
                    step_times.append(dt)
                last_sync, steps_since_sync = now, 0
                for s, m in host:
                    m = {k: float(v) for k, v in m.items()}
                    if s == step:
                        m.update(_throughput(dt, program, peak, mesh.size))
                    mlog.log(s, m)
                pending = []
            if cfg.eval_every and program.eval_iter is not None and (step % cfg.eval_every == 0 or step == end):
                mlog.log(step, _evaluate(steps.evaluate, state, frozen, program, batch_sh, cfg.eval_batches),
                         "eval")
        if step not in ckpt.all_steps():
            ckpt.save(step, state, it, config_json, force=True)
    finally:
        ckpt.close()
        mlog.close()

    exported: list[Path] = []
    if step >= cfg.steps and program.export is not None:
        params = distributed.to_host(steps.export_params(state, frozen))  # every process takes part
        exported = _export(program, params, run_dir / "export") if primary else []
    report = _report(cfg, mlog.history, step_times, program, peak, mesh, start_step, step, n_params, n_trainable,
                     exported, time.perf_counter() - t_start)
    report["skipped_steps"] = skipped
    if primary:
        write_report(report, run_dir)
    return report


def _check_nonfinite(flags: list, policy: str) -> int:
    """flags: host (step, nonfinite, loss, grad_norm) tuples. "stop": raise at the first non-finite step;
    "skip": log each skipped update and return how many there were."""
    n = 0
    for s, bad, loss, grad_norm in flags:
        if not bad:
            continue
        values = (("loss", float(loss)), ("gradient norm", float(grad_norm)))
        finite = [f"{k} {v:.4g}" for k, v in values if np.isfinite(v)]
        what = " and ".join(f"{k} {v}" for k, v in values if not np.isfinite(v)) + (
            f" ({', '.join(finite)})" if finite else "")
        if policy == "stop":
            raise TrainingDivergedError(
                f"step {s}: non-finite {what}; training stopped (nan_policy=stop) with the params of step {s - 1} "
                f"(no checkpoint is written past it). Lower optimizer.lr, check the data, or set nan_policy=skip "
                f"to skip such updates")
        logger.warning("step %d: non-finite %s: update skipped (nan_policy=skip)", s, what)
        n += 1
    return n


def _export(program: Program, params: Any, out_dir: Path) -> list[Path]:
    """Export into a temporary sibling folder that replaces `out_dir` only when complete; non-finite params are
    refused (naming the tensors)."""
    from moshi_jax.finite import NonFiniteError, check_finite
    from moshi_jax.io_atomic import atomic_dir

    try:
        check_finite(params, "refusing to export the trained params")
    except NonFiniteError as e:
        raise TrainingDivergedError(str(e)) from None
    with atomic_dir(out_dir) as tmp:
        files = program.export(params, tmp)
    return [out_dir / Path(f).relative_to(tmp) for f in files]


def _initial_state(cfg, program: Program, spec, tx):
    if program.init_params is not None:
        lora = program.init_lora(spec.partition) if program.init_lora and spec.partition.is_lora else None
        return init_from_params(spec, program.init_params(), tx, cfg.seed, lora_params=lora)
    return init_train_state(spec, program.task, tx, cfg.seed)


def _check_resumable(cfg: TrainConfig, saved: dict | None, where: Path) -> None:
    """A checkpoint is only resumed by a run with the same model and LoRA settings."""
    if saved is None:
        return
    now = config_lib.to_dict(cfg)
    diffs = [k for k in ("model", "lora") if saved.get(k) != now[k]]
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {where} was written with different {diffs} settings: saved "
            f"{ {k: saved.get(k) for k in diffs} }, this run { {k: now[k] for k in diffs} }. Use another "
            f"checkpoint.dir or checkpoint.resume=false.")


def _throughput(step_time: float, program: Program, peak: float, n_devices: int) -> dict:
    out = {"step_time": step_time}
    if program.tokens_per_step:
        out["tokens_per_s"] = program.tokens_per_step / step_time
    if program.flops_per_step and peak:
        out["mfu"] = program.flops_per_step / step_time / (peak * n_devices)
    return out


def _evaluate(eval_fn, state, frozen, program: Program, batch_sh, n_batches: int) -> dict:
    it = program.eval_iter()
    sums: dict[str, float] = {}
    n = 0
    for _ in range(n_batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        m = jax.device_get(eval_fn(state, to_global(batch, batch_sh), frozen))
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}


def _report(cfg, history, step_times, program, peak, mesh, start_step, end_step, n_params, n_trainable, exported,
            wall) -> dict:
    train = [h for h in history if h["prefix"] == "train"]
    evals = [h for h in history if h["prefix"] == "eval"]
    keys = [k for k in (train[0] if train else {}) if k.endswith("loss")]
    window = max(1, min(20, len(train) // 5))  # every step is in the history: average out batch-to-batch noise
    curve = {k: {"start": float(np.mean([h[k] for h in train[:window]])),
                 "end": float(np.mean([h[k] for h in train[-window:]]))} for k in keys}
    step_time = float(np.mean(step_times)) if step_times else None
    report = {
        "config": cfg.name, "run_dir": str(cfg.resolved_run_dir), "start_step": start_step, "end_step": end_step,
        "total_steps": cfg.steps, "devices": mesh.size, "device_kind": jax.devices()[0].device_kind,
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "params": n_params, "trainable_params": n_trainable,
        "lora": cfg.lora.enabled, "batch_size": cfg.data.batch_size, "seq_frames": cfg.data.seq_frames,
        "data": [f"{s.path}:{s.weight:g}" for s in cfg.data.sources] or f"builtin={cfg.data.builtin}",
        "loss_curve": curve, "curve_window_steps": window, "step_time_s": step_time,
        "tokens_per_s": program.tokens_per_step / step_time if step_time and program.tokens_per_step else None,
        "mfu": (program.flops_per_step / step_time / (peak * mesh.size)
                if step_time and program.flops_per_step and peak else None),
        "model_flops_per_step": program.flops_per_step or None, "peak_flops_per_device": peak or None,
        "final": {k: v for k, v in train[-1].items() if k != "prefix"} if train else None,
        "eval": evals[-1] if evals else None, "checkpoint_dir": str(cfg.checkpoint_dir),
        "export": [str(p) for p in exported], "wall_time_s": wall,
    }
    return report


def write_report(report: dict, run_dir: Path) -> None:
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2))
    lines = [f"# Training report: {report['config']}", "",
             f"- steps {report['start_step']} -> {report['end_step']} of {report['total_steps']}, "
             f"{report['devices']} x {report['device_kind']}, mesh {report['mesh']}",
             f"- params {report['params'] / 1e6:.3f}M, trainable {report['trainable_params'] / 1e6:.3f}M"
             f"{' (LoRA)' if report['lora'] else ''}; batch {report['batch_size']} x {report['seq_frames']} frames",
             f"- data: {report['data']}",
             f"- step time {_fmt(report['step_time_s'], 's')}, tokens/s {_fmt(report['tokens_per_s'])}, "
             f"MFU {_fmt(report['mfu'] and 100 * report['mfu'], '%')}", "",
             f"| metric | start (mean of first {report['curve_window_steps']} steps) | end (last "
             f"{report['curve_window_steps']}) |", "|---|---|---|"]
    lines += [f"| {k} | {v['start']:.4f} | {v['end']:.4f} |" for k, v in report["loss_curve"].items()]
    if report.get("skipped_steps"):
        lines += ["", f"Skipped updates (non-finite loss or gradient norm, nan_policy=skip): {report['skipped_steps']}"]
    if report["export"]:
        lines += ["", "Exported: " + ", ".join(f"`{p}`" for p in report["export"])]
    lines += _curves_section(run_dir, report)
    atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")


def _curves_section(run_dir: Path, report: dict) -> list[str]:
    """report.md's eval table and loss-curve figure (from metrics.jsonl; see moshi_jax.training.curves)."""
    from moshi_jax.training import curves

    jsonl = run_dir / "metrics.jsonl"
    if not jsonl.is_file():
        return []
    evals = curves.read_metrics(jsonl).get("eval", [])
    lines = []
    if evals:
        keys = curves.loss_keys(evals)
        lines += ["", "Held-out eval (data.eval_sources) by step:", "",
                  "| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {r['step']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |" for r in evals]
    png = curves.plot_loss_curves(jsonl, run_dir / "loss_curves.png", title=str(report["config"]))
    if png is not None:
        lines += ["", f"![loss curves]({png.name})"]
    return lines


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}{unit}"


def build_mesh(cfg: TrainConfig) -> Mesh:
    """The (data, fsdp, tensor) mesh of every device of the run (all processes: joins them first)."""
    from moshi_jax.training import mesh as mesh_lib

    distributed.join(cfg)
    return mesh_lib.make_mesh(cfg.mesh.shape(jax.device_count()))


def axis_rules(cfg: TrainConfig):
    from moshi_jax.training import mesh as mesh_lib

    return cfg.mesh.rules if cfg.mesh.rules is not None else mesh_lib.LOGICAL_AXIS_RULES


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines of the training job to stderr, whatever handlers imported libraries (absl) installed."""
    log = logging.getLogger("moshi_jax")
    if not any(getattr(h, "_moshi_jax", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(process_tag)s%(message)s", datefmt="%H:%M:%S"))
        handler.addFilter(distributed.ProcessTag())  # '[p1/2] ' in multi-process runs
        handler._moshi_jax = True
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)
    if level > logging.DEBUG:  # libraries' INFO chatter (orbax via absl, jax backend probing) hides the progress
        for name in ("absl", "jax", "orbax", "grain"):
            logging.getLogger(name).setLevel(logging.WARNING)
