"""Tiny LM on CPU: smoke runs and tests (seconds per step on a laptop core)."""

from moshi_jax.training.config import (
    CheckpointConfig,
    DataConfig,
    MetricsConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
)


def get_config() -> TrainConfig:
    return TrainConfig(
        name="tiny",
        steps=20,
        compute_dtype="float32",  # CPU has no fast bf16; float32 keeps tests exact
        model=ModelConfig(preset="tiny"),
        data=DataConfig(seq_frames=16, batch_size=8),
        optimizer=OptimizerConfig(lr=3e-3, schedule="cosine", warmup_steps=2),
        checkpoint=CheckpointConfig(every=10, keep=2),
        metrics=MetricsConfig(log_every=5),
    )
