"""The released Mimi architecture (MimiConfig(): 96M params, 32 levels of 2048 codes), trained with the paper's
recipe as recalled in spec 4.6 (leads, not settled facts): adversarial (hinge) + feature matching against a
multi-scale STFT discriminator, no reconstruction loss, EnCodec's gradient balancer, semantic distillation,
quantizer dropout, quantization of half the sequences, weight EMA; AdamW, ~12 s crops. For pod runs:

    moshi-jax train mimi data.sources=/data/speech_a:1.0,/data/speech_b:0.5 data.eval_sources=/data/heldout \\
        codec.teacher=precomputed codec.teacher_dim=1024 mesh.data=-1 mesh.fsdp=1

(with WavLM features saved as `<audio stem>.teacher.npy` beside each file; see moshi_jax.data.codec_audio)."""

from moshi_jax.training.config import (
    CheckpointConfig,
    CodecConfig,
    DataConfig,
    MeshConfig,
    MetricsConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
)


def get_config() -> TrainConfig:
    return TrainConfig(
        name="mimi",
        program="mimi",
        steps=400_000,
        compute_dtype="float32",
        eval_every=5000,
        eval_batches=16,
        model=ModelConfig(preset="released"),
        data=DataConfig(seq_frames=150, batch_size=64),  # 12 s crops
        optimizer=OptimizerConfig(lr=8e-4, b1=0.5, b2=0.9, weight_decay=0.0, schedule="cosine", warmup_steps=5000,
                                  grad_clip=0.0),
        mesh=MeshConfig(data=-1, fsdp=1),
        codec=CodecConfig(teacher_dim=64),
        checkpoint=CheckpointConfig(every=5000, keep=3),
        metrics=MetricsConfig(log_every=100),
    )
