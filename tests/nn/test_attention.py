"""Attention's building blocks as a caller sees them: the init distribution, per-step kernels (their params,
their logical axes, the streaming slice against the gathered path), dtypes, int8 kernels, float32 scores.

The attention maths itself is pinned against the reference by tests/nn/test_transformer_parity.py."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moshi_jax.nn.attention import Attention, apply_kernel, dot_attention, fan_in_normal, per_step_param
from moshi_jax.nn.quant import quantize_int8


def test_fan_in_normal_is_a_normal_of_std_one_over_sqrt_fan_in_truncated_at_three_std():
    fan_in = 64
    std = 1.0 / math.sqrt(fan_in)
    w = np.asarray(fan_in_normal(fan_in)(jax.random.key(0), (400_000,)))
    assert np.abs(w).max() <= 3.0 * std * (1 + 1e-6)
    assert w.max() > 2.9 * std and w.min() < -2.9 * std  # both tails reach the cut (P(|z| > 2.9) = 0.4%)
    # a standard normal truncated at +-3 has std 0.9866
    np.testing.assert_allclose(w.std(), 0.9866 * std, rtol=0.01)
    assert abs(w.mean()) < 0.01 * std


class _PerStep(nn.Module):
    mult: int

    @nn.compact
    def __call__(self):
        return per_step_param(self, "w", (4, 3), ("embed", "mlp"), self.mult, fan_in_normal(4), jnp.float32)


def test_per_step_kernels_get_a_leading_steps_axis_with_its_own_logical_name_and_distinct_draws():
    shared = _PerStep(0).init(jax.random.key(0))["params"]["w"]
    stacked = _PerStep(5).init(jax.random.key(0))["params"]["w"]
    assert shared.names == ("embed", "mlp") and shared.value.shape == (4, 3)
    assert stacked.names == ("steps", "embed", "mlp") and stacked.value.shape == (5, 4, 3)
    steps = np.asarray(stacked.value)
    assert all(not np.allclose(steps[i], steps[j]) for i in range(5) for j in range(i + 1, 5))


def _per_step_kernel(steps=3, d=4, f=5, seed=0):
    return jax.random.normal(jax.random.key(seed), (steps, d, f), jnp.float32)


def test_per_step_kernels_apply_the_kernel_of_each_position():
    kernel = _per_step_kernel()
    x = jax.random.normal(jax.random.key(1), (2, 3, 4), jnp.float32)
    y = apply_kernel("btd,df->btf", x, kernel, jnp.arange(3))
    want = jnp.stack([x[:, t] @ kernel[t] for t in range(3)], axis=1)
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
    # two positions at steps (2, 0): each gets its own kernel (not the first position's for both)
    y2 = apply_kernel("btd,df->btf", x[:, :2], kernel, jnp.array([2, 0]))
    np.testing.assert_allclose(y2, jnp.stack([x[:, 0] @ kernel[2], x[:, 1] @ kernel[0]], axis=1), rtol=1e-6,
                               atol=1e-6)
    # streaming: one position at step 1 uses kernel 1
    y1 = apply_kernel("btd,df->btf", x[:, :1], kernel, jnp.array([1]))
    np.testing.assert_allclose(y1[:, 0], x[:, 0] @ kernel[1], rtol=1e-6, atol=1e-6)


def test_a_compute_dtype_casts_float32_kernels_on_every_path():
    kernel = _per_step_kernel()
    x = jax.random.normal(jax.random.key(1), (2, 3, 4), jnp.bfloat16)
    for kern, steps in ((kernel[0], None), (kernel, jnp.arange(3)), (kernel, jnp.array([2]))):
        y = apply_kernel("btd,df->btf", x[:, : (1 if steps is not None and steps.shape[0] == 1 else 3)], kern,
                         steps, jnp.bfloat16)
        assert y.dtype == jnp.bfloat16
    # without a compute dtype the operands' promotion decides: float32 kernel, bf16 input -> float32
    assert apply_kernel("btd,df->btf", x, kernel[0], None).dtype == jnp.float32
    assert apply_kernel("btd,df->btf", x[:, :1], kernel, jnp.array([0])).dtype == jnp.float32


def test_an_int8_kernel_is_dequantized_to_the_compute_dtype_or_float32():
    w = jax.random.normal(jax.random.key(2), (4, 5), jnp.float32)
    qw = quantize_int8(w, 0)
    x = jax.random.normal(jax.random.key(3), (2, 3, 4), jnp.float32)
    y = apply_kernel("btd,df->btf", x, qw, None)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, x @ qw.dequantize(jnp.float32), rtol=1e-6, atol=1e-6)
    yb = apply_kernel("btd,df->btf", x.astype(jnp.bfloat16), qw, None, jnp.bfloat16)
    assert yb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(yb, np.float32),
        np.asarray(apply_kernel("btd,df->btf", x.astype(jnp.bfloat16), qw.dequantize(jnp.bfloat16), None,
                                jnp.bfloat16), np.float32))


def test_bf16_attention_takes_its_softmax_over_float32_scores():
    key = jax.random.split(jax.random.key(4), 3)
    q, k, v = (jax.random.normal(kk, (1, 6, 2, 8), jnp.float32).astype(jnp.bfloat16) * 4 for kk in key)
    pos = jnp.arange(6)[None]
    out = dot_attention(q, k, v, pos, pos, causal=True, context=None)
    # q.k comes out in the compute dtype (bf16); scale, mask and softmax run in float32, the probabilities are
    # rounded to bf16 only for the value product
    s = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    s = s.astype(jnp.float32) * (1.0 / math.sqrt(8))
    s = jnp.where(jnp.tril(jnp.ones((6, 6), bool)), s, -1e30)
    probs = jax.nn.softmax(s, axis=-1).astype(jnp.bfloat16)
    want = jnp.einsum("bhts,bshd->bthd", probs, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))


def test_a_bf16_attention_computes_in_bf16_whatever_its_input_dtype():
    attn = Attention(16, 2, True, None, "rope", 10000.0, 0, jnp.bfloat16, jnp.float32)
    x = jax.random.normal(jax.random.key(5), (2, 5, 16), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    params = attn.init(jax.random.key(6), x, pos)
    y32, _ = attn.apply(params, x, pos)
    y16, _ = attn.apply(params, x.astype(jnp.bfloat16), pos)
    assert y32.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y32, np.float32), np.asarray(y16, np.float32))
