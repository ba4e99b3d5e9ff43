"""benchmarks/learning.py's transcription paths: the engine's streaming ASR (audio in) and the forward-greedy
ASR on codes (used for TTS output) give the same transcript for the same audio; decoding drops padding and ids
past the tokenizer's vocabulary; the batched codec round trip equals encoding each recording alone."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from benchmarks import learning as L
from moshi_jax.data.tokenize import calibrate_codebooks
from moshi_jax.engine.engine import default_tokenizer, preset_configs, random_lm_params
from moshi_jax.lm.config import TINY_KWARGS, LMConfig

DELAY = 2


def _stt(card: int) -> LMConfig:
    kw = {k: v for k, v in TINY_KWARGS.items() if not k.startswith("depformer")}
    kw.update(n_q=8, dep_q=0, card=card, delays=[0] * 9)
    return LMConfig.from_reference_kwargs(kw)


def test_engine_transcript_equals_forward_greedy_transcript_of_the_same_codes(monkeypatch):
    mimi_cfg, _ = preset_configs("tiny")
    lm_cfg = _stt(mimi_cfg.bins)
    tok = default_tokenizer(lm_cfg.text_card)
    engine = L.asr_engine(mimi_cfg, lm_cfg, DELAY, tok)
    rng = np.random.default_rng(0)
    wavs = [(0.1 * rng.standard_normal(n * L.FRAME) * np.repeat(rng.uniform(0.1, 1, n), L.FRAME)
             ).astype(np.float32) for n in (6, 9)]
    # codebooks fitted to this audio (as the corpus does): varied codes, so greedy argmaxes are not near-ties
    mimi = calibrate_codebooks(engine.codec, engine.codec.init(jax.random.PRNGKey(0)),
                               np.stack([np.pad(w, (0, 9 * L.FRAME - len(w))) for w in wavs])[:, None])
    params = {"mimi": mimi, "lm": random_lm_params(lm_cfg, 3)}
    # compare the raw text token streams (a random model's ids are mostly outside the small vocabulary)
    monkeypatch.setattr(L, "decode_text", lambda tokenizer, tokens: " ".join(str(int(t)) for t in tokens))
    via_engine = L.transcribe(engine, params, wavs, batch=2)
    # the engine's transcript of an item covers its own frames + DELAY + 2 (zero audio after the recording), also
    # for the shorter item of the batch, whose stream runs on to the longer one's end: the forward path gets the
    # codes of exactly that audio per item
    own = [6 + DELAY + 2, 9 + DELAY + 2]
    padded = [np.pad(w, (0, f * L.FRAME - len(w))) for w, f in zip(wavs, own, strict=True)]
    codes = [c for c, _ in L._codec_roundtrip(engine.codec, params["mimi"], padded, 8)]
    via_forward = L.transcribe_codes(lm_cfg, params["lm"], codes, DELAY, tok, batch=2, extra_frames=0)
    assert via_engine == via_forward
    assert [len(t.split()) for t in via_engine] == [6 + 2, 9 + 2]  # frames DELAY .. n + DELAY + 1 of each item
    assert len(set(" ".join(via_engine).split())) > 1


def test_codec_roundtrip_batched_equals_each_recording_alone():
    mimi_cfg, _ = preset_configs("tiny")
    from moshi_jax.mimi.model import MimiCodec

    codec = MimiCodec(mimi_cfg)
    p = codec.init(jax.random.PRNGKey(1))
    rng = np.random.default_rng(1)
    wavs = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (3 * L.FRAME + 100, 5 * L.FRAME)]
    batched = L._codec_roundtrip(codec, p, wavs, 4)
    for w, (codes, audio) in zip(wavs, batched, strict=True):
        alone = np.asarray(codec.encode_stream(p, w[None, None], 4))[0]
        assert codes.shape == alone.shape and np.array_equal(codes, alone)
        np.testing.assert_allclose(audio, np.asarray(codec.decode_stream(p, alone[None]))[0, 0], atol=1e-5)


def test_decode_text_drops_padding_and_out_of_vocabulary_ids():
    tok = default_tokenizer(512)
    ids = tok.encode("the red box")
    noisy = [3, 0] + ids[:1] + [3, tok.vocab_size + 5, -1] + ids[1:] + [0, 3]
    assert L.decode_text(tok, noisy) == "the red box"


def test_forced_text_tts_returns_each_record_s_audio_frames_and_refuses_text_after_audio():
    from moshi_jax.lm import model as M

    cfg = LMConfig.tts_small()
    params = M.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    records = [np.concatenate([rng.integers(0, 50, (1, F)), rng.integers(0, cfg.card, (cfg.dep_q, F))]).astype(np.int32)
               for F in (7, 11)]
    out = L.synthesize_forced_text(cfg, params, records, delay=-2, temp=0.7, seed=0)
    assert [o.shape for o in out] == [(cfg.dep_q, 7), (cfg.dep_q, 11)]
    assert all(((o >= 0) & (o < cfg.card)).all() for o in out)  # every frame of the record is sampled audio
    with pytest.raises(ValueError, match="text ahead"):
        L.synthesize_forced_text(cfg, params, records, delay=2, temp=0.7, seed=0)


@pytest.mark.parametrize("delay", [-3, 0])
def test_forced_text_tts_audio_is_what_the_training_forward_predicts_on_the_training_layout(delay):
    """Greedy: every returned code is the argmax of the training forward's logits at its time, on the grid of
    the record's text (then PAD) and the returned audio with the training layout (the zero token before the
    text lead).
    Feeding samples before the lead, or cutting the frames one call off, breaks this."""
    from moshi_jax.data import pipeline
    from moshi_jax.lm import model as M

    cfg = LMConfig.tts_small()
    params = M.init_params(cfg, jax.random.key(1))
    rng = np.random.default_rng(1)
    F = 9
    records = [np.concatenate([rng.integers(0, 50, (1, F)), np.zeros((cfg.dep_q, F))]).astype(np.int32)
               for _ in range(2)]
    out = L.synthesize_forced_text(cfg, params, records, delay=delay, temp=0.0, seed=0)
    layout = pipeline._Layout(1, cfg.dep_q, delay)
    grid = np.stack([pipeline.to_model_grid(np.concatenate([r[:1], o]), "audio", 1, layout)
                     for r, o in zip(records, out, strict=True)])
    grid[:, 0, F:] = cfg.existing_text_padding_id  # after the record's text: PAD, as the engine feeds
    ref = M.forward(params, grid, cfg)
    lead = -delay
    pred = np.asarray(ref.audio_logits)[:, :, lead:lead + F].argmax(-1)  # [B, dep_q, F]
    # the grid ends with the record, so a delayed codebook's last frame has no training target
    mask = np.asarray(ref.audio_mask)[:, :, lead:lead + F]
    assert mask[:, 0].all() and mask.mean() > 0.9
    np.testing.assert_array_equal(np.where(mask, pred, -1), np.where(mask, np.stack(out), -1))


def test_report_shows_the_tts_wer_curve_as_a_table_and_a_figure_panel(tmp_path):
    import json

    run = tmp_path / "tts_run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"prefix": "train", "step": 1, "text_loss": 2.0, "audio_loss": 5.0},
        {"prefix": "eval", "step": 2, "text_loss": 1.5, "audio_loss": 4.0})) + "\n")
    dtw = {"utterances": 2, "tts_vs_codec_espeak_same_sentence": 7.0, "tts_vs_codec_espeak_other_sentence": 8.5,
           "codec_espeak_other_sentence": 7.7, "tts_vs_raw_espeak_same_sentence": 30.0}
    result = {"tts": {"run": str(run), "step": 2, "text_delay_frames": -4, "utterances": 2, "temperature": 0.7,
                      "wer_codes": 0.25, "wer_audio_espeak": 0.6, "dtw": dtw,
                      "curve": {"utterances": 2, "points": [{"step": 1, "wer_codes": 0.9},
                                                            {"step": 2, "wer_codes": 0.25}]}}}
    md = L._markdown(result)
    assert "| 1 | 90.0% |" in md and "| 2 | 25.0% |" in md and "text 4 frames ahead" in md
    assert "(ceiling) the same on the codec's decoding of eSpeak's codes: 60.0%" in md
    png = tmp_path / "curves.png"
    L._plot(result, png)
    import matplotlib.image

    h, w = matplotlib.image.imread(png).shape[:2]
    assert w > 1.8 * h  # two panels side by side: the WER curve and the losses
