"""Moshi 7B LoRA fine-tuning: moshi-finetune's example/moshi_7B.yaml (rank 128, scaling 2, lr 2e-6,
OneCycle pct_start 0.05, 100 s sequences, semantic weight 100, text padding weight 0.5, 2000 steps).

Set the checkpoint and data: `init_from=/path/model.safetensors data.sources=/data/a:1.0`."""

from moshi_jax.training.config import (
    CheckpointConfig,
    DataConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
)


def get_config() -> TrainConfig:
    return TrainConfig(
        name="moshi_7b_lora",
        steps=2000,
        remat="full",
        model=ModelConfig(preset="moshi_7b"),
        data=DataConfig(seq_frames=1250, batch_size=16),
        optimizer=OptimizerConfig(lr=2e-6, schedule="one_cycle", pct_start=0.05),
        loss=LossConfig(text_padding_weight=0.5, first_codebook_weight_multiplier=100.0),
        lora=LoraConfig(enabled=True, rank=128, scaling=2.0, train_embeddings=False),
        checkpoint=CheckpointConfig(every=250, keep=3),
    )
