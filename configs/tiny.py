"""Tiny LM on CPU: the out-of-the-box run (`moshi-jax train`) and smoke tests.

Without `data.sources` the job builds the built-in dataset (10 synthetic two-voice dialogues of 15 s, tokenized
with Mimi) into <run_dir>/data, then trains the 3.5M-param tiny LM for 200 steps of 8 x 32 frames (2.56 s of
audio each): a few minutes on 2 CPU cores, with the loss falling from ~15 to ~5 and below."""

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
        steps=200,
        compute_dtype="float32",  # CPU has no fast bf16; float32 keeps tests exact
        model=ModelConfig(preset="tiny"),
        data=DataConfig(seq_frames=32, batch_size=8),
        optimizer=OptimizerConfig(lr=3e-3, schedule="cosine", warmup_steps=10),
        checkpoint=CheckpointConfig(every=100, keep=2),
        metrics=MetricsConfig(log_every=10),
    )
