"""Full fine-tuning of a ~2B Moshi-architecture LM from a reference checkpoint (FSDP over all devices).

Set the checkpoint and data: `init_from=/path/model.safetensors data.sources=/data/a:1.0`."""

from moshi_jax.training.config import CheckpointConfig, DataConfig, ModelConfig, OptimizerConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        name="moshi_2b_ft",
        steps=2000,
        remat="full",
        model=ModelConfig(preset="moshi_2b"),
        data=DataConfig(seq_frames=1250, batch_size=16),  # 100 s sequences, as moshi-finetune
        optimizer=OptimizerConfig(lr=2e-6, schedule="one_cycle", pct_start=0.05),
        checkpoint=CheckpointConfig(every=250, keep=3),
    )
