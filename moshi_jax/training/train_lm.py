"""Train (or fine-tune) the Moshi LM: config -> mesh -> data -> init -> loop with checkpoints -> export + report.

    moshi-jax train tiny                               # out of the box: built-in speech dataset, tiny model, CPU
    python -m train.train_lm tiny steps=50 optimizer.lr=3e-3
    python -m train.train_lm 7b init_from=/ckpt/model.safetensors data.sources=/data/train:1.0 mesh.fsdp=8

`main(argv)` parses `[config] key=value ...` (see moshi_jax.training.config). Without `data.sources` it builds
the built-in dataset (synthetic two-voice speech with word timestamps, tokenized with Mimi) into
`<run_dir>/data` (`data.builtin=random` trains on random tokens instead: machinery smoke tests). It then
builds the LM program (`lm_program`) and runs the generic `train_loop`, which only needs a `Program`: the task
(init + loss), the data iterators (Grain, checkpointable), and optional init/export hooks. A run resumes from
the latest checkpoint in its checkpoint dir (data order included). At the end it writes the merged float32
weights in the reference safetensors layout to `<run_dir>/export/` and a report (`report.json`, `report.md`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from moshi_jax.training import config as config_lib
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


@dataclasses.dataclass
class Program:
    """What `train_loop` needs from a model family."""

    task: TrainTask
    batch_shardings: Callable[[Mesh], dict[str, NamedSharding]]  # {batch key fed to the step: sharding}
    train_iter: Callable[[], Iterator[dict]]  # a fresh, checkpointable (Grain) iterator of host batches
    eval_iter: Callable[[], Iterator[dict]] | None = None
    tokens_per_step: int = 0  # tokens per optimizer step, for tokens/s
    flops_per_step: float = 0.0  # analytic model FLOPs per optimizer step, for MFU
    init_params: Callable[[], Any] | None = None  # pretrained params (None: random init)
    export: Callable[[Any, Path], list[Path]] | None = None  # merged float32 params -> written files


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
    run_dir = cfg.resolved_run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    config_json = config_lib.to_json(cfg)
    (run_dir / "config.json").write_text(config_json)

    from moshi_jax.training.mesh import batch_divisor

    per_microbatch = cfg.data.batch_size // cfg.optimizer.microbatches
    if per_microbatch % batch_divisor(mesh):
        raise config_lib.ConfigError(
            f"data.batch_size {cfg.data.batch_size} / optimizer.microbatches {cfg.optimizer.microbatches} = "
            f"{per_microbatch} rows per microbatch, not divisible by the {batch_divisor(mesh)} batch shards of mesh "
            f"{dict(mesh.shape)} (data x fsdp)")
    tx = make_optimizer(cfg.optimizer, cfg.steps)
    schedule = make_schedule(cfg.optimizer, cfg.steps)
    spec = build_state_spec(program.task, tx, mesh, rules, cfg.lora)
    batch_sh = program.batch_shardings(mesh)
    step_fn = ShardedStep(make_train_step(program.task, spec.partition, tx, schedule,
                                          microbatches=cfg.optimizer.microbatches,
                                          compute_dtype=cfg.compute_dtype), spec, batch_sh)
    eval_fn = ShardedStep(make_eval_step(program.task, spec.partition, cfg.compute_dtype), spec, batch_sh,
                          donate=False, returns_state=False)

    ckpt = Checkpointer(cfg.checkpoint_dir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    it = program.train_iter()
    latest = ckpt.latest_step() if cfg.checkpoint.resume else None
    frozen: Any = {}
    if latest is not None:
        _check_resumable(cfg, ckpt.saved_config(latest), ckpt.directory / str(latest))
        if spec.partition.is_lora:  # the frozen base is not checkpointed: rebuild it from the init source
            _, frozen = _initial_state(cfg, program, spec, tx)
        state = ckpt.restore(latest, spec.abstract_state, it)
        logger.info("resumed from %s at step %d", ckpt.directory, latest)
    else:
        state, frozen = _initial_state(cfg, program, spec, tx)
    start_step = int(state.step)

    n_params = count_params(spec.abstract_params)
    n_trainable = count_params(spec.abstract_state.params)
    peak = cfg.metrics.peak_flops_per_device or guess_peak_flops()
    logger.info("model params %.3gM, trainable %.3gM, mesh %s, devices %d", n_params / 1e6, n_trainable / 1e6,
                dict(mesh.shape), mesh.size)
    mlog = MetricsLogger(run_dir, cfg.steps, cfg.metrics.log_every, cfg.metrics.tensorboard,
                         cfg.metrics.progress_bar, initial_step=start_step)
    end = cfg.steps if stop_after is None else min(cfg.steps, start_step + stop_after)
    pending: list[tuple[int, dict]] = []
    last_sync, steps_since_sync = time.perf_counter(), 0
    step_times: list[float] = []
    step = start_step
    try:
        while step < end:
            try:
                batch = next(it)
            except StopIteration:
                raise RuntimeError(f"training data exhausted at step {step}; make the pipeline repeat") from None
            state, metrics = step_fn(state, to_global(batch, batch_sh), frozen)
            step += 1
            steps_since_sync += 1
            pending.append((step, metrics))
            ckpt.save(step, state, it, config_json)
            if step % cfg.metrics.log_every == 0 or step == end:
                host = jax.device_get(pending)  # the only host sync of the loop
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
                mlog.log(step, _evaluate(eval_fn, state, frozen, program, batch_sh, cfg.eval_batches), "eval")
        if step not in ckpt.all_steps():
            ckpt.save(step, state, it, config_json, force=True)
    finally:
        ckpt.close()
        mlog.close()

    exported: list[Path] = []
    if step >= cfg.steps and program.export is not None:
        exported = program.export(jax.device_get(export_params(spec, state, frozen)), run_dir / "export")
    report = _report(cfg, mlog.history, step_times, program, peak, mesh, start_step, step, n_params, n_trainable,
                     exported, time.perf_counter() - t_start)
    write_report(report, run_dir)
    return report


def _initial_state(cfg, program: Program, spec, tx):
    if program.init_params is not None:
        return init_from_params(spec, program.init_params(), tx, cfg.seed)
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
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
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
    if report["export"]:
        lines += ["", "Exported: " + ", ".join(f"`{p}`" for p in report["export"])]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}{unit}"


# ----------------------------------------------------------------------------------------------- the LM


def lm_program(cfg: TrainConfig, lm_cfg) -> Program:
    """The Moshi LM as a `Program`: LMModel init, forward + moshi-finetune loss, the Grain token-grid
    pipeline (random codes when `data.sources` is empty), reference-layout export."""
    import jax.numpy as jnp

    from moshi_jax.lm import checkpoint as lm_checkpoint
    from moshi_jax.lm.model import LMModel, forward
    from moshi_jax.training import loss as loss_lib
    from moshi_jax.training import mesh as mesh_lib

    B, T = cfg.data.batch_size, cfg.data.seq_frames
    n_streams = lm_num_streams(lm_cfg)
    model = LMModel(lm_cfg)

    def init(key):
        return model.init(key, jnp.zeros((1, n_streams, T), jnp.int32))["params"]

    def loss(params, batch, rng):
        del rng
        codes = batch["codes"]
        outputs = forward(params, codes, lm_cfg)
        return loss_lib.lm_loss(outputs, codes, lm_cfg, text_padding_weight=cfg.loss.text_padding_weight,
                                first_codebook_weight_multiplier=cfg.loss.first_codebook_weight_multiplier)

    def shardings(mesh):
        return {"codes": mesh_lib.batch_sharding(mesh, 3)}

    def train_iter():
        if not cfg.data.sources:
            if cfg.data.builtin != "random":
                raise config_lib.ConfigError("data.sources is empty: run prepare_data(cfg) first (it builds the "
                                             "built-in dataset), or set data.builtin=random")
            return synthetic_codes(lm_cfg, B, T, cfg.data.seed)
        from moshi_jax.data import pipeline

        return iter(pipeline.make_dataset(cfg.data, lm_cfg, train=True))

    eval_iter = None
    if cfg.data.eval_sources:
        def eval_iter():
            from moshi_jax.data import pipeline

            return iter(pipeline.make_dataset(cfg.data, lm_cfg, train=False))

    init_params = None
    if cfg.init_from:
        def init_params():
            return lm_checkpoint.load_reference(cfg.init_from, lm_cfg)

    def export(params, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "model.safetensors"
        lm_checkpoint.save_reference(params, lm_cfg, path)
        return [path]

    dep_q = lm_dep_q(lm_cfg)
    return Program(task=TrainTask(init, loss), batch_shardings=shardings, train_iter=train_iter,
                   eval_iter=eval_iter, tokens_per_step=B * T * (1 + dep_q),
                   flops_per_step=lm_flops_per_step(lm_cfg, init, B, T), init_params=init_params, export=export)


def lm_num_streams(lm_cfg) -> int:
    return 1 + lm_cfg.n_q


def lm_dep_q(lm_cfg) -> int:
    return lm_cfg.dep_q


def lm_flops_per_step(lm_cfg, init, B: int, T: int) -> float:
    """Analytic training FLOPs of one optimizer step (see moshi_jax.training.metrics)."""
    from flax import linen as nn
    from flax import traverse_util

    from moshi_jax.training import lora as lora_lib
    from moshi_jax.training.metrics import attention_flops_per_frame, matmul_flops_per_frame

    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    axes = lora_lib.logical_axes(boxed)
    shapes = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(nn.unbox(boxed)).items()}
    dep_q = lm_dep_q(lm_cfg)

    def uses(path):  # depth-transformer params without a per-step axis run once per codebook
        return dep_q if any(p.startswith(("depformer", "depth")) for p in path) else 1

    per_frame = matmul_flops_per_frame(shapes, axes, uses)
    t = lm_cfg.temporal
    per_frame += attention_flops_per_frame(t.num_layers, t.d_model, min(T, t.context or T))
    if dep_q:
        d = lm_cfg.depth
        per_frame += attention_flops_per_frame(d.num_layers, d.d_model, dep_q, positions_per_frame=dep_q)
    return per_frame * B * T


def synthetic_codes(lm_cfg, batch: int, frames: int, seed: int):
    """A checkpointable Grain iterator of random token grids {'codes': int32 [B, 1+n_q, T]} (smoke runs and
    tests without a dataset): text ids in [0, text_card), audio ids in [0, card)."""
    import grain

    n = lm_num_streams(lm_cfg)

    def make(i):
        rng = np.random.default_rng([seed, int(i)])
        text = rng.integers(0, lm_cfg.text_card, (1, frames))
        audio = rng.integers(0, lm_cfg.card, (n - 1, frames))
        return {"codes": np.concatenate([text, audio]).astype(np.int32)}

    ds = grain.MapDataset.range(1 << 30).shuffle(seed=seed).map(make)
    return iter(ds.to_iter_dataset().batch(batch, drop_remainder=True))


def prepare_data(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its data sources resolved: without `data.sources` and with `data.builtin=speech`, the built-in
    dataset is built (once) into `<run_dir>/data` and becomes the train source."""
    if cfg.data.sources or cfg.data.builtin == "random":
        return cfg
    from moshi_jax.data import tokenize

    out = cfg.resolved_run_dir / "data"
    logger.info("no data.sources given: preparing the built-in dataset (synthetic two-voice speech -> Mimi "
                "codes + text) in %s", out)
    t0 = time.perf_counter()
    path = tokenize.prepare_builtin_dataset(out)
    logger.info("built-in dataset ready in %.0fs: %s", time.perf_counter() - t0, path)
    data = dataclasses.replace(cfg.data, sources=(config_lib.DataSource(str(path)),))
    return dataclasses.replace(cfg, data=data)


def build_mesh(cfg: TrainConfig) -> Mesh:
    from moshi_jax.training import mesh as mesh_lib

    return mesh_lib.make_mesh(cfg.mesh.shape(jax.device_count()))


def axis_rules(cfg: TrainConfig):
    from moshi_jax.training import mesh as mesh_lib

    return cfg.mesh.rules if cfg.mesh.rules is not None else mesh_lib.LOGICAL_AXIS_RULES


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines of the training job to stderr, whatever handlers imported libraries (absl) installed."""
    log = logging.getLogger("moshi_jax")
    if not any(getattr(h, "_moshi_jax", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler._moshi_jax = True
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)
    if level > logging.DEBUG:  # libraries' INFO chatter (orbax via absl, jax backend probing) hides the progress
        for name in ("absl", "jax", "orbax", "grain"):
            logging.getLogger(name).setLevel(logging.WARNING)


def run(cfg: TrainConfig) -> dict:
    """Train `cfg` (data prepared, mesh built from the available devices) -> report dict."""
    cfg = prepare_data(cfg)
    lm_cfg = config_lib.build_lm_config(cfg)
    mesh = build_mesh(cfg)
    logger.info("config %s: model %s, %d steps, batch %d x %d frames, run dir %s", cfg.name, cfg.model.preset,
                cfg.steps, cfg.data.batch_size, cfg.data.seq_frames, cfg.resolved_run_dir)
    report = train_loop(cfg, lm_program(cfg, lm_cfg), mesh, axis_rules(cfg))
    for key, curve in report["loss_curve"].items():
        logger.info("%-14s %.4f -> %.4f", key, curve["start"], curve["end"])
    logger.info("(means over the first / last %d steps)", report["curve_window_steps"])
    logger.info("checkpoints: %s", report["checkpoint_dir"])
    logger.info("report: %s", cfg.resolved_run_dir / "report.md")
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    """`[config] key=value ...` -> train -> report dict."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print(f"configs: {', '.join(config_lib.available_configs())} (configs/<name>.py); keys: any TrainConfig field "
              "as section.field=value. Same job: `moshi-jax train --help`.")
        return {}
    setup_logging()
    name, overrides = config_lib.main_overrides(argv)
    return run(config_lib.load_config(name, overrides))


if __name__ == "__main__":
    main()
    sys.exit(0)
