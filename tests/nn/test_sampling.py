"""Sampling: greedy = argmax, top-k support, frequencies match the tempered softmax, bias semantics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.nn.sampling import SamplingConfig, sample_token, top_k_probs

N_DRAWS = 20_000


def _draws(logits: np.ndarray, temp: float, top_k: int, bias=None, seed: int = 0) -> np.ndarray:
    """N_DRAWS independent samples from one row of logits `[V]` -> int `[N_DRAWS]`."""
    rows = jnp.broadcast_to(jnp.asarray(logits), (N_DRAWS, logits.shape[-1]))
    fn = jax.jit(lambda k, x: sample_token(k, x, temp, top_k, True, bias))
    return np.asarray(fn(jax.random.PRNGKey(seed), rows))


@pytest.mark.parametrize("use_sampling,temp", [(False, 0.8), (True, 0.0), (True, -1.0)])
def test_greedy_modes_return_argmax(rng, use_sampling, temp):
    logits = rng.standard_normal((4, 3, 97)).astype(np.float32)
    tok = sample_token(None, jnp.asarray(logits), temp, 5, use_sampling)
    assert tok.dtype == jnp.int32 and tok.shape == (4, 3)
    np.testing.assert_array_equal(np.asarray(tok), logits.argmax(-1))


def test_greedy_bias_can_change_the_argmax(rng):
    logits = rng.standard_normal((2, 50)).astype(np.float32)
    target = int(logits[0].argmin())
    bias = jnp.zeros(50).at[target].set(100.0)
    tok = np.asarray(sample_token(None, jnp.asarray(logits), 0.0, 0, False, bias))
    assert tok[0] == target and tok[1] == target


def test_top_k_never_emits_outside_the_top_k(rng):
    V, k = 300, 7
    logits = (3.0 * rng.standard_normal((64, V))).astype(np.float32)
    keys = jax.random.split(jax.random.PRNGKey(1), 200)
    draws = np.asarray(jax.vmap(lambda key: sample_token(key, jnp.asarray(logits), 1.5, k))(keys))  # [200, 64]
    top = np.argsort(-logits, axis=-1)[:, :k]
    for row in range(logits.shape[0]):
        assert set(draws[:, row]).issubset(set(top[row])), f"row {row} sampled outside its top {k}"
    # and the draws do use more than one of the top-k tokens (not silently greedy)
    assert len(set(draws[:, 0])) > 1


@pytest.mark.parametrize("temp,top_k", [(0.7, 25), (0.8, 250), (1.0, 0), (2.0, 5)])
def test_frequencies_match_tempered_softmax_restricted_to_top_k(rng, temp, top_k):
    V = 40 if top_k == 250 else 300  # top_k >= V exercises the "no cut" path
    logits = (2.0 * rng.standard_normal(V)).astype(np.float32)
    counts = np.bincount(_draws(logits, temp, top_k), minlength=V)
    # expected distribution, computed independently in numpy float64
    z = logits.astype(np.float64) / temp
    keep = np.ones(V, bool)
    if 0 < top_k < V:
        keep[:] = False
        keep[np.argsort(-logits)[:top_k]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    assert counts[~keep].sum() == 0
    freq = counts / N_DRAWS
    # binomial std at N=20k is <= 0.0036; 0.015 is > 4 sigma for every token
    assert np.abs(freq - p).max() < 0.015, np.abs(freq - p).max()
    # chi-square over tokens with expected count >= 5 (others pooled)
    exp = p * N_DRAWS
    big = exp >= 5
    obs_b = np.append(counts[big], counts[~big].sum())
    exp_b = np.append(exp[big], exp[~big].sum())
    mask = exp_b > 0
    chi2 = (((obs_b - exp_b) ** 2)[mask] / exp_b[mask]).sum()
    dof = mask.sum() - 1
    # mean dof, std sqrt(2 dof): 6 sigma is a loose but still discriminating bound
    assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)
    np.testing.assert_allclose(np.asarray(top_k_probs(jnp.asarray(logits), temp, top_k)), p, atol=1e-6)


def test_bias_multiplies_the_token_probability_by_exp_bias(rng):
    V = 30
    logits = rng.standard_normal(V).astype(np.float32)
    pad = 3
    bias = np.zeros(V, np.float32)
    bias[pad] = 1.5
    counts = np.bincount(_draws(logits, 0.7, 0, jnp.asarray(bias)), minlength=V)
    w = np.exp(logits.astype(np.float64) / 0.7)
    w[pad] *= np.exp(1.5)
    p = w / w.sum()
    assert np.abs(counts / N_DRAWS - p).max() < 0.015


def test_bias_is_applied_before_the_top_k_cut(rng):
    V = 100
    logits = rng.standard_normal(V).astype(np.float32)
    low = int(logits.argmin())
    bias = jnp.zeros(V).at[low].set(50.0)
    draws = _draws(logits, 1.0, 3, bias)
    assert (draws == low).mean() > 0.99


def test_sampling_without_key_is_an_error(rng):
    with pytest.raises(ValueError, match="PRNG key"):
        sample_token(None, jnp.zeros((2, 5)), 1.0, 0, True)


def test_sampling_config_defaults_are_the_reference_lmgen_defaults():
    c = SamplingConfig()
    assert (c.use_sampling, c.temp, c.top_k, c.temp_text, c.top_k_text) == (True, 0.8, 250, 0.7, 25)
    assert SamplingConfig.greedy().text_is_greedy and SamplingConfig.greedy().audio_is_greedy
    with pytest.raises(TypeError, match="top_k"):
        SamplingConfig(top_k=2.5)


def _np_top_k_probs(logits: np.ndarray, temp: float, top_k: int, bias=None) -> np.ndarray:
    """The sampled distribution of one row, in float64 numpy: softmax(logits / temp + bias) on its top k."""
    z = logits.astype(np.float64) / temp + (0.0 if bias is None else np.asarray(bias, np.float64))
    keep = np.ones_like(z, bool)
    if 0 < top_k < z.shape[-1]:
        keep[:] = False
        keep[np.argsort(-z)[:top_k]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    return p / p.sum()


def test_top_k_probs_applies_the_bias_before_the_cut_and_renormalises(rng):
    V = 20
    logits = rng.standard_normal(V).astype(np.float32)
    bias = np.zeros(V, np.float32)
    low, high = int(logits.argmin()), int(logits.argmax())
    bias[low], bias[high] = 30.0, -1.0
    got = np.asarray(top_k_probs(jnp.asarray(logits), 0.5, 4, jnp.asarray(bias)))
    want = _np_top_k_probs(logits, 0.5, 4, bias)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got[low] > 0.99 and (got > 0).sum() == 4 and abs(got.sum() - 1) < 1e-6
    # without the cut the bias still multiplies a token's probability by exp(bias)
    np.testing.assert_allclose(np.asarray(top_k_probs(jnp.asarray(logits), 0.5, 0, jnp.asarray(bias))),
                               _np_top_k_probs(logits, 0.5, 0, bias), atol=1e-6)


@pytest.mark.parametrize("top_k", [0, 1, 3, 12])
def test_top_k_probs_of_batched_logits_cuts_each_row_on_its_own(rng, top_k):
    logits = (2 * rng.standard_normal((2, 3, 12))).astype(np.float32)
    logits[1, 2] = logits[1, 2, ::-1]  # rows rank their tokens differently
    got = np.asarray(top_k_probs(jnp.asarray(logits), 1.3, top_k))
    assert got.shape == logits.shape and got.dtype == np.float32
    for idx in np.ndindex(2, 3):
        np.testing.assert_allclose(got[idx], _np_top_k_probs(logits[idx], 1.3, top_k), atol=1e-6)
        assert (got[idx] > 0).sum() == (top_k if 0 < top_k < 12 else 12)


def test_top_k_probs_is_the_distribution_sample_token_draws_from_per_row(rng):
    # Two rows with different top tokens, a per-row bias: the draws of each row follow that row's probabilities.
    V = 8
    logits = np.stack([np.linspace(0, 2, V), np.linspace(2, 0, V)]).astype(np.float32)
    bias = jnp.asarray(np.stack([np.zeros(V), np.eye(V)[0] * 1.0]), jnp.float32)
    p = np.asarray(top_k_probs(jnp.asarray(logits), 0.9, 3, bias))
    rows = jnp.broadcast_to(jnp.asarray(logits), (N_DRAWS // 4, 2, V))
    draws = np.asarray(jax.jit(lambda k, x: sample_token(k, x, 0.9, 3, True, bias))(jax.random.PRNGKey(3), rows))
    for r in range(2):
        freq = np.bincount(draws[:, r], minlength=V) / draws.shape[0]
        assert np.abs(freq - p[r]).max() < 0.03, (r, freq, p[r])
        assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(p[r]))


def test_integer_temperatures_are_accepted_and_behave_as_floats(rng):
    # A repository's lm_gen_config may hold `"temp": 1`; 0 means greedy for that stream only.
    c = SamplingConfig(temp=1, temp_text=0, top_k=5, top_k_text=0)
    assert c.text_is_greedy and not c.audio_is_greedy
    c = SamplingConfig(temp=0, temp_text=2)
    assert c.audio_is_greedy and not c.text_is_greedy
    assert not SamplingConfig().text_is_greedy and not SamplingConfig().audio_is_greedy
    logits = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(sample_token(key, logits, 2, 5), sample_token(key, logits, 2.0, 5))
    np.testing.assert_allclose(top_k_probs(logits, 2, 5), top_k_probs(logits, 2.0, 5))
    np.testing.assert_array_equal(sample_token(None, logits, 0, 5), np.asarray(logits).argmax(-1))


@pytest.mark.parametrize("field,value", [("temp", "0.8"), ("temp_text", None), ("temp", True), ("top_k", 2.5),
                                         ("top_k_text", "25"), ("top_k", False)])
def test_sampling_config_rejects_values_that_are_not_numbers(field, value):
    with pytest.raises(TypeError, match=f"SamplingConfig.{field} must be"):
        SamplingConfig(**{field: value})


def test_sampling_config_is_frozen_and_hashable_as_a_static_jit_argument():
    import dataclasses

    c = SamplingConfig(temp=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.temp = 0.5
    assert hash(c) == hash(SamplingConfig(temp=1)) and c == SamplingConfig(temp=1.0)
    assert SamplingConfig.greedy() == SamplingConfig(use_sampling=False)


def test_bfloat16_logits_are_tempered_in_float32():
    # 256 and 258 are exact in bfloat16, but 256/0.7 and 258/0.7 are not (bf16 spacing is 2 there): tempering
    # in bf16 would turn a probability ratio of exp(2.86) into exp(2), p[0] from 0.054 into 0.12.
    logits = jnp.asarray([256.0, 258.0], jnp.bfloat16)
    p = np.asarray(top_k_probs(logits, 0.7, 0))
    assert p.dtype == np.float32
    np.testing.assert_allclose(p[0], 1 / (1 + np.exp(2 / 0.7)), rtol=1e-4)
    freq0 = (_draws(np.asarray(logits), 0.7, 0) == 0).mean()
    assert abs(freq0 - p[0]) < 0.015, (freq0, p[0])
    assert int(sample_token(None, jnp.asarray([1.0, 1.5, 1.25], jnp.bfloat16), 0.7, 0, False)) == 1


def test_top_k_of_one_is_greedy_even_when_sampling(rng):
    logits = jnp.asarray(rng.standard_normal((64, 30)), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(7), 5)
    for key in keys:
        np.testing.assert_array_equal(sample_token(key, logits, 1.5, 1), np.asarray(logits).argmax(-1))
    np.testing.assert_array_equal(np.asarray(top_k_probs(logits, 1.5, 1)), np.eye(30)[np.asarray(logits).argmax(-1)])
