"""Small streaming TTS model on CPU (issue 13): text 2 frames (0.16 s) ahead of the audio it describes.

Data: `moshi-jax data synth runs/corpus` (see configs/asr_small.py); 8 of the corpus's 16 codebooks. The model
(`LMConfig.tts_small`: one speaker's 8 codebooks predicted by a depformer, Moshi's acoustic delay) runs through
the engine's "tts" mode with `text_delay_frames=-2` (`python -m benchmarks.learning`). ~3 s per step
on the shared 2-core CPU: the issue-13 run was stopped at step 420 (README, Learning)."""

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
        name="tts_small",
        steps=1200,
        compute_dtype="float32",
        scan_layers=False,
        eval_every=100,
        eval_batches=8,
        model=ModelConfig(preset="tts_small"),
        data=DataConfig(sources=(DataSource(f"{CORPUS}/train"),),
                        eval_sources=(DataSource(f"{CORPUS}/heldout_sentences"),),
                        seq_frames=48, batch_size=16, text_delay_frames=TEXT_DELAY_FRAMES),
        optimizer=OptimizerConfig(lr=1e-3, schedule="cosine", warmup_steps=100),
        checkpoint=CheckpointConfig(every=200, keep=8),
        metrics=MetricsConfig(log_every=20),
    )
