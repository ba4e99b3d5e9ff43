"""The GPU variant of configs/asr_small.py (issue 13): `LMConfig.stt_base` (dim 512 x 8 layers), bf16, batch 64,
6000 steps; same corpus, text delay and eval split, so the engine and `python -m benchmarks.learning` run it the
same way."""

from moshi_jax.training.config import TrainConfig, load_config

# only what differs from asr_small (its corpus, text delay, eval split and recipe are this config's too)
GPU_OVERRIDES = ("name=asr_gpu", "steps=6000", "compute_dtype=bfloat16", "scan_layers=true", "eval_every=250",
                 "model.preset=stt_base", "data.batch_size=64", "checkpoint.every=1000")


def get_config() -> TrainConfig:
    return load_config("asr_small", GPU_OVERRIDES)
