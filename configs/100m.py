"""~111M-parameter LM trained from scratch (benchmark scale: one accelerator or a small slice)."""

from moshi_jax.training.config import CheckpointConfig, DataConfig, ModelConfig, OptimizerConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        name="lm_100m",
        steps=10_000,
        model=ModelConfig(preset="bench_111m"),
        scan_layers=False,  # 6 + 4 layers: unrolled compiles fast and saves the rolled loop's residual copies
        data=DataConfig(seq_frames=256, batch_size=32),
        optimizer=OptimizerConfig(lr=3e-4, schedule="cosine", warmup_steps=200, min_lr_ratio=0.1),
        checkpoint=CheckpointConfig(every=1000, keep=3),
    )
