"""Train (or fine-tune) the Moshi LM: config -> mesh -> data -> init -> loop with checkpoints -> export + report.

    moshi-jax train tiny                               # out of the box: built-in speech dataset, tiny model, CPU
    python -m train.train_lm tiny steps=50 optimizer.lr=3e-3
    python -m train.train_lm 7b init_from=/ckpt/model.safetensors data.sources=/data/train:1.0 mesh.fsdp=8
    moshi-jax train 7b init_from=hf://kyutai/moshiko-pytorch-bf16 init_lora_from=lora.safetensors lora.enabled=true

`main(argv)` parses `[config] key=value ...` (see moshi_jax.training.config). Without `data.sources` it builds
the built-in dataset (synthetic two-voice speech with word timestamps, tokenized with Mimi) into
`<run_dir>/data` (`data.builtin=random` trains on random tokens instead: machinery smoke tests). It then
builds the LM's `Program` (`lm_program`: init + loss, the Grain token-grid iterators, reference-layout export)
and runs the generic `train_loop` of moshi_jax.training.loop. A run resumes from the latest checkpoint in its
checkpoint dir (data order included). At the end it writes the merged float32
weights in the reference safetensors layout to `<run_dir>/export/` and a report (`report.json`, `report.md`).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from moshi_jax.training import config as config_lib
from moshi_jax.training import lora_adapter
from moshi_jax.training.config import TrainConfig
from moshi_jax.training.loop import (  # noqa: F401 - the loop's names, re-exported for scripts and tests
    Program,
    axis_rules,
    build_mesh,
    setup_logging,
    to_global,
    train_loop,
    write_report,
)
from moshi_jax.training.train_state import TrainTask

logger = logging.getLogger("moshi_jax.train")


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

    if cfg.init_lora_from and not (cfg.lora.enabled and cfg.init_from):
        raise config_lib.ConfigError("init_lora_from needs lora.enabled=true (with the adapter's rank) and "
                                     "init_from = the adapter's base weights")
    init_params = init_lora = None
    if cfg.init_from:
        def init_params():
            from moshi_jax import hub

            params = lm_checkpoint.load_reference(hub.resolve_weights(cfg.init_from, "moshi_name"), lm_cfg)
            if cfg.init_lora_from:  # moshi-finetune `ft_embed` adapters carry trained embedding tables
                params = lora_adapter.apply_embeddings(params, _adapter(cfg, lm_cfg).embeddings)
            return params

    if cfg.init_lora_from:
        def init_lora(partition):
            adapter = _adapter(cfg, lm_cfg, partition.layouts)
            logger.info("LoRA factors from the adapter %s (rank %d)", cfg.init_lora_from, adapter.rank)
            return adapter.lora

    def export(params, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "model.safetensors"
        lm_checkpoint.save_reference(params, lm_cfg, path)
        return [path]

    dep_q = lm_dep_q(lm_cfg)
    return Program(task=TrainTask(init, loss), batch_shardings=shardings, train_iter=train_iter,
                   eval_iter=eval_iter, tokens_per_step=B * T * (1 + dep_q),
                   flops_per_step=lm_flops_per_step(lm_cfg, init, B, T), init_params=init_params, export=export,
                   init_lora=init_lora)


def _adapter(cfg: TrainConfig, lm_cfg, layouts=None):
    """The run's `init_lora_from` adapter, checked against its LoRA settings (rank, scaling)."""
    from moshi_jax import hub

    if layouts is None:
        from flax import linen as nn

        from moshi_jax.lm.model import init_params as lm_init
        from moshi_jax.training import lora as lora_lib

        boxed = jax.eval_shape(lambda k: lm_init(lm_cfg, k), jax.random.PRNGKey(0))
        layouts = lora_lib.lora_layouts(nn.unbox(boxed), lora_lib.logical_axes(boxed))
    path = hub.resolve_weights(cfg.init_lora_from, "lora_name")
    adapter = lora_adapter.load_adapter(path, lm_cfg, layouts)
    if adapter.rank != cfg.lora.rank:
        raise config_lib.ConfigError(f"init_lora_from {cfg.init_lora_from} has rank {adapter.rank}; set "
                                     f"lora.rank={adapter.rank}")
    if adapter.scaling is not None and adapter.scaling != cfg.lora.scaling:
        raise config_lib.ConfigError(f"init_lora_from {cfg.init_lora_from} was trained with lora_scaling "
                                     f"{adapter.scaling:g} (its config.json); set lora.scaling={adapter.scaling:g}")
    return adapter


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
    """A checkpointable Grain iterator of random token grids {'codes': int32 [B / processes, 1+n_q, T]} (smoke
    runs and tests without a dataset): text ids in [0, text_card), audio ids in [0, card). `batch` is the global
    batch; each process gets its rows of it (the same global batches whatever the process count)."""
    import grain

    from moshi_jax.training import distributed

    n = lm_num_streams(lm_cfg)

    def make(i):
        rng = np.random.default_rng([seed, int(i)])
        text = rng.integers(0, lm_cfg.text_card, (1, frames))
        audio = rng.integers(0, lm_cfg.card, (n - 1, frames))
        return {"codes": np.concatenate([text, audio]).astype(np.int32)}

    ds = grain.MapDataset.range(1 << 30).shuffle(seed=seed).map(make)
    return iter(distributed.process_batches(ds, batch).to_iter_dataset())


def prepare_data(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its data sources resolved: without `data.sources` and with `data.builtin=speech`, the built-in
    dataset is built (once) into `<run_dir>/data` and becomes the train source."""
    if cfg.data.sources or cfg.data.builtin == "random":
        return cfg
    from moshi_jax.data import tokenize
    from moshi_jax.training import distributed

    out = cfg.resolved_run_dir / "data"
    logger.info("no data.sources given: preparing the built-in dataset (synthetic two-voice speech -> Mimi "
                "codes + text) in %s", out)
    t0 = time.perf_counter()
    if not distributed.is_primary():  # process 0 builds (and writes the index); the others then reuse it
        distributed.barrier("moshi_jax_builtin_data")
    path = tokenize.prepare_builtin_dataset(out)
    if distributed.is_primary():
        distributed.barrier("moshi_jax_builtin_data")
    logger.info("built-in dataset ready in %.0fs: %s", time.perf_counter() - t0, path)
    data = dataclasses.replace(cfg.data, sources=(config_lib.DataSource(str(path)),))
    return dataclasses.replace(cfg, data=data)


def run(cfg: TrainConfig) -> dict:
    """Train `cfg` (data prepared, mesh built from the available devices) -> report dict."""
    from moshi_jax.training import distributed

    config_lib.check_paths(cfg)  # before the (slow) built-in data and the model
    distributed.join(cfg)  # a multi-process run: before anything touches a JAX backend
    cfg = prepare_data(cfg)
    lm_cfg = config_lib.build_lm_config(cfg)
    mesh = build_mesh(cfg)
    logger.info("config %s: model %s, %d steps, batch %d x %d frames, run dir %s", cfg.name, cfg.model.preset,
                cfg.steps, cfg.data.batch_size, cfg.data.seq_frames, cfg.resolved_run_dir)
    report = train_loop(cfg, lm_program(cfg, lm_cfg), mesh, axis_rules(cfg))
    if not distributed.is_primary():  # process 0 wrote the report and logs the summary
        return report
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
