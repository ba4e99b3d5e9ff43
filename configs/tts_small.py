"""Small streaming TTS model on CPU (issue 13): text 4 frames (0.32 s) ahead of the audio it describes.

Data: the corpus of `moshi-jax data synth runs/corpus` (see configs/asr_small.py), its splits tokenized again in
the TTS text layout, where every word opens with EPAD (the token the engine's word state machine waits for
before it feeds the next word; moshi-finetune's stream gives back-to-back words no EPAD and cuts a word whose
tokens outrun its frames):

    for s in train heldout_sentences heldout_voices; do moshi-jax data tokenize runs/corpus/$s.jsonl \\
      -o runs/corpus/tokens_tts/$s --tokenizer runs/corpus/tokenizer.model --num-codebooks 8 --allow-mono \\
      --epad-every-word --mimi-preset tiny --mimi-weights <the corpus's codec>; done

The queued EPADs make the text fall behind the word starts by 1.4 frames on average (3 at the 90th percentile
on the 20000-sentence corpus), hence the 4-frame lead. The model (`LMConfig.tts_small`: one speaker's 8
codebooks predicted by a depformer, Moshi's acoustic delay) runs through the engine's "tts" mode with
`text_delay_frames=-4` and no initial padding (`python -m benchmarks.learning`). 8000 steps: ~35 min on the idle
2-core CPU (0.25 s per step). Measured (README, issue 13): 20000 sentences, issue 11's trained tiny Mimi: WER 26.5%
on 64 held-out sentences through the engine (codes read by the ASR model; the moshi-finetune layout: 127%)."""

from moshi_jax.training.config import (
    CheckpointConfig,
    DataConfig,
    DataSource,
    MetricsConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
)

CORPUS = "runs/corpus/tokens_tts"
TEXT_DELAY_FRAMES = -4


def get_config() -> TrainConfig:
    return TrainConfig(
        name="tts_small",
        steps=8000,
        compute_dtype="float32",
        scan_layers=False,
        eval_every=500,
        eval_batches=8,
        model=ModelConfig(preset="tts_small"),
        data=DataConfig(sources=(DataSource(f"{CORPUS}/train"),),
                        eval_sources=(DataSource(f"{CORPUS}/heldout_sentences"),),
                        seq_frames=48, batch_size=16, text_delay_frames=TEXT_DELAY_FRAMES),
        optimizer=OptimizerConfig(lr=1e-3, schedule="cosine", warmup_steps=100),
        checkpoint=CheckpointConfig(every=1000, keep=8),
        metrics=MetricsConfig(log_every=20),
    )
