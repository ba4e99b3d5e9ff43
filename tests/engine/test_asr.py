"""Streaming ASR mode: the input audio fed as the model's own voice (Moshi layout, teacher-forced) or as the
input streams of a depformer-less STT model, text lagging the audio by `text_delay_frames`. Checked against
the LM's training forward on the grid the data pipeline builds for this layout and delay (greedy: each text
token the engine emits is the forward's argmax given the audio and the engine's own earlier text)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from moshi_jax.data import pipeline
from moshi_jax.data.tokenize import calibrate_codebooks
from moshi_jax.engine.engine import Engine, EngineConfig, preset_configs, random_lm_params
from moshi_jax.lm import model as M
from moshi_jax.lm.config import TINY_KWARGS, LMConfig
from moshi_jax.nn.sampling import SamplingConfig

DELAY = 3
N = 12


def _stt_config(card: int) -> LMConfig:
    """A tiny depformer-less STT-shaped LM (DSM layout: 8 input audio streams, all delays 0)."""
    kw = {k: v for k, v in TINY_KWARGS.items() if not k.startswith("depformer")}
    kw.update(n_q=8, dep_q=0, card=card, delays=[0] * 9)
    return LMConfig.from_reference_kwargs(kw)


def _make(lm_cfg=None, seed=0):
    mimi_cfg, tiny_lm = preset_configs("tiny")
    lm_cfg = lm_cfg or tiny_lm
    cfg = EngineConfig(mode="asr", sampling=SamplingConfig.greedy(), text_delay_frames=DELAY)
    engine = Engine(mimi_cfg, lm_cfg, cfg)
    params = {"mimi": engine.codec.init(jax.random.PRNGKey(seed)), "lm": random_lm_params(lm_cfg, seed + 1)}
    return engine, params


def _audio(B: int, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal((B, N * 1920))).astype(np.float32)


def _run(engine, params, wav):
    B = wav.shape[0]
    state = engine.init_state(B)
    outs = []
    for i in range(N):
        state, out = engine.step(params, state, wav[:, i * 1920:(i + 1) * 1920], np.ones(B, bool))
        outs.append(jax.device_get(out))
    return outs


def _check_against_forward(engine, params, wav, outs):
    lm = engine.lm_cfg
    B = wav.shape[0]
    codes = np.asarray(engine.codec.encode_stream(params["mimi"], wav[:, None], engine.num_codebooks))  # [B, K, N]
    text = np.stack([o.text_token for o in outs], axis=1)  # [B, N]: text of audio frame s - DELAY
    valid = np.stack([o.valid for o in outs], axis=1)
    assert not valid[:, :DELAY].any() and valid[:, DELAY:].all()
    assert (text[:, :DELAY] == -1).all() and (text[:, DELAY:] >= 0).all()
    channels, per_channel = pipeline.stream_layout(lm)
    layout = pipeline._Layout(channels, per_channel, DELAY)
    for b in range(B):
        # a mono record: text row (what was said at audio frame j) + the audio codes
        record = np.concatenate([text[b, DELAY:][None], codes[b, :, :N - DELAY]], axis=0)
        grid = pipeline.to_model_grid(record, "audio", 1, layout)  # [1 + n_q, N]: text lags by DELAY
        assert grid.shape == (lm.num_streams, N)
        # the engine saw the whole audio; the grid is cut at the record's end -> restore the audio columns
        grid[1:1 + codes.shape[1], :] = codes[b]
        logits = M.forward(params["lm"], grid[None], lm).text_logits[0, 0]  # [N, text_card]
        np.testing.assert_array_equal(np.asarray(logits.argmax(-1))[DELAY:], text[b, DELAY:])


@pytest.fixture(scope="module")
def moshi_layout():
    return _make()


def test_asr_text_is_the_forward_argmax_moshi_layout(moshi_layout):
    engine, params = moshi_layout
    assert engine.num_codebooks == engine.lm_cfg.dep_q  # the input is Moshi's own voice streams
    wav = _audio(2, 0)
    outs = _run(engine, params, wav)
    _check_against_forward(engine, params, wav, outs)
    assert all(not o.audio_valid.any() and (o.pcm == 0).all() for o in outs)  # ASR does not speak
    assert engine.step._cache_size() == 1


def test_asr_text_is_the_forward_argmax_stt_layout():
    mimi_cfg, _ = preset_configs("tiny")
    engine, params = _make(_stt_config(mimi_cfg.bins), seed=5)
    assert engine.num_codebooks == 8 and engine.lm_cfg.dep_q == 0
    # loudness that changes per frame, and codebooks fitted to this audio (as `data tokenize` does): codes that
    # vary from frame to frame, so feeding a frame early or late changes the transcript (an unfitted random
    # Mimi gives near-constant codes, which hid a one-frame offset)
    rng = np.random.default_rng(1)
    wav = (_audio(1, 1) * np.repeat(rng.uniform(0.05, 1.0, N), 1920)[None]).astype(np.float32)
    params["mimi"] = calibrate_codebooks(engine.codec, params["mimi"], wav[:, None])
    codes = np.asarray(engine.codec.encode_stream(params["mimi"], wav[:, None], engine.num_codebooks))
    assert (np.diff(codes[0], axis=-1) != 0).any(axis=0).sum() >= 2  # the codes change between frames
    _check_against_forward(engine, params, wav, _run(engine, params, wav))


def test_asr_items_are_independent(moshi_layout):
    engine, params = moshi_layout
    wav = _audio(2, 2)
    ref = _run(engine, params, wav)
    wav2 = wav.copy()
    wav2[0] = _audio(1, 3)[0]
    got = _run(engine, params, wav2)
    assert all(np.array_equal(a.text_token[1], b.text_token[1]) for a, b in zip(ref, got, strict=True))


def test_dialogue_and_tts_need_a_speaking_model():
    mimi_cfg, _ = preset_configs("tiny")
    stt = _stt_config(mimi_cfg.bins)
    with pytest.raises(ValueError, match="dep_q > 0"):
        Engine(mimi_cfg, stt, EngineConfig(mode="dialogue"))
    with pytest.raises(ValueError, match="depth transformer"):
        Engine(mimi_cfg, stt, EngineConfig(mode="tts"))
    with pytest.raises(ValueError, match="exceeds the Mimi codebook size"):
        Engine(mimi_cfg, dataclasses.replace(stt, card=mimi_cfg.bins * 2), EngineConfig(mode="asr"))
