"""Streaming generation: alignment with the training forward, batch independence, reset, ring buffer past
the context, sampling options, the wrapper. CPU, float32, tiny configs."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.lm import generate as G
from moshi_jax.lm import model as M
from moshi_jax.lm.config import LMConfig
from moshi_jax.nn.sampling import SamplingConfig
from tests.lm.test_model_parity import TEST_LM_KWARGS

GREEDY = SamplingConfig.greedy()
B, T = 2, 8  # most tests share these shapes (and greedy + logits), so the compiled `run` is reused


def _small_context_cfg(context: int) -> LMConfig:
    cfg = LMConfig.tiny()
    return dataclasses.replace(cfg, temporal=dataclasses.replace(cfg.temporal, context=context))


@pytest.fixture(scope="module")
def cfg() -> LMConfig:
    return _small_context_cfg(5)  # tiny Moshi layout, a 5-step window so tests run past it


def random_params(cfg: LMConfig, seed: int = 0):
    """Random float32 params of the right tree and shapes, filled in numpy (compiling `init` takes ~40 s on a
    busy 2-core machine; the values only need to give non-degenerate logits)."""
    shapes = nn.unbox(jax.eval_shape(lambda k: M.init_params(cfg, k), jax.random.PRNGKey(0)))
    r = np.random.default_rng(seed)

    def fill(path, leaf):
        if "alpha" in jax.tree_util.keystr(path):  # norm scales
            return (1.0 + 0.1 * r.standard_normal(leaf.shape)).astype(np.float32)
        width = cfg.dim if cfg.depth is None else cfg.depth.d_model
        return (r.standard_normal(leaf.shape) / np.sqrt(width)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def params(cfg):
    return random_params(cfg)


def _random_codes(cfg: LMConfig, B: int, T: int, seed: int = 0) -> np.ndarray:
    r = np.random.default_rng(seed)
    codes = r.integers(0, cfg.card, (B, cfg.num_streams, T)).astype(np.int32)
    codes[:, 0] = r.integers(0, cfg.text_card, (B, T))
    return codes


def _user(cfg: LMConfig, B: int, T: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.card, (B, cfg.n_q - cfg.dep_q, T)).astype(np.int32)


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def test_teacher_forced_streaming_equals_training_forward_past_the_context(cfg, params):
    """Spec 2.9: call s sees user <= s-1 and Moshi <= s-1; its text logits are the forward's at time s and
    codebook k's logits the forward's at time s - d_k. T = 14 runs well past the 5-step attention window."""
    T = 14
    codes = _random_codes(cfg, B, T)
    tf = G.teacher_forcing_inputs(cfg, codes)
    _, outs = G.run(params, G.init_gen_state(cfg, B), tf["user_codes"], None, cfg=cfg, sampling=GREEDY,
                    forced_text=tf["forced_text"], forced_audio=tf["forced_audio"], return_logits=True)
    ref = M.forward(params, codes, cfg)
    text_mask = np.asarray(ref.text_mask[:, 0])
    assert text_mask.all()
    assert _rel_err(np.asarray(outs.text_logits), np.asarray(ref.text_logits[:, 0])) < 1e-5
    for k in range(cfg.dep_q):
        d = cfg.delays[1 + k]
        stream = np.asarray(outs.audio_logits[:, k, d:])  # calls d..T-1 -> times 0..T-1-d
        train = np.asarray(ref.audio_logits[:, k, : T - d])
        assert np.asarray(ref.audio_mask[:, k, : T - d]).all()
        assert _rel_err(stream, train) < 1e-5, k
    # the emitted frames replay the codes one call late: call s returns the frame of time s - 1
    valid = np.asarray(outs.valid)
    assert not valid[:, 0].any() and valid[:, 1:].all()
    np.testing.assert_array_equal(np.asarray(outs.text)[:, 1:], codes[:, 0, :-1])
    np.testing.assert_array_equal(np.asarray(outs.audio)[:, :, 1:], codes[:, 1: 1 + cfg.dep_q, :-1])


def _greedy_run(params, cfg, user, state=None):
    state = G.init_gen_state(cfg, user.shape[0]) if state is None else state
    return G.run(params, state, user, None, cfg=cfg, sampling=GREEDY, return_logits=True)


def test_run_equals_repeated_step_and_first_call_is_not_valid(cfg, params):
    user = _user(cfg, B, T)
    _, outs = _greedy_run(params, cfg, user)
    state = G.init_gen_state(cfg, B)
    for t in range(T):
        state, out = G.step(params, state, user[:, :, t], None, cfg=cfg, sampling=GREEDY)
        assert bool(np.asarray(out.valid).all()) == (t > 0)
        np.testing.assert_array_equal(np.asarray(out.frame[:, 0]), np.asarray(outs.text)[:, t])
        np.testing.assert_array_equal(np.asarray(out.audio), np.asarray(outs.audio)[:, :, t])
    assert (np.asarray(outs.text)[:, 0] == -2).all()
    assert (np.asarray(outs.audio)[:, :, 1:] >= 0).all() and (np.asarray(outs.audio)[:, :, 1:] < cfg.card).all()


def test_batch_items_are_independent(cfg, params):
    user = _user(cfg, B, T, seed=3)
    _, outs = _greedy_run(params, cfg, user)
    for b in range(B):
        _, one = _greedy_run(params, cfg, user[b: b + 1])
        np.testing.assert_array_equal(np.asarray(one.sampled_text)[0], np.asarray(outs.sampled_text)[b])
        np.testing.assert_array_equal(np.asarray(one.sampled_audio)[0], np.asarray(outs.sampled_audio)[b])
        assert _rel_err(one.text_logits[0], outs.text_logits[b]) < 1e-5
        assert _rel_err(one.audio_logits[0], outs.audio_logits[b]) < 1e-5
    # different user input gives different generations (the test above could not pass vacuously)
    assert not np.array_equal(np.asarray(outs.text_logits[0]), np.asarray(outs.text_logits[1]))


def test_reset_restarts_only_the_masked_items(cfg, params):
    user = _user(cfg, B, 2 * T, seed=4)
    _, first = _greedy_run(params, cfg, user[:, :, :T])
    state, _ = _greedy_run(params, cfg, user[:, :, :T])
    _, straight = _greedy_run(params, cfg, user[:, :, T:], state)
    state = G.reset(state, np.array([True, False]))
    replay = np.concatenate([user[:1, :, :T], user[1:, :, T:]], axis=0)  # item 0 starts over
    _, after = _greedy_run(params, cfg, replay, state)
    # item 0 behaves like a fresh conversation (incl. "not valid" on its first call again)
    np.testing.assert_array_equal(np.asarray(after.valid)[0], np.asarray(first.valid)[0])
    np.testing.assert_array_equal(np.asarray(after.sampled_text)[0], np.asarray(first.sampled_text)[0])
    np.testing.assert_array_equal(np.asarray(after.audio)[0], np.asarray(first.audio)[0])
    assert _rel_err(after.text_logits[0], first.text_logits[0]) < 1e-5
    # item 1 continues as if nothing happened
    np.testing.assert_array_equal(np.asarray(after.sampled_text)[1], np.asarray(straight.sampled_text)[1])
    assert _rel_err(after.text_logits[1], straight.text_logits[1]) < 1e-5
    with pytest.raises(ValueError, match="reset mask"):
        G.reset(state, np.array([True]))


def test_a_reset_item_restarts_at_position_0_under_absolute_sinusoidal_positions(cfg, params):
    # RoPE only sees relative positions; a sinusoidal embedding adds the absolute one, so a reset item must
    # start again at position 0 to replay a fresh conversation.
    sin = dataclasses.replace(cfg, temporal=dataclasses.replace(cfg.temporal, positional_embedding="sin"))
    user = _user(sin, B, T, seed=5)
    _, first = _greedy_run(params, sin, user)
    state, _ = _greedy_run(params, sin, user[:, :, : T // 2])
    _, after = _greedy_run(params, sin, user, G.reset(state, np.array([True, True])))
    assert _rel_err(after.text_logits, first.text_logits) < 1e-5


def test_running_past_the_context_compiles_once_and_keeps_state_shapes(cfg, params):
    state = G.init_gen_state(cfg, B)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    user = _user(cfg, B, 3 * cfg.temporal.context)
    state, _ = G.step(params, state, user[:, :, 0], None, cfg=cfg, sampling=GREEDY)
    compiled = G.step._cache_size()
    for t in range(1, user.shape[-1]):
        state, _ = G.step(params, state, user[:, :, t], None, cfg=cfg, sampling=GREEDY)
    assert G.step._cache_size() == compiled
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes
    assert np.asarray(state.offsets).tolist() == [user.shape[-1]] * B
    # the ring holds exactly the last `context` absolute positions
    # (one ring per layer: generation reads each layer's ring in place)
    assert len(state.temporal.layers) == cfg.temporal.num_layers
    for cache in state.temporal.layers:
        pos = np.sort(np.asarray(cache.positions)[0])
        np.testing.assert_array_equal(pos, np.arange(user.shape[-1] - cfg.temporal.context, user.shape[-1]))


def test_top_1_sampling_equals_greedy(cfg, params):
    user = _user(cfg, B, T, seed=5)
    _, greedy = _greedy_run(params, cfg, user)
    top1 = SamplingConfig(temp=1.0, top_k=1, temp_text=1.0, top_k_text=1)
    _, s1 = G.run(params, G.init_gen_state(cfg, B), user, jax.random.PRNGKey(0), cfg=cfg, sampling=top1,
                  return_logits=True)
    np.testing.assert_array_equal(np.asarray(s1.sampled_text), np.asarray(greedy.sampled_text))
    np.testing.assert_array_equal(np.asarray(s1.sampled_audio), np.asarray(greedy.sampled_audio))


HOT = SamplingConfig(temp=3.0, top_k=4, temp_text=3.0, top_k_text=3)  # flat enough to use the whole top k


def _hot_run(params, cfg, user, key, state=None):
    state = G.init_gen_state(cfg, user.shape[0]) if state is None else state
    return G.run(params, state, user, jax.random.PRNGKey(key), cfg=cfg, sampling=HOT, return_logits=True)


def test_sampled_tokens_stay_in_the_top_k_and_depend_only_on_the_key(cfg, params):
    user = _user(cfg, B, T, seed=6)
    _, outs = _hot_run(params, cfg, user, 7)
    text_top = np.argsort(-np.asarray(outs.text_logits), axis=-1)[..., :HOT.top_k_text]  # [B, T, k]
    assert (text_top == np.asarray(outs.sampled_text)[..., None]).any(-1).all()
    audio_top = np.argsort(-np.asarray(outs.audio_logits), axis=-1)[..., :HOT.top_k]  # [B, dep_q, T, k]
    assert (audio_top == np.asarray(outs.sampled_audio)[..., None]).any(-1).all()
    # not greedy: some draws are not the argmax; another key draws differently, the same key identically
    assert (audio_top[..., 0] != np.asarray(outs.sampled_audio)).any()
    _, other = _hot_run(params, cfg, user, 8)
    _, again = _hot_run(params, cfg, user, 7)
    assert not np.array_equal(np.asarray(other.sampled_audio), np.asarray(outs.sampled_audio))
    np.testing.assert_array_equal(np.asarray(again.sampled_audio), np.asarray(outs.sampled_audio))


def test_pad_bias_per_item_pushes_text_to_pad(cfg, params):
    user = _user(cfg, B, T, seed=8)
    state = G.set_pad_bias(G.init_gen_state(cfg, B), np.array([100.0, 0.0]))
    _, outs = _hot_run(params, cfg, user, 0, state)
    text = np.asarray(outs.sampled_text)
    assert (text[0] == cfg.existing_text_padding_id).all()  # PAD enters the top k and dominates
    assert (text[1] != cfg.existing_text_padding_id).any()


def test_bad_user_codes_shape_is_a_clear_error(cfg, params):
    state = G.init_gen_state(cfg, B)
    with pytest.raises(ValueError, match="user_codes must be"):
        G.step(params, state, np.zeros((B, 3), np.int32), None, cfg=cfg, sampling=GREEDY)
    with pytest.raises(ValueError, match="batch_size"):
        G.init_gen_state(cfg, 0)


def test_teacher_forcing_codes_with_another_stream_count_are_a_clear_error(cfg):
    codes = _random_codes(cfg, B, 4)
    n = cfg.num_streams
    with pytest.raises(ValueError, match=f"codes must have 1 \\+ n_q = {n} streams, got {n - 1}"):
        G.teacher_forcing_inputs(cfg, codes[:, :-1])


def test_a_step_returns_logits_only_when_asked(cfg, params):
    user = np.zeros((B, cfg.n_q - cfg.dep_q), np.int32)
    _, out = G.step(params, G.init_gen_state(cfg, B), user, None, cfg=cfg, sampling=GREEDY)
    assert out.text_logits is None and out.audio_logits is None  # no [B, card] arrays kept for nothing
    _, out = G.step(params, G.init_gen_state(cfg, B), user, None, cfg=cfg, sampling=GREEDY, return_logits=True)
    assert out.text_logits.shape == (B, cfg.text_out) and out.audio_logits.shape == (B, cfg.dep_q, cfg.card)
    frames = _user(cfg, B, 3)  # 3 frames (not the number of user codebooks): one key per frame
    _, out = G.run(params, G.init_gen_state(cfg, B), frames, jax.random.PRNGKey(0), cfg=cfg, sampling=GREEDY)
    assert out.text_logits is None and out.sampled_text.shape == (B, 3)


def test_a_state_made_for_another_config_is_a_clear_error(cfg, params):
    # a token cache one column short (another LMConfig's max delay): refused by name, not indexed modulo its size
    state = G.init_gen_state(cfg, B)
    short = state.replace(cache=state.cache[:, :, :-1])
    with pytest.raises(ValueError, match="does not match this LMConfig"):
        G.step(params, short, np.zeros((B, cfg.n_q - cfg.dep_q), np.int32), None, cfg=cfg, sampling=GREEDY)


def test_lmgen_wrapper_returns_none_first_then_aligned_frames(cfg, params):
    user = _user(cfg, B, T, seed=9)
    _, outs = _greedy_run(params, cfg, user)
    gen = G.LMGen(params, cfg, GREEDY, batch_size=B)
    assert gen.step(user[:, :, 0]) is None
    for t in range(1, T):
        frame = gen.step(user[:, :, t])
        assert frame.shape == (B, 1 + cfg.dep_q)
        np.testing.assert_array_equal(frame[:, 0], np.asarray(outs.text)[:, t])
        np.testing.assert_array_equal(frame[:, 1:], np.asarray(outs.audio)[:, :, t])
    gen.reset(np.array([False, True]))
    frame = gen.step(user[:, :, 0])
    assert (frame[1] == -2).all() and (frame[0] >= 0).all()


def test_bf16_generation_stays_close_to_float32(cfg, params):
    """bf16 weights, activations and KV cache (logits, softmax and sampling stay float32): teacher-forced so
    both see the same tokens; the logit drift is reported and bounded."""
    T = 14  # the teacher-forced test's shapes: the float32 run is already compiled
    codes = _random_codes(cfg, B, T, seed=11)
    tf = G.teacher_forcing_inputs(cfg, codes)
    cfg16 = cfg.with_dtypes("bfloat16", "bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    outs = {}
    for name, c, p in (("f32", cfg, params), ("bf16", cfg16, params16)):
        state = G.init_gen_state(c, B)
        _, outs[name] = G.run(p, state, tf["user_codes"], None, cfg=c, sampling=GREEDY, forced_text=tf["forced_text"],
                              forced_audio=tf["forced_audio"], return_logits=True)
    assert all(c.keys.dtype == jnp.bfloat16 for c in G.init_gen_state(cfg16, B).temporal.layers)
    assert outs["bf16"].text_logits.dtype == jnp.float32 and outs["bf16"].audio_logits.dtype == jnp.float32
    # audio from call max_delay on: before that the acoustic tokens of "time -1" are sampled, not forced,
    # so the two runs may pick different ones
    drift = {"text": _rel_err(outs["bf16"].text_logits, outs["f32"].text_logits),
             "audio": _rel_err(outs["bf16"].audio_logits[:, :, cfg.max_delay:],
                               outs["f32"].audio_logits[:, :, cfg.max_delay:])}
    print(f"bf16 vs float32 streaming logit drift (relative to max |logit|): {drift}")
    assert 0 < drift["text"] < 0.05 and 0 < drift["audio"] < 0.05, drift


def test_user_frames_with_more_codebooks_than_the_lm_reads_give_the_same_tokens(cfg, params):
    # a Mimi frame may carry more codebooks than the LM's user streams: the extra ones are ignored
    user = _user(cfg, B, T, seed=13)
    extra = np.concatenate([user, np.random.default_rng(14).integers(0, cfg.card, (B, 2, T)).astype(np.int32)], 1)
    _, want = _greedy_run(params, cfg, user)
    _, got = _greedy_run(params, cfg, extra)
    np.testing.assert_array_equal(np.asarray(got.sampled_text), np.asarray(want.sampled_text))
    np.testing.assert_array_equal(np.asarray(got.sampled_audio), np.asarray(want.sampled_audio))


def test_a_text_only_lm_streams_text_frames_with_empty_audio():
    cfg = LMConfig.from_reference_kwargs({**TEST_LM_KWARGS, "dep_q": 0, "depformer_weights_per_step_schedule": None})
    user = np.random.default_rng(12).integers(0, cfg.card, (B, cfg.n_q, T)).astype(np.int32)
    _, outs = G.run(random_params(cfg), G.init_gen_state(cfg, B), user, None, cfg=cfg, sampling=GREEDY,
                    return_logits=True)
    assert outs.audio.shape == outs.sampled_audio.shape == (B, 0, T)
    assert outs.audio_logits.shape == (B, 0, T, cfg.card) and outs.audio_logits.dtype == jnp.float32
    text = np.asarray(outs.sampled_text)
    np.testing.assert_array_equal(text, np.asarray(outs.text_logits).argmax(-1))
    d = cfg.max_delay  # the text of call s comes out, time-aligned, max_delay calls later
    valid = np.asarray(outs.valid)
    assert not valid[:, :d].any() and valid[:, d:].all()
    np.testing.assert_array_equal(np.asarray(outs.text)[:, d:], text[:, : T - d])


def test_lmgen_made_without_options_has_one_item_seed_0_and_no_pad_bias(cfg, params):
    assert G.LMGen(params, cfg, GREEDY).state.offsets.shape == (1,)
    gen = G.LMGen(params, cfg, GREEDY, batch_size=B)
    np.testing.assert_array_equal(np.asarray(gen.state.pad_bias), np.zeros(B, np.float32))
    seeded = G.LMGen(params, cfg, GREEDY, batch_size=B, seed=0)
    np.testing.assert_array_equal(np.asarray(gen.rng), np.asarray(seeded.rng))


def test_teacher_forcing_replays_token_0_like_any_other_token(cfg, params):
    # 0 is a real id (EPAD for text, a codebook entry for audio): forcing it must not fall back to sampling
    codes = _random_codes(cfg, B, T, seed=15)
    codes[:, :, 1::2] = 0
    tf = G.teacher_forcing_inputs(cfg, codes)
    _, outs = G.run(params, G.init_gen_state(cfg, B), tf["user_codes"], None, cfg=cfg, sampling=GREEDY,
                    forced_text=tf["forced_text"], forced_audio=tf["forced_audio"])
    np.testing.assert_array_equal(np.asarray(outs.text)[:, 1:], codes[:, 0, :-1])
    np.testing.assert_array_equal(np.asarray(outs.audio)[:, :, 1:], codes[:, 1: 1 + cfg.dep_q, :-1])
