"""Per-item sampling (runtime settings per batch row): each row draws from its own distribution with its own
key; the Rust server's repetition penalty."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.nn.sampling import (
    MAX_REPETITION_CONTEXT,
    ItemSampling,
    SamplingConfig,
    apply_repetition_penalty,
    kth_largest,
    sample_token_items,
    seed_key,
    split_item_keys,
    top_k_probs,
)

V = 12


@pytest.fixture
def logits():
    return jnp.asarray(np.random.default_rng(0).standard_normal((2, V)).astype(np.float32) * 2)


def _draws(logits, temp, top_k, n=6000, bias=None):
    """n draws of the whole batch, every draw with fresh per-item keys -> int [n, B]."""
    B = logits.shape[0]
    keys = jax.random.split(jax.random.PRNGKey(1), n * B).reshape(n, B, 2)
    f = jax.jit(jax.vmap(lambda k: sample_token_items(k, logits, jnp.asarray(temp), jnp.asarray(top_k), bias)))
    return np.asarray(f(keys))


def test_two_items_with_different_settings_sample_from_their_own_distributions(logits):
    temp, top_k = np.array([0.5, 1.5], np.float32), np.array([3, 0], np.int32)
    draws = _draws(logits, temp, top_k)
    for b in range(2):
        want = np.asarray(top_k_probs(logits[b], float(temp[b]), int(top_k[b])))
        got = np.bincount(draws[:, b], minlength=V) / len(draws)
        np.testing.assert_allclose(got, want, atol=0.025)
        assert np.all(got[want == 0] == 0)  # nothing outside the item's own top-k


def test_the_pad_bias_is_added_to_the_tempered_log_probs_per_item(logits):
    bias = jnp.zeros((2, V)).at[:, 4].set(jnp.asarray([2.0, 0.0]))
    temp, top_k = np.array([1.0, 1.0], np.float32), np.array([0, 0], np.int32)
    draws = _draws(logits, temp, top_k, bias=bias)
    for b in range(2):
        want = np.asarray(top_k_probs(logits[b], 1.0, 0, bias[b]))
        np.testing.assert_allclose(np.bincount(draws[:, b], minlength=V) / len(draws), want, atol=0.025)


def test_an_items_tokens_do_not_depend_on_its_neighbours_settings(logits):
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    a = sample_token_items(keys, logits, jnp.asarray([0.8, 0.0]), jnp.asarray([5, 1]))
    b = sample_token_items(keys, logits, jnp.asarray([0.8, 2.0]), jnp.asarray([5, 0]))
    c = sample_token_items(keys, logits.at[1].set(-logits[1]), jnp.asarray([0.8, 0.3]), jnp.asarray([5, 7]))
    assert int(a[0]) == int(b[0]) == int(c[0])


def test_temperature_zero_is_greedy_and_top_k_one_is_argmax(logits):
    keys = jax.random.split(jax.random.PRNGKey(4), 2)
    argmax = np.asarray(jnp.argmax(logits, -1))
    np.testing.assert_array_equal(sample_token_items(keys, logits, jnp.zeros(2), jnp.asarray([5, 0])), argmax)
    np.testing.assert_array_equal(sample_token_items(keys, logits, jnp.ones(2), jnp.ones(2, jnp.int32)), argmax)


def _rust_penalty(logits, history, context, penalty, special=()):
    """The Rust server's loop (lm_generate_multistream.rs apply_repetition_penalty), newest token first."""
    out = logits.copy()
    seen, counted = set(), 0
    for tok in history:
        if tok in special:
            continue
        if counted >= context:
            break
        counted += 1
        if tok in seen:
            continue
        seen.add(tok)
        out[tok] = out[tok] / penalty if out[tok] >= 0 else out[tok] * penalty
    return out


def test_repetition_penalty_matches_the_rust_servers_rule():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((3, V)).astype(np.float32)
    special = (3, 0)
    item = ItemSampling.create(3, SamplingConfig())
    histories = [rng.integers(0, V, 20).tolist() for _ in range(3)]
    for t in range(20):  # newest last in the history lists -> pushed oldest first
        item = item.remember_text(jnp.asarray([h[t] for h in histories], jnp.int32), special)
    context, penalty = np.array([0, 4, 64], np.int32), np.array([1.7, 1.7, 3.0], np.float32)
    got = np.asarray(apply_repetition_penalty(jnp.asarray(logits), item.recent_text, jnp.asarray(context),
                                              jnp.asarray(penalty)))
    for b in range(3):
        want = _rust_penalty(logits[b], histories[b][::-1], int(context[b]), float(penalty[b]), special)
        np.testing.assert_allclose(got[b], want, rtol=1e-6)
    np.testing.assert_array_equal(got[0], logits[0])  # context 0: off


def test_recent_text_skips_special_tokens_and_restart_forgets_it():
    item = ItemSampling.create(2, SamplingConfig())
    assert item.recent_text.shape == (2, MAX_REPETITION_CONTEXT)
    for tok in ([5, 3], [0, 7], [9, -1]):
        item = item.remember_text(jnp.asarray(tok, jnp.int32), special=(3, 0))
    assert np.asarray(item.recent_text[:, :3]).tolist() == [[9, 5, -1], [7, -1, -1]]
    item = item.restart(jnp.asarray([True, False]))
    assert np.all(np.asarray(item.recent_text[0]) == -1) and int(item.recent_text[1, 0]) == 7


def test_restart_returns_the_keys_to_their_seeds():
    item = ItemSampling.create(2, SamplingConfig()).replace(text_seed_key=jnp.asarray(np.stack([seed_key(9)] * 2)))
    _, nxt = split_item_keys(item.text_key)
    item = item.replace(text_key=nxt).restart(jnp.asarray([True, False]))
    np.testing.assert_array_equal(item.text_key[0], seed_key(9))
    np.testing.assert_array_equal(item.text_key[1], nxt[1])


def test_per_item_keys_split_independently():
    keys = jnp.asarray(np.stack([seed_key(1), seed_key(2)]))
    now, nxt = split_item_keys(keys)
    want = jax.random.split(jnp.asarray(seed_key(2)))
    np.testing.assert_array_equal(now[1], want[0])
    np.testing.assert_array_equal(nxt[1], want[1])


@pytest.mark.parametrize("ks", [(1, 25, 256, 300), (3, 256, 40, 40), (1000, 1, 2, 999), (1000, 25, 1000, 7)])
def test_kth_largest_equals_the_full_sort_whether_or_not_every_k_fits_the_fast_top_k(ks):
    rng = np.random.default_rng(1)
    logp = rng.standard_normal((4, 1000)).astype(np.float32)
    logp[0, :10] = logp[0, 10]  # ties: the k-th value is still one number
    logp[1, 5] = -np.inf
    k = np.array(ks, np.int32)
    want = np.sort(logp, axis=-1)[np.arange(4), 1000 - k][:, None]
    np.testing.assert_array_equal(np.asarray(jax.jit(kth_largest)(jnp.asarray(logp), jnp.asarray(k))), want)


def test_seed_key_is_jaxs_prng_key_of_the_64_bit_seed_and_refuses_seeds_outside_it():
    with jax.enable_x64(True):  # PRNGKey takes the whole 64-bit seed only with x64 on
        for s in (0, 5, 2**32, 2**40 + 7, 2**63 - 1):
            np.testing.assert_array_equal(seed_key(s), np.asarray(jax.random.PRNGKey(s)), err_msg=str(s))
    assert seed_key(2**64 - 1).tolist() == [2**32 - 1, 2**32 - 1] and seed_key(2**64 - 1).dtype == np.uint32
    # numpy and jax integers (a seed read from an array) give the Python int's key
    np.testing.assert_array_equal(seed_key(np.uint64(2**40 + 7)), seed_key(2**40 + 7))
    np.testing.assert_array_equal(seed_key(jnp.int32(7)), seed_key(7))
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
            seed_key(bad)


def test_create_gives_every_item_the_configs_settings_and_seeds_zero_to_b_minus_one():
    cfg = SamplingConfig(temp=0.6, top_k=40, temp_text=0.9, top_k_text=7)
    item = ItemSampling.create(3, cfg)
    np.testing.assert_allclose(item.text_temp, [0.9] * 3)
    np.testing.assert_allclose(item.audio_temp, [0.6] * 3)
    assert item.text_top_k.tolist() == [7] * 3 and item.audio_top_k.tolist() == [40] * 3
    assert item.repetition_penalty.tolist() == [1.0] * 3 and item.repetition_context.tolist() == [0] * 3
    for keys in (item.text_seed_key, item.audio_seed_key, item.text_key, item.audio_key):
        np.testing.assert_array_equal(keys, np.stack([seed_key(b) for b in range(3)]))
    greedy = ItemSampling.create(2, SamplingConfig.greedy())  # use_sampling off: every item greedy
    assert greedy.text_temp.tolist() == [0.0, 0.0] and greedy.audio_temp.tolist() == [0.0, 0.0]


def test_token_zero_is_remembered_and_penalised_like_any_other_non_special_token():
    item = ItemSampling.create(2, SamplingConfig()).remember_text(jnp.asarray([0, 4], jnp.int32), special=(3,))
    assert item.recent_text[:, 0].tolist() == [0, 4]
    logits = jnp.asarray([[2.0, 1.0, -1.0], [2.0, 1.0, -1.0]])
    recent = jnp.asarray([[0, -1], [-1, -1]], jnp.int32)
    got = apply_repetition_penalty(logits, recent, jnp.asarray([2, 2]), jnp.asarray([2.0, 2.0]))
    np.testing.assert_allclose(got, [[1.0, 1.0, -1.0], [2.0, 1.0, -1.0]])


def test_a_greedy_item_takes_the_argmax_of_logits_plus_its_bias(logits):
    keys = jax.random.split(jax.random.PRNGKey(6), 2)
    low = np.asarray(jnp.argmin(logits, -1))
    bias = jnp.zeros((2, V)).at[jnp.arange(2), low].set(100.0)  # pushes each row's least likely token to the top
    got = sample_token_items(keys, logits, jnp.zeros(2), jnp.zeros(2, jnp.int32), bias)
    np.testing.assert_array_equal(got, low)


def test_top_k_zero_negative_or_above_the_vocabulary_is_no_cut_in_a_vocabulary_above_the_fast_top_k():
    Vb = 1000  # > FAST_TOP_K: a cut read off the partial top-k would keep at most 256 tokens
    flat = jnp.asarray(np.linspace(0.0, 0.01, Vb, dtype=np.float32)[None].repeat(4, 0))  # nearly uniform
    draws = _draws(flat, np.ones(4, np.float32), np.array([0, -3, Vb + 5, 300], np.int32), n=2000)
    distinct = [len(np.unique(draws[:, b])) for b in range(4)]
    assert min(distinct[:3]) > 700, distinct  # ~866 distinct of 1000 expected from 2000 uniform draws
    assert 256 < distinct[3] <= 300 and draws[:, 3].min() >= Vb - 300, distinct  # a cut above the fast top-k
