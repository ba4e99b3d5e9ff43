"""Small streaming ASR model on CPU (issue 13): text delayed 8 frames (0.64 s) after the audio it transcribes.

Data: `moshi-jax data synth runs/corpus` (generated sentences x 24 eSpeak NG voices, each recording followed by
1 s of silence); 8 codebooks; eval on held-out sentences spoken by seen voices every `eval_every` steps. The model
is the reference's STT layout (`LMConfig.stt_small`: no depformer, 8 audio streams as inputs, delays 0), so the
engine's "asr" mode with `text_delay_frames=8` runs it unchanged (`python -m benchmarks.learning`).
10000 steps: ~28 min on the idle 2-core CPU (0.17 s per step; 49 min beside two other training runs).
Measured (README, issue 13): 20000 sentences tokenized by issue 11's trained tiny Mimi (`--sentences 20000
--num-codebooks 8 --mimi-weights runs/mimi_corpus/export/mimi.safetensors`), this config: WER 17.7% seen /
25.7% unseen voices on 200 held-out sentences each (without the input augmentation: 19.9% / 28.3%; the seeded
random codec: ~105%)."""

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
        steps=10000,
        compute_dtype="float32",  # CPU has no fast bf16
        scan_layers=False,  # unrolled: faster for a shallow model on CPU
        eval_every=250,
        eval_batches=8,
        # card 256: room for a trained tiny Mimi's 256 codes (issue 11's export); the random corpus codec uses 64
        model=ModelConfig(preset="stt_small", overrides=(("card", "256"),)),
        data=DataConfig(sources=(DataSource(f"{CORPUS}/train"),),
                        eval_sources=(DataSource(f"{CORPUS}/heldout_sentences"),),
                        seq_frames=48, batch_size=16, text_delay_frames=TEXT_DELAY_FRAMES,
                        # mild: 2 masks of 3 frames + 10% redraws learned slower and read seen voices worse
                        input_time_masks=1, input_time_mask_frames=3, input_token_noise=0.05),
        optimizer=OptimizerConfig(lr=1e-3, schedule="cosine", warmup_steps=100),
        checkpoint=CheckpointConfig(every=2000, keep=8),
        metrics=MetricsConfig(log_every=20),
    )
