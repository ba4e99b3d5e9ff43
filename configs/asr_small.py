"""Small streaming ASR model on CPU (issue 13): text delayed 8 frames (0.64 s) after the audio it transcribes.

Data: `moshi-jax data synth runs/corpus` (generated sentences x 24 eSpeak NG voices, tiny random Mimi with fitted
codebooks); 8 codebooks; eval on held-out sentences spoken by seen voices every `eval_every` steps. The model is
the reference's STT layout (`LMConfig.stt_small`: no depformer, 8 audio streams as inputs, delays 0), so
the engine's "asr" mode with `text_delay_frames=8` runs it unchanged (`python -m benchmarks.learning`).
Measured: 2500 steps in ~45 min on the shared 2-core CPU (0.5-1.3 s per step under load); 6 steps/s on the idle box.
Best so far (README, issue 13): corpus of 20000 sentences tokenized by issue 11's trained tiny Mimi, 10000 steps:
WER 23.4% seen / 33.9% unseen voices (the random codec: ~105%)."""

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
TEXT_DELAY_FRAMES = 8


def get_config() -> TrainConfig:
    return TrainConfig(
        name="asr_small",
        steps=2500,
        compute_dtype="float32",  # CPU has no fast bf16
        scan_layers=False,  # unrolled: faster for a shallow model on CPU
        eval_every=100,
        eval_batches=8,
        # card 256: room for a trained tiny Mimi's 256 codes (issue 11's export); the random corpus codec uses 64
        model=ModelConfig(preset="stt_small", overrides=(("card", "256"),)),
        data=DataConfig(sources=(DataSource(f"{CORPUS}/train"),),
                        eval_sources=(DataSource(f"{CORPUS}/heldout_sentences"),),
                        seq_frames=48, batch_size=16, text_delay_frames=TEXT_DELAY_FRAMES),
        optimizer=OptimizerConfig(lr=1e-3, schedule="cosine", warmup_steps=100),
        checkpoint=CheckpointConfig(every=250, keep=8),
        metrics=MetricsConfig(log_every=20),
    )
