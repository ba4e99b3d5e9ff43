"""Per-item sampling inside the one compiled streaming step (GenState.items): each item samples with its own
runtime settings and seed, independently of its neighbours; seeds make it reproducible; no recompilation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.lm import generate as G
from moshi_jax.nn.sampling import SamplingConfig, seed_key
from tests.lm.test_generate import _small_context_cfg, _user, random_params

B, T = 3, 8


@pytest.fixture(scope="module")
def cfg():
    return _small_context_cfg(5)


@pytest.fixture(scope="module")
def params(cfg):
    return G.prepare_streaming_params(random_params(cfg), cfg)


def _state(cfg, settings: dict[int, dict]):
    """A fresh per-item state; settings[b] = ItemSampling fields for item b (seeds as ints)."""
    state = G.init_gen_state(cfg, B, item_sampling=SamplingConfig())
    for b, values in settings.items():
        values = dict(values)
        for k in ("text_seed", "audio_seed"):
            if k in values:
                values[k + "_key"] = seed_key(values.pop(k))
        state = G.set_item_sampling(state, np.arange(B) == b, **values)
    return G.reset(state, np.ones(B, bool))  # keys start from the seeds


def _run(params, cfg, state, user):
    return G.run(params, state, jnp.asarray(user), jax.random.PRNGKey(0), cfg=cfg, sampling=SamplingConfig(),
                 return_logits=True)


MINE = {"text_temp": 0.9, "text_top_k": 7, "audio_temp": 1.1, "audio_top_k": 20, "repetition_penalty": 1.5,
        "repetition_context": 8, "text_seed": 11, "audio_seed": 12}


def test_an_items_tokens_do_not_depend_on_its_neighbours_settings_or_inputs(cfg, params):
    user_a, user_b = _user(cfg, B, T, seed=1), _user(cfg, B, T, seed=2)
    user_b[0] = user_a[0]
    a = _run(params, cfg, _state(cfg, {0: MINE, 1: {"text_temp": 0.0, "audio_temp": 0.0}}), user_a)[1]
    b = _run(params, cfg, _state(cfg, {0: MINE, 1: {"text_temp": 3.0, "text_top_k": 0, "text_seed": 99},
                                       2: {"repetition_penalty": 4.0, "repetition_context": 256,
                                           "audio_top_k": 1, "audio_seed": 5}}), user_b)[1]
    np.testing.assert_array_equal(a.sampled_text[0], b.sampled_text[0])
    np.testing.assert_array_equal(a.sampled_audio[0], b.sampled_audio[0])
    assert not np.array_equal(a.sampled_text[1:], b.sampled_text[1:])  # the neighbours did change


def test_the_same_seed_and_settings_give_the_same_tokens_in_any_slot(cfg, params):
    user = _user(cfg, B, T, seed=3)
    user_moved = user.copy()
    user_moved[2] = user[0]
    a = _run(params, cfg, _state(cfg, {0: MINE}), user)[1]
    b = _run(params, cfg, _state(cfg, {2: MINE}), user_moved)[1]
    np.testing.assert_array_equal(a.sampled_text[0], b.sampled_text[2])
    np.testing.assert_array_equal(a.sampled_audio[0], b.sampled_audio[2])
    c = _run(params, cfg, _state(cfg, {0: {**MINE, "text_seed": 13}}), user)[1]
    assert not np.array_equal(a.sampled_text[0], c.sampled_text[0])  # another seed, another conversation


def test_items_sample_from_their_own_distributions_within_one_step(cfg, params):
    user = _user(cfg, B, T, seed=4)
    settings = {0: {"text_temp": 0.0, "audio_temp": 0.0},  # greedy
                1: {"text_temp": 1.0, "text_top_k": 2, "audio_temp": 1.0, "audio_top_k": 3},
                2: {"text_temp": 5.0, "text_top_k": 0, "audio_temp": 5.0, "audio_top_k": 0}}
    out = _run(params, cfg, _state(cfg, settings), user)[1]
    text, audio = np.asarray(out.sampled_text), np.asarray(out.sampled_audio)  # [B, T], [B, dep_q, T]
    tl, al = np.asarray(out.text_logits), np.asarray(out.audio_logits)  # [B, T, V], [B, dep_q, T, card]
    np.testing.assert_array_equal(text[0], tl[0].argmax(-1))
    np.testing.assert_array_equal(audio[0], al[0].argmax(-1))
    rank_text = (tl[1] > np.take_along_axis(tl[1], text[1][:, None], -1)).sum(-1)  # tokens ranked above the draw
    rank_audio = (al[1] > np.take_along_axis(al[1], audio[1][..., None], -1)).sum(-1)
    assert rank_text.max() < 2 and rank_audio.max() < 3
    rank_hot = (al[2] > np.take_along_axis(al[2], audio[2][..., None], -1)).sum(-1)
    assert rank_hot.max() >= 3  # temperature 5 without a cut reaches far down the distribution


def test_the_repetition_penalty_is_applied_to_the_items_own_recent_text(cfg, params):
    user = _user(cfg, B, T, seed=5)
    penalty, context = 50.0, 4
    out = _run(params, cfg, _state(cfg, {1: {"text_temp": 0.0, "repetition_penalty": penalty,
                                             "repetition_context": context}}), user)[1]
    text, logits = np.asarray(out.sampled_text[1]), np.asarray(out.text_logits[1])
    special = {cfg.existing_text_padding_id, cfg.existing_text_end_padding_id, cfg.text_initial_token_id}
    recent: list[int] = []  # newest first, specials skipped (the Rust server's rule)
    for t in range(T):
        lg = logits[t].copy()
        for tok in set(recent[:context]):
            lg[tok] = lg[tok] / penalty if lg[tok] >= 0 else lg[tok] * penalty
        assert text[t] == lg.argmax(), t
        if int(text[t]) not in special:
            recent.insert(0, int(text[t]))
    assert len(set(recent)) > 1


def test_reset_restarts_an_items_random_streams_from_its_seeds(cfg, params):
    user = _user(cfg, B, T, seed=6)
    state, first = _run(params, cfg, _state(cfg, {1: MINE}), user)
    state = G.reset(state, np.arange(B) == 1)
    _, again = _run(params, cfg, state, user)
    np.testing.assert_array_equal(first.sampled_text[1], again.sampled_text[1])
    np.testing.assert_array_equal(first.sampled_audio[1], again.sampled_audio[1])


def test_changing_settings_never_recompiles_the_step(cfg, params):
    state = _state(cfg, {})
    user = jnp.asarray(_user(cfg, B, 1, seed=7)[:, :, 0])
    state, _ = G.step(params, state, user, None, cfg=cfg)
    compiled = G.step._cache_size()
    for values in ({"text_temp": 0.1, "text_top_k": 3}, {"repetition_penalty": 2.0, "audio_seed_key": seed_key(3)}):
        state = G.set_item_sampling(state, np.arange(B) == 0, **values)
        state, _ = G.step(params, state, user, None, cfg=cfg)
    assert G.step._cache_size() == compiled


def test_per_item_settings_need_a_per_item_state(cfg):
    with pytest.raises(ValueError, match="no per-item sampling"):
        G.set_item_sampling(G.init_gen_state(cfg, B), np.ones(B, bool), text_temp=0.5)
