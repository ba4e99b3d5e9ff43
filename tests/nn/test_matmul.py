"""nn.matmul.einsum: exactly jnp.einsum in float32; bf16 accumulates in float32, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.nn import matmul

# The model's contraction patterns: plain linears, per-step (batched) kernels, stacked heads, attention.
SPECS = {
    "btd,df->btf": ((3, 5, 16), (16, 24)),
    "btd,dgf->btgf": ((3, 5, 16), (16, 2, 24)),
    "btd,tdf->btf": ((3, 5, 16), (5, 16, 24)),
    "nkd,kdc->nkc": ((6, 3, 16), (3, 16, 24)),
    "btd,kde->btke": ((3, 5, 16), (4, 16, 8)),
    "bthd,bshd->bhts": ((2, 5, 3, 8), (2, 7, 3, 8)),
    "bhts,bshd->bthd": ((2, 3, 5, 7), (2, 7, 3, 8)),
}


def _operands(spec, dtype, seed=0):
    sa, sb = SPECS[spec]
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal(sa), dtype), jnp.asarray(rng.standard_normal(sb), dtype))


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_float32_operands_give_exactly_jnp_einsum_and_its_gradients(spec):
    x, w = _operands(spec, jnp.float32)
    np.testing.assert_array_equal(matmul.einsum(spec, x, w), jnp.einsum(spec, x, w))

    def loss(f):
        return lambda a, b: (f(spec, a, b) ** 2).sum()

    ours = jax.grad(loss(matmul.einsum), argnums=(0, 1))(x, w)
    ref = jax.grad(loss(jnp.einsum), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_bfloat16_forward_is_the_float32_product_rounded_once(spec):
    x, w = _operands(spec, jnp.bfloat16)
    exact = jnp.einsum(spec, x.astype(jnp.float32), w.astype(jnp.float32))
    y = jax.jit(lambda a, b: matmul.einsum(spec, a, b))(x, w)
    assert y.dtype == jnp.bfloat16
    # float32 accumulation, one rounding: the result is exact up to the rounding of the output (and float32 sums)
    np.testing.assert_allclose(y.astype(jnp.float32), exact.astype(jnp.bfloat16).astype(jnp.float32),
                               rtol=2 ** -7, atol=1e-5)
    y32 = jax.jit(lambda a, b: matmul.einsum(spec, a, b, jnp.float32))(x, w)
    assert y32.dtype == jnp.float32
    np.testing.assert_allclose(y32, exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_bfloat16_gradients_match_the_float32_gradients_to_bf16_precision(spec):
    # The custom VJP (both gradient matmuls bf16 x bf16 -> float32, transposed operands materialised on CPU)
    # is the derivative of the einsum: compare with float32 autodiff on the same (bf16-representable) values.
    x, w = _operands(spec, jnp.bfloat16, seed=1)
    g = jnp.asarray(np.random.default_rng(2).standard_normal(jnp.einsum(spec, x, w).shape), jnp.float32)

    def loss(f, dtype):
        return lambda a, b: (f(spec, a, b).astype(jnp.float32) * g).sum()

    dx, dw = jax.jit(jax.grad(loss(matmul.einsum, jnp.bfloat16), argnums=(0, 1)))(x, w)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    rx, rw = jax.grad(loss(jnp.einsum, jnp.float32), argnums=(0, 1))(x.astype(jnp.float32), w.astype(jnp.float32))
    for a, b in ((dx, rx), (dw, rw)):
        err = float(jnp.abs(a.astype(jnp.float32) - b).max() / jnp.abs(b).max())
        assert err < 2 ** -7, err


def test_gradient_specs_are_derived_for_bilinear_einsums_and_refused_otherwise():
    assert matmul._grad_specs("btd,df->btf") == ("btf,df->btd", "btd,btf->df")
    assert matmul._grad_specs("...d,de->...e") is None  # ellipsis: plain einsum and autodiff
    assert matmul._grad_specs("btd,df->bf") is None  # t summed within x alone
    x, w = jnp.ones((2, 3, 4), jnp.bfloat16), jnp.ones((4, 5), jnp.bfloat16)
    np.testing.assert_array_equal(matmul.einsum("...d,de->...e", x, w), jnp.einsum("...d,de->...e", x, w))


@pytest.mark.parametrize("dtypes", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32),
                                    (jnp.bfloat16, jnp.bfloat16)])
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_out_dtype_is_the_result_dtype_whatever_the_operands(dtypes, out_dtype):
    x, w = _operands("btd,df->btf", jnp.float32)
    x, w = x.astype(dtypes[0]), w.astype(dtypes[1])
    y = matmul.einsum("btd,df->btf", x, w, out_dtype)
    assert y.dtype == out_dtype
    exact = jnp.einsum("btd,df->btf", x.astype(jnp.float32), w.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(exact.astype(out_dtype), np.float32),
                               rtol=2 ** -7, atol=1e-5)


def test_implicit_output_specs_fall_back_to_plain_einsum():
    x, w = jnp.ones((2, 3, 4), jnp.bfloat16), jnp.ones((4, 5), jnp.bfloat16)
    assert matmul._grad_specs("btd,df") is None
    np.testing.assert_array_equal(matmul.einsum("btd,df", x, w), jnp.einsum("btd,df", x, w))


def test_a_float32_out_dtype_backpropagates_like_a_bf16_result_cast_to_float32():
    """`out_dtype=float32` only saves the forward's rounding: the gradient is the one of the bf16 result cast up
    (the float32 cotangent is rounded to the operands' dtype before the float32-accumulated dots)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((8, 5)), jnp.bfloat16)
    r = jnp.asarray(rng.standard_normal((2, 3, 5)), jnp.float32)  # a cotangent that bf16 cannot hold exactly

    def loss_f32_out(x, w):
        return jnp.sum(matmul.einsum("btd,df->btf", x, w, jnp.float32) * r)

    def loss_cast_up(x, w):
        return jnp.sum(matmul.einsum("btd,df->btf", x, w).astype(jnp.float32) * r)

    ga, gb = jax.grad(loss_f32_out, (0, 1))(x, w), jax.grad(loss_cast_up, (0, 1))(x, w)
    for a, b in zip(ga, gb, strict=True):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
