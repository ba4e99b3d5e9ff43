"""Dialogue engine on tiny configs: shapes, compile-once, per-item pause / reset independence, running past the
attention contexts, PAD bias, and that one engine step is exactly Mimi encode + LM generation + Mimi decode
composed the way the reference server does it (first frame encoded then Mimi reset; decode only valid frames)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.engine.engine import Engine, EngineConfig, preset_configs, random_lm_params
from moshi_jax.lm import generate as G
from moshi_jax.nn.sampling import SamplingConfig

B = 2
FS = 1920
LM_CONTEXT = 8  # the LM's KV ring holds 8 frames; Mimi tiny's transformer window is 6 steps = 3 frames


@pytest.fixture(scope="module")
def engine_and_params():
    mimi_cfg, lm_cfg = preset_configs("tiny")
    lm_cfg = dataclasses.replace(lm_cfg, temporal=dataclasses.replace(lm_cfg.temporal, context=LM_CONTEXT))
    engine = Engine(mimi_cfg, lm_cfg, EngineConfig(mode="dialogue"))  # reference sampling defaults
    params = {"mimi": engine.codec.init(jax.random.PRNGKey(1)), "lm": random_lm_params(lm_cfg, 2)}
    return engine, params


def _pcm(n: int, seed: int) -> np.ndarray:
    """[n, B, 1920] speech-like random input."""
    return (0.1 * np.random.default_rng(seed).standard_normal((n, B, FS))).astype(np.float32)


def _run(engine, params, state, pcm, active=None, resets=None):
    """Step through frames; `active[i]` / `resets[i]` ([B] bool) per frame. Returns (state, list of outputs)."""
    outs = []
    for i in range(len(pcm)):
        if resets is not None and resets[i] is not None:
            state = engine.reset(state, resets[i])
        a = np.ones(B, bool) if active is None or active[i] is None else active[i]
        state, out = engine.step(params, state, pcm[i], a)
        outs.append(jax.device_get(out))
    return state, outs


def _item(outs, b, field):
    return np.stack([getattr(o, field)[b] for o in outs])


def test_step_shapes_warmup_and_one_compile_past_the_contexts(engine_and_params):
    engine, params = engine_and_params
    state = engine.init_state(B)
    shapes0 = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    n = 3 * LM_CONTEXT  # well past the LM ring (8 frames) and Mimi's window (3 frames)
    state, outs = _run(engine, params, state, _pcm(n, 0))
    o = outs[0]
    assert o.pcm.shape == (B, FS) and o.pcm.dtype == np.float32
    assert o.text_token.shape == (B,) and o.text_token.dtype == np.int32
    assert o.codes.shape == (B, engine.lm_cfg.dep_q)
    # reference alignment: the first frame gives nothing, every later frame one Moshi frame
    assert not o.valid.any() and (o.text_token == -1).all() and (o.pcm == 0).all()
    assert all(x.valid.all() and x.audio_valid.all() for x in outs[1:])
    assert np.array_equal(_item(outs, 0, "frame"), np.arange(n))
    late = np.stack([x.pcm for x in outs[-4:]])
    assert np.isfinite(late).all() and np.abs(late).max() > 0
    codes = np.stack([x.codes for x in outs[1:]])
    assert codes.min() >= 0 and codes.max() < engine.lm_cfg.card
    text = np.stack([x.text_token for x in outs[1:]])
    assert text.min() >= 0 and text.max() < engine.lm_cfg.text_card
    # constant memory: the state keeps its shapes; and one compiled step for the whole run, resets and pauses
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes0
    state = engine.reset(state, np.array([True, False]))
    state, _ = engine.step(params, state, _pcm(1, 1)[0], np.array([False, True]))
    state = engine.set_pad_bias(state, np.array([0.5, -0.5], np.float32))
    engine.step(params, state, _pcm(1, 2)[0], np.array([True, True]))
    assert engine.step._cache_size() == 1


def test_item1_outputs_do_not_depend_on_item0_reset_pause_or_input(engine_and_params):
    engine, params = engine_and_params
    n = 12
    pcm = _pcm(n, 3)
    _, ref = _run(engine, params, engine.init_state(B), pcm)
    other = pcm.copy()
    other[:, 0] = _pcm(n, 4)[:, 0]  # item 0 hears something else
    active = [None] * n
    resets = [None] * n
    resets[4] = np.array([True, False])
    active[6] = active[7] = np.array([False, True])
    resets[10] = np.array([True, False])
    _, got = _run(engine, params, engine.init_state(B), other, active, resets)
    for field in ("text_token", "pcm", "codes", "valid"):
        assert np.array_equal(_item(got, 1, field), _item(ref, 1, field)), field
    # item 0 did see those events: paused frames are invalid, a reset restarts its warm-up
    assert not got[6].valid[0] and not got[7].valid[0] and got[6].frame[0] == -1
    assert got[4].frame[0] == 0 and not got[4].valid[0] and got[5].valid[0]


def test_paused_item_state_is_frozen(engine_and_params):
    engine, params = engine_and_params
    state, _ = _run(engine, params, engine.init_state(B), _pcm(5, 5))
    before = jax.device_get(state)
    state, out = engine.step(params, state, _pcm(1, 6)[0], np.array([False, True]))
    after = jax.device_get(state)
    assert not out.valid[0] and not out.audio_valid[0] and (np.asarray(out.pcm[0]) == 0).all()
    axes = engine._axes
    leaves = zip(jax.tree.leaves(axes), jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    changed1 = False
    for ax, x, y in leaves:
        if ax < 0:
            continue
        assert np.array_equal(np.take(x, 0, axis=ax), np.take(y, 0, axis=ax))
        changed1 |= not np.array_equal(np.take(x, 1, axis=ax), np.take(y, 1, axis=ax))
    assert changed1  # the active item did move on


def test_paused_item_resumes_exactly_as_if_never_paused_past_the_context(engine_and_params):
    """The paused frames' KV writes are left in the rings (only positions / offsets are restored): the resumed
    conversation must not see them. Same keys from the resume on, so the outputs must match bit for bit."""
    engine, params = engine_and_params
    pre, post = LM_CONTEXT + 2, 5  # the rings are full and wrapping when the pause happens
    pcm = _pcm(pre + post, 11)
    state, _ = _run(engine, params, engine.init_state(B), pcm[:pre])
    paused = state
    for i in range(2):  # item 0 paused while hearing something else
        paused, _ = engine.step(params, paused, _pcm(1, 20 + i)[0], np.array([False, True]))
    _, resumed = _run(engine, params, paused, pcm[pre:])
    _, straight = _run(engine, params, state.replace(rng=paused.rng), pcm[pre:])
    for field in ("text_token", "pcm", "codes", "frame"):
        assert np.array_equal(_item(resumed, 0, field), _item(straight, 0, field)), field


def test_reset_item_continues_like_a_fresh_conversation(engine_and_params):
    engine, params = engine_and_params
    state, _ = _run(engine, params, engine.init_state(B), _pcm(7, 7))
    state = engine.reset(state, np.array([True, False]))
    pcm = _pcm(6, 8)
    _, after_reset = _run(engine, params, state, pcm)
    fresh = engine.init_state(B).replace(rng=state.rng)  # same key stream from here on
    _, from_fresh = _run(engine, params, fresh, pcm)
    for field in ("text_token", "pcm", "codes", "valid", "frame"):
        assert np.array_equal(_item(after_reset, 0, field), _item(from_fresh, 0, field)), field


def test_engine_step_equals_mimi_encode_lm_step_mimi_decode_by_hand(engine_and_params):
    """The reference server loop, written out with the codec and LM generation APIs (same keys)."""
    engine, params = engine_and_params
    codec, lm_cfg = engine.codec, engine.lm_cfg
    n = 7
    pcm = _pcm(n, 9)
    state = engine.init_state(B)
    _, outs = _run(engine, params, state, pcm)

    mimi = codec.init_state(B, lm_cfg.n_q - lm_cfg.dep_q)
    gstate = G.init_gen_state(lm_cfg, B)
    rng = state.rng
    for i in range(n):
        mimi, codes = codec.encode_step(params["mimi"], mimi, pcm[i][:, None, :])
        if i == 0:  # server.py: first frame encoded, then Mimi reset
            mimi = codec.reset(mimi, np.ones(B, bool))
        rng, key = jax.random.split(rng)
        gstate, out = G.step(params["lm"], gstate, codes[:, :, 0], key, cfg=lm_cfg, sampling=engine.cfg.sampling)
        o = outs[i]
        assert np.array_equal(np.asarray(out.valid), o.valid)
        if not np.asarray(out.valid).any():
            continue
        assert np.array_equal(np.asarray(out.text), o.text_token)
        assert np.array_equal(np.asarray(out.audio), o.codes)
        mimi, wav = codec.decode_step(params["mimi"], mimi, out.audio[:, :, None])
        np.testing.assert_allclose(o.pcm, np.asarray(wav[:, 0]), rtol=1e-5, atol=1e-6)


def test_runtime_pad_bias_pushes_text_to_pad_without_recompiling(engine_and_params):
    engine, params = engine_and_params
    state = engine.set_pad_bias(engine.init_state(B), np.array([1e4, 0.0], np.float32))
    _, outs = _run(engine, params, state, _pcm(5, 10))
    text = np.stack([o.text_token for o in outs[1:]])
    assert (text[:, 0] == engine.lm_cfg.existing_text_padding_id).all()
    assert (text[:, 1] != engine.lm_cfg.existing_text_padding_id).any()
    assert all(engine.text_piece(t) is None for t in text[:, 0])
    assert engine.step._cache_size() == 1


def test_text_piece_hides_pad_epad_and_invalid(engine_and_params):
    engine, _ = engine_and_params
    assert engine.text_piece(3) is None and engine.text_piece(0) is None and engine.text_piece(-1) is None
    assert engine.text_piece(17) == "<17>"  # no tokenizer: the id


def test_bad_inputs_and_configs_raise_clear_errors(engine_and_params):
    engine, _ = engine_and_params
    state = engine.init_state(B)
    with pytest.raises(ValueError, match="user_pcm must be"):
        engine.check_inputs(state, np.zeros((B, 100), np.float32), np.ones(B, bool))
    with pytest.raises(ValueError, match="active must be"):
        engine.check_inputs(state, np.zeros((B, FS), np.float32), np.ones(B + 1, bool))
    with pytest.raises(ValueError, match="reset mask"):
        engine.reset(state, np.ones(3, bool))
    with pytest.raises(ValueError, match="mode must be one of"):
        EngineConfig(mode="karaoke")
    with pytest.raises(ValueError, match="text_delay_frames >= 0"):
        EngineConfig(mode="asr", text_delay_frames=-1)
    with pytest.raises(ValueError, match="text_delay_frames must be 0"):
        EngineConfig(mode="dialogue", text_delay_frames=2)
    with pytest.raises(ValueError, match="load_text is for mode 'tts'"):
        engine.load_text(state, 0, "hello")
    with pytest.raises(ValueError, match="batch_size"):
        engine.init_state(0)
    with pytest.raises(TypeError, match="SamplingConfig"):
        EngineConfig(sampling={"temp": 1.0})
    assert isinstance(engine.cfg.sampling, SamplingConfig) and engine.cfg.sampling == SamplingConfig()
    assert jnp.asarray(engine.init_state(1).frame).shape == (1,)
