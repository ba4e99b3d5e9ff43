"""The GPU variant of configs/tts_small.py (issue 13): `LMConfig.tts_base` (dim 512 x 8 layers), bf16, batch 64,
6000 steps; same corpus, text delay and eval split, so the engine and `python -m benchmarks.learning` run it the
same way."""

from moshi_jax.training.config import (
    CheckpointConfig,
    DataConfig,
    DataSource,
    MetricsConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
)

CORPUS = "runs/corpus/tokens"
TEXT_DELAY_FRAMES = -2


def get_config() -> TrainConfig:
    return TrainConfig(
        name="tts_gpu",
        steps=6000,
        compute_dtype="bfloat16",
        scan_layers=True,
        eval_every=250,
        eval_batches=8,
        model=ModelConfig(preset="tts_base"),
        data=DataConfig(sources=(DataSource(f"{CORPUS}/train"),),
                        eval_sources=(DataSource(f"{CORPUS}/heldout_sentences"),),
                        seq_frames=48, batch_size=64, text_delay_frames=TEXT_DELAY_FRAMES),
        optimizer=OptimizerConfig(lr=1e-3, schedule="cosine", warmup_steps=100),
        checkpoint=CheckpointConfig(every=1000, keep=8),
        metrics=MetricsConfig(log_every=20),
    )
