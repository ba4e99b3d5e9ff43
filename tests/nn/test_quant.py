"""int8 quantization (nn/quant.py): round-trip error bounds, per-output-channel weight scales, the layer-tree
quantization the serving path uses, and clear errors for unknown options."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.nn import quant
from moshi_jax.nn.attention import apply_kernel


@pytest.mark.parametrize("axes", [0, -1, (0, 2)])
def test_int8_round_trip_is_within_half_a_step_of_each_slices_maximum(axes):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5, 7)) * np.array([1e-3, 1.0, 50.0, 2, 3, 4, 5]),
                    jnp.float32)
    qw = quant.quantize_int8(x, axes)
    assert qw.q.dtype == jnp.int8 and qw.q.shape == x.shape
    amax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    assert qw.scale.shape == amax.shape
    err = jnp.abs(qw.dequantize() - x)
    assert bool(jnp.all(err <= amax / 254 * (1 + 1e-6)))
    assert int(jnp.max(jnp.abs(qw.q.astype(jnp.int32)))) == 127  # each slice's maximum uses the full range
    np.testing.assert_array_equal(np.asarray(qw.astype(jnp.bfloat16)), np.asarray(qw.dequantize(jnp.bfloat16)))
    assert qw.astype(jnp.bfloat16).dtype == jnp.bfloat16 and qw.dequantize().dtype == jnp.float32


def test_an_all_zero_slice_quantizes_to_zero_without_nans():
    x = jnp.zeros((3, 4)).at[1].set(jnp.arange(4.0))
    qw = quant.quantize_int8(x, -1)
    assert np.all(np.isfinite(np.asarray(qw.dequantize())))
    np.testing.assert_allclose(np.asarray(qw.dequantize()), np.asarray(x), atol=3 / 254)
    np.testing.assert_array_equal(np.asarray(qw.q[0]), 0)


def test_kv_heads_get_one_scale_per_position_and_head():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 4, 8)), jnp.float32)
    q, s = quant.quantize_heads(x)
    assert q.shape == x.shape and q.dtype == jnp.int8 and s.shape == (2, 3, 4) and s.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(s), np.abs(np.asarray(x)).max(-1) / 127, rtol=1e-6)
    assert float(jnp.max(jnp.abs(q * s[..., None] - x) / (s[..., None] / 2))) <= 1 + 1e-5


def test_layer_quantization_scales_each_output_channel_and_leaves_norms_alone():
    r = np.random.default_rng(2)
    tree = {"self_attn": {"in_proj": jnp.asarray(r.standard_normal((16, 3, 2, 8)), jnp.bfloat16),
                          "out_proj": jnp.asarray(r.standard_normal((5, 2, 8, 16)), jnp.bfloat16)},  # per-step axis
            "mlp": {"linear_in": jnp.asarray(r.standard_normal((16, 2, 24)), jnp.bfloat16),
                    "linear_out": jnp.asarray(r.standard_normal((24, 16)), jnp.bfloat16)},
            "plain_mlp": {"linear1": jnp.asarray(r.standard_normal((16, 24)), jnp.bfloat16),  # non-gated MLP
                          "linear2": jnp.asarray(r.standard_normal((24, 16)), jnp.bfloat16)},
            "norm1": {"alpha": jnp.ones((16,), jnp.bfloat16)}}
    q = quant.quantize_layer_params(tree)
    assert q["plain_mlp"]["linear1"].scale.shape == (1, 24) and q["plain_mlp"]["linear2"].scale.shape == (1, 16)
    assert q["self_attn"]["in_proj"].scale.shape == (1, 3, 2, 8)  # one per output channel
    assert q["self_attn"]["out_proj"].scale.shape == (5, 1, 1, 16)  # per step and output channel
    assert q["mlp"]["linear_in"].scale.shape == (1, 2, 24)
    assert q["mlp"]["linear_out"].scale.shape == (1, 16)
    assert q["norm1"]["alpha"] is tree["norm1"]["alpha"]
    assert quant.quantize_layer_params(q) == q  # idempotent: quantized leaves stay
    assert quant.nbytes(q) < 0.65 * quant.nbytes(tree)  # int8 + float32 scales (a large share at these sizes)


@pytest.mark.parametrize("step_index", [None, [3], [0, 4]])
def test_an_int8_kernel_in_a_matmul_equals_the_matmul_with_its_dequantized_kernel(step_index):
    r = np.random.default_rng(3)
    x = jnp.asarray(r.standard_normal((2, 1 if step_index is None else len(step_index), 16)), jnp.float32)
    w = jnp.asarray(r.standard_normal((16, 24) if step_index is None else (5, 16, 24)), jnp.float32)
    qw = quant.quantize_int8(w, -2)
    idx = None if step_index is None else jnp.asarray(step_index, jnp.int32)
    got = apply_kernel("btd,df->btf", x, qw, idx, jnp.float32)
    want = apply_kernel("btd,df->btf", x, qw.dequantize(), idx, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    exact = apply_kernel("btd,df->btf", x, w, idx, jnp.float32)
    assert float(jnp.max(jnp.abs(got - exact))) < 0.05 * float(jnp.max(jnp.abs(exact)))


def test_unknown_quantization_options_are_rejected_with_the_allowed_values():
    from moshi_jax.lm import model as lm_model
    from moshi_jax.lm.config import LMConfig

    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \(None, 'int8'\).*'int4'"):
        lm_model.init_temporal_state(LMConfig.tiny(), 1, kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        lm_model.prepare_streaming_params({}, LMConfig.tiny(), weight_dtype="fp8")
    from moshi_jax.nn import kv_cache as kvc

    with pytest.raises(ValueError, match="floating point or int8"):
        kvc.init_kv_cache(1, 4, 2, 8, jnp.int16)
    jax.block_until_ready(kvc.init_kv_cache(1, 4, 2, 8, jnp.int8).key_scales)
