"""int8 KV ring (`init_kv_cache(..., dtype=jnp.int8)`): entries stored as int8 with per-(position, head) scales,
attention over it within a stated bound of the float ring's, the same in the per-layer and stacked (chunked)
layouts and with either ring-write kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.nn import backend, quant
from moshi_jax.nn import kv_cache as kvc

B, H, C, D = 3, 2, 12, 8


def _fill(dtype, steps: int, seed: int = 0) -> kvc.KVCache:
    r = np.random.default_rng(seed)
    cache = kvc.init_kv_cache(B, C, H, D, dtype)
    for t in range(steps):
        k = jnp.asarray(r.standard_normal((B, 1, H, D)) * 3, jnp.float32)
        v = jnp.asarray(r.standard_normal((B, 1, H, D)), jnp.float32)
        cache = kvc.write(cache, k, v, jnp.full((B, 1), t, jnp.int32))
    return cache


def test_an_int8_ring_stores_int8_entries_with_their_scales_and_dequantizes_to_the_written_values():
    f32, i8 = _fill(jnp.float32, 15), _fill(jnp.int8, 15)  # wraps past C
    assert i8.keys.dtype == jnp.int8 and i8.values.dtype == jnp.int8
    assert i8.key_scales.shape == i8.value_scales.shape == (B, H, C)
    np.testing.assert_array_equal(np.asarray(i8.positions), np.asarray(f32.positions))
    keys = i8.keys.astype(jnp.float32) * i8.key_scales[:, :, None, :]  # [B, H, D, C]
    values = i8.values.astype(jnp.float32) * i8.value_scales[..., None]  # [B, H, C, D]
    np.testing.assert_allclose(np.asarray(keys), np.asarray(f32.keys), atol=float(i8.key_scales.max()) / 2 + 1e-6)
    np.testing.assert_allclose(np.asarray(values), np.asarray(f32.values),
                               atol=float(i8.value_scales.max()) / 2 + 1e-6)
    assert kvc.init_kv_cache(B, C, H, D).key_scales is None  # the float ring is unchanged


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.int16])
def test_an_integer_ring_other_than_int8_is_refused(dtype):
    # Only int8 has the quantized write / read path; another integer dtype would truncate every key silently.
    with pytest.raises(ValueError, match="floating point or int8"):
        kvc.init_kv_cache(B, C, H, D, dtype)


@pytest.mark.parametrize("steps,context", [(1, None), (7, None), (16, 5)])
def test_attention_over_an_int8_ring_stays_within_two_percent_of_the_float_ring(steps, context):
    f32, i8 = _fill(jnp.float32, steps), _fill(jnp.int8, steps)
    q = jnp.asarray(np.random.default_rng(1).standard_normal((B, 1, H, D)), jnp.float32)
    q_pos = jnp.full((B, 1), steps - 1, jnp.int32)
    want = kvc.attend(q, f32, q_pos, True, context)
    got = kvc.attend(q, i8, q_pos, True, context)
    assert got.dtype == want.dtype and got.shape == want.shape
    err = float(jnp.max(jnp.abs(got - want)))
    assert err <= 0.02 * float(jnp.max(jnp.abs(f32.values))), err
    assert err > 0  # it is quantized (the comparison is not between two float rings)


@pytest.mark.parametrize("steps", [2, 5, 9])  # a prefix of 2, 4 or 8 slots of the 12 is read
def test_int8_attention_reading_a_prefix_of_the_layer_ring_equals_reading_it_whole(steps):
    i8 = _fill(jnp.int8, steps)
    q = jnp.asarray(np.random.default_rng(5).standard_normal((B, 1, H, D)), jnp.float32)
    q_pos = jnp.full((B, 1), steps - 1, jnp.int32)
    with backend.override("cpu"):  # the backend choice that reads prefixes
        got = kvc.attend(q, i8, q_pos, True, None, min_prefix=2)
        whole = kvc.attend(q, i8, q_pos, True, None, min_prefix=C)
    np.testing.assert_allclose(np.asarray(got), np.asarray(whole), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("max_chunk", [4, 12])
def test_int8_chunked_stacked_attention_equals_the_int8_per_layer_attention(max_chunk):
    i8 = _fill(jnp.int8, 9)
    stacked = jax.tree.map(lambda a: jnp.stack([jnp.zeros_like(a), a]), i8)  # layer 1 holds the ring
    q = jnp.asarray(np.random.default_rng(2).standard_normal((B, 1, H, D)), jnp.float32)
    q_pos = jnp.full((B, 1), 8, jnp.int32)
    got = kvc.attend(q, stacked, q_pos, True, None, layer=jnp.int32(1), max_chunk=max_chunk)
    want = kvc.attend(q, i8, q_pos, True, None)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # and a stacked write lands the same int8 entries and scales as a per-layer write
    k = jnp.ones((B, 1, H, D)) * jnp.arange(D)
    one = kvc.write(i8, k, -k, jnp.full((B, 1), 9, jnp.int32))
    both = kvc.write(stacked, k, -k, jnp.full((B, 1), 9, jnp.int32), layer=jnp.int32(1))
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(jax.tree.map(lambda x: x[1], both)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_int8_ring_writes_by_update_slices_equal_the_scatter_bit_for_bit():
    i8 = _fill(jnp.int8, 5)
    r = np.random.default_rng(3)
    k = jnp.asarray(r.standard_normal((B, 3, H, D)), jnp.float32)
    v = jnp.asarray(r.standard_normal((B, 3, H, D)), jnp.float32)
    pos = jnp.asarray([[5, 6, 7], [10, 11, 12], [13, 14, 15]], jnp.int32)  # items 1 and 2 wrap around
    outs = {}
    for which in ("cpu", "portable"):
        with backend.override(which):
            outs[which] = jax.jit(kvc.write)(i8, k, v, pos)
    for a, b in zip(jax.tree.leaves(outs["cpu"]), jax.tree.leaves(outs["portable"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kq, ks = quant.quantize_heads(k)
    np.testing.assert_array_equal(np.asarray(outs["cpu"].keys[0, :, :, 5]), np.asarray(kq[0, 0]))
    np.testing.assert_array_equal(np.asarray(outs["cpu"].key_scales[2, :, 15 % C]), np.asarray(ks[2, 2]))
