"""Tiny Mimi codec on CPU: `moshi-jax train mimi_tiny` (the codec program, moshi_jax.training.train_mimi).

Without `data.sources` the job synthesizes the built-in speech set (every sentence of the built-in corpus in
10 eSpeak NG voices for training, 2 more voices held out) into <run_dir>/codec_data and trains a small Mimi
(same 24 kHz -> 12.5 Hz rates and strides as the released codec, narrow layers, 8 levels of 256 codes:
1.6 kbps with all levels) on 0.96 s crops, evaluating on the held-out voices.

1500 steps (~30 min on the 2-core CPU at ~1.2 s/step): the length of the measured run that beats the mu-law
baseline on unseen voices (README, "Codec (Mimi) training"; that run trained on `moshi-jax data synth`'s
corpus with `data.sources=runs/corpus/train data.eval_sources=runs/corpus/heldout_voices`).

Deviation from the paper's recipe, for a run of minutes on a CPU: the multi-scale mel and L1 reconstruction
losses are ON here (a GAN alone learns far too slowly for a CPU run); `configs/mimi.py` keeps the paper's
adversarial + feature matching only."""

from moshi_jax.training.config import (
    CheckpointConfig,
    CodecConfig,
    DataConfig,
    MetricsConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
)


def get_config() -> TrainConfig:
    return TrainConfig(
        name="mimi_tiny",
        program="mimi",
        steps=1500,
        compute_dtype="float32",
        eval_every=250,
        eval_batches=4,
        model=ModelConfig(preset="tiny", overrides=(
            ("dimension", "32"), ("n_filters", "8"), ("num_heads", "2"), ("num_layers", "2"),
            ("dim_feedforward", "64"), ("codebook_dim", "16"), ("bins", "256"), ("n_q", "8"), ("num_codebooks", "8"),
        )),
        data=DataConfig(seq_frames=12, batch_size=8),
        optimizer=OptimizerConfig(lr=1e-3, b1=0.5, b2=0.9, weight_decay=0.0, schedule="cosine", warmup_steps=20,
                                  grad_clip=0.0),
        codec=CodecConfig(disc_scales=(512,), disc_filters=8, disc_lr=1e-3, adv_weight=1.0, feat_weight=1.0,
                          mel_weight=4.0, l1_weight=4.0, mel_scales=(256, 512, 1024), n_mels=40, teacher_dim=40,
                          kmeans_iters=10,
                          weight_ema=0.99),
        checkpoint=CheckpointConfig(every=250, keep=2),
        metrics=MetricsConfig(log_every=10),
    )
