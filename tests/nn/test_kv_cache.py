"""KV ring: writes land at position % capacity, and the chunked online-softmax attention over the ring (which
skips chunks that cannot hold a key yet) equals plain masked attention over the whole ring."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.nn import backend
from moshi_jax.nn import kv_cache as kvc
from moshi_jax.nn.attention import dot_attention

B, H, C, D = 3, 2, 12, 8


def _filled_ring(steps: list[int], seed: int = 0) -> kvc.KVCache:
    """A ring where item b has written positions 0..steps[b]-1, one step at a time (keys wrap past C)."""
    r = np.random.default_rng(seed)
    cache = kvc.init_kv_cache(B, C, H, D)
    for t in range(max(steps)):
        k = jnp.asarray(r.standard_normal((B, 1, H, D)), jnp.float32)
        v = jnp.asarray(r.standard_normal((B, 1, H, D)), jnp.float32)
        new = kvc.write(cache, k, v, jnp.full((B, 1), t, jnp.int32))
        active = jnp.asarray([t < s for s in steps])
        cache = jax.tree.map(lambda n, o, a=active: jnp.where(a.reshape((B,) + (1,) * (n.ndim - 1)), n, o), new, cache)
    return cache


def _plain(q, cache, q_pos, causal, context):
    """Masked softmax attention over every slot (the reference's way), layout [B, C, H, D]."""
    k = cache.keys.transpose(0, 3, 1, 2)
    v = cache.values.transpose(0, 2, 1, 3)
    return dot_attention(q, k, v, q_pos, cache.positions, causal, context)


@pytest.mark.parametrize("steps", [[1, 5, 3], [7, 12, 2], [30, 13, 4]])
@pytest.mark.parametrize("max_chunk,context", [(4, 12), (3, 5), (12, None), (5, 7)])
def test_chunked_attention_over_a_stacked_ring_equals_plain_masked_attention(steps, max_chunk, context):
    cache = _filled_ring(steps)
    stacked = jax.tree.map(lambda a: jnp.stack([jnp.zeros_like(a), a]), cache)  # layer 1 holds the ring
    q = jnp.asarray(np.random.default_rng(1).standard_normal((B, 1, H, D)), jnp.float32)
    q_pos = jnp.asarray([[s - 1] for s in steps], jnp.int32)  # each item queries at its last written position
    got = kvc.attend(q, stacked, q_pos, True, context, layer=jnp.int32(1), max_chunk=max_chunk)
    want = _plain(q, cache, q_pos, True, context)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [[1, 1, 1], [1, 5, 3], [7, 12, 2], [30, 13, 4], [3, 0, 9]])
@pytest.mark.parametrize("min_prefix,context", [(2, 12), (2, 5), (4, None), (64, 7)])
def test_prefix_attention_over_a_layer_ring_equals_plain_masked_attention(steps, min_prefix, context):
    # A layer's own ring is read as its smallest written prefix (2, 4, 8 or all 12 slots here), whole once full;
    # an item with nothing written (steps 0, e.g. just reset) gets zeros, as in the chunked path.
    cache = _filled_ring(steps)
    q = jnp.asarray(np.random.default_rng(1).standard_normal((B, 1, H, D)), jnp.float32)
    q_pos = jnp.asarray([[max(s - 1, 0)] for s in steps], jnp.int32)
    got = jax.jit(lambda q, c, p: kvc.attend(q, c, p, True, context, min_prefix=min_prefix))(q, cache, q_pos)
    want = _plain(q, cache, q_pos, True, context)
    empty = np.asarray([s == 0 for s in steps])
    np.testing.assert_allclose(np.asarray(got)[~empty], np.asarray(want)[~empty], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got)[empty], 0.0)
    assert kvc.prefix_sizes(C, 2) == (2, 4, 8, 12) and kvc.prefix_sizes(C, 64) == (12,)


def test_writes_go_to_position_modulo_capacity_in_the_stacked_layer():
    L = 2
    one = kvc.init_kv_cache(B, C, H, D)
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (L,) + a.shape), one)
    k = jnp.ones((B, 2, H, D))
    pos = jnp.asarray([[12, 13], [0, 1], [22, 23]], jnp.int32)
    out = kvc.write(stacked, k, 2 * k, pos, layer=jnp.int32(1))
    np.testing.assert_array_equal(out.positions[0], -1)  # the other layer is untouched
    np.testing.assert_array_equal(out.positions[1][0, :2], [12, 13])
    np.testing.assert_array_equal(out.positions[1][2, 10:], [22, 23])
    assert float(out.keys[1, 2, :, :, 11].min()) == 1.0 and float(out.values[1, 2, :, 10].min()) == 2.0
    assert float(jnp.abs(out.keys[1, 1, :, :, 2:]).max()) == 0.0


@pytest.mark.parametrize("steps", [[3, 0, 9], [30, 0, 4], [0, 0, 0]])
@pytest.mark.parametrize("max_chunk,context", [(4, 7), (12, None), (5, 3)])
def test_chunked_attention_gives_an_item_with_nothing_written_what_the_layer_path_gives_zeros(steps, max_chunk,
                                                                                           context):
    # An item just reset (or never fed) has no valid key: its output is 0, never NaN, in both layouts, and
    # the other items are unaffected.
    cache = _filled_ring(steps)
    stacked = jax.tree.map(lambda a: jnp.stack([a, jnp.zeros_like(a)]), cache)  # layer 0 holds the ring
    q = jnp.asarray(np.random.default_rng(2).standard_normal((B, 1, H, D)), jnp.float32)
    q_pos = jnp.asarray([[max(s - 1, 0)] for s in steps], jnp.int32)
    chunked = np.asarray(kvc.attend(q, stacked, q_pos, True, context, layer=jnp.int32(0), max_chunk=max_chunk))
    per_layer = np.asarray(kvc.attend(q, cache, q_pos, True, context, min_prefix=2))
    assert np.isfinite(chunked).all()
    empty = np.asarray([s == 0 for s in steps])
    np.testing.assert_array_equal(chunked[empty], 0.0)
    np.testing.assert_allclose(chunked, per_layer, rtol=1e-5, atol=1e-6)
    want = np.asarray(_plain(q, cache, q_pos, True, context))
    np.testing.assert_allclose(chunked[~empty], want[~empty], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal,context", [(False, None), (True, 4), (True, None)])
def test_a_chunk_of_queries_written_together_attends_like_plain_attention_in_both_layouts(causal, context):
    # A multi-token step (T=3, e.g. a prompt chunk) writes all its keys first, then each query sees the keys its
    # mask allows (non-causal: every written slot). Items at different lengths, one wrapping the ring.
    r = np.random.default_rng(4)
    T = 3
    cache = _filled_ring([4, 14, 0])
    starts = np.asarray([4, 14, 0])
    pos = jnp.asarray(starts[:, None] + np.arange(T)[None], jnp.int32)
    k, v = (jnp.asarray(r.standard_normal((B, T, H, D)), jnp.float32) for _ in range(2))
    cache = kvc.write(cache, k, v, pos)
    q = jnp.asarray(r.standard_normal((B, T, H, D)), jnp.float32)
    want = np.asarray(_plain(q, cache, pos, causal, context))
    per_layer = kvc.attend(q, cache, pos, causal, context, min_prefix=2)
    stacked = jax.tree.map(lambda a: jnp.stack([jnp.zeros_like(a), a, jnp.zeros_like(a)]), cache)
    for max_chunk in (4, 12):
        chunked = kvc.attend(q, stacked, pos, causal, context, layer=jnp.int32(1), max_chunk=max_chunk)
        np.testing.assert_allclose(chunked, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(per_layer, want, rtol=1e-5, atol=1e-6)


def test_attention_keeps_the_query_dtype_and_a_fresh_cache_is_empty():
    cache = kvc.init_kv_cache(2, 8, 1, 4, jnp.bfloat16)
    assert cache.keys.shape == (2, 1, 4, 8) and cache.values.shape == (2, 1, 8, 4)
    assert cache.keys.dtype == jnp.bfloat16 and cache.positions.dtype == jnp.int32
    assert (np.asarray(cache.positions) == -1).all()
    q = jnp.ones((2, 1, 1, 4), jnp.bfloat16)
    cache = kvc.write(cache, q, 3 * q, jnp.zeros((2, 1), jnp.int32))
    out = kvc.attend(q, cache, jnp.zeros((2, 1), jnp.int32), True, None)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 1, 1, 4)
    np.testing.assert_array_equal(np.asarray(out, np.float32), 3.0)  # one key: its value, exactly
    stacked = jax.tree.map(lambda a: a[None], cache)
    out = kvc.attend(q, stacked, jnp.zeros((2, 1), jnp.int32), True, None, layer=jnp.int32(0), max_chunk=4)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 1, 1, 4)
    np.testing.assert_array_equal(np.asarray(out, np.float32), 3.0)


@pytest.mark.parametrize("steps", [[12, 7, 1], [30, 6, 0]])
def test_chunked_attention_reads_the_second_of_two_chunks(steps):
    # capacity 12 in two chunks of 6: keys in slots 6.. must be seen (the single-chunk shortcut is for one chunk)
    cache = _filled_ring(steps)
    stacked = jax.tree.map(lambda a: a[None], cache)
    q = jnp.asarray(np.random.default_rng(5).standard_normal((B, 1, H, D)), jnp.float32)
    q_pos = jnp.asarray([[max(s - 1, 0)] for s in steps], jnp.int32)
    got = kvc.attend(q, stacked, q_pos, True, None, layer=jnp.int32(0), max_chunk=6)
    np.testing.assert_allclose(got, kvc.attend(q, cache, q_pos, True, None, min_prefix=2), rtol=1e-5, atol=1e-6)


def test_chunk_and_prefix_sizes_cover_the_ring():
    assert kvc._chunk_size(12, 5) == 4 and kvc._chunk_size(12, 12) == 12 and kvc._chunk_size(7, 4) == 1
    assert kvc._chunk_size(3000) == 500 and kvc._chunk_size(8, 512) == 8
    assert kvc.prefix_sizes(64) == (64,) and kvc.prefix_sizes(65) == (64, 65)
    assert kvc.prefix_sizes(3000) == (64, 128, 256, 512, 1024, 2048, 3000)


def test_large_attention_scores_do_not_overflow_in_either_layout():
    # Scores of several hundred (big activations, e.g. bf16-trained weights): the softmax is stabilised by the
    # row maximum, so the result is the plain attention, finite.
    cache = _filled_ring([9, 12, 3])
    q = 60.0 * jnp.asarray(np.random.default_rng(6).standard_normal((B, 1, H, D)), jnp.float32)
    q_pos = jnp.asarray([[8], [11], [2]], jnp.int32)
    want = np.asarray(_plain(q, cache, q_pos, True, None))
    per_layer = np.asarray(kvc.attend(q, cache, q_pos, True, None, min_prefix=4))
    chunked = np.asarray(kvc.attend(q, jax.tree.map(lambda a: a[None], cache), q_pos, True, None,
                                    layer=jnp.int32(0), max_chunk=4))
    assert np.isfinite(want).all()
    np.testing.assert_allclose(per_layer, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(chunked, want, rtol=1e-4, atol=1e-5)


def _two_layers(cache: kvc.KVCache) -> kvc.KVCache:
    """`cache` stacked as both layers of a 2-layer ring (the tests read / write layer 1)."""
    return jax.tree.map(lambda a: jnp.stack([a, a]), cache)


@pytest.mark.parametrize("which", ["cpu", "portable"])  # the two ring-write kernels (update slices, scatter)
@pytest.mark.parametrize("stacked", [False, True])
def test_a_bf16_ring_stores_float32_entries_rounded_to_bf16_where_they_belong_with_either_write_kernel(which,
                                                                                                       stacked):
    r = np.random.default_rng(4)
    k = jnp.asarray(r.standard_normal((B, 2, H, D)), jnp.float32)
    v = jnp.asarray(r.standard_normal((B, 2, H, D)), jnp.float32)
    pos = np.asarray([[0, 1], [13, 14], [5, 6]])  # item 1 wraps; no two items share a slot
    cache = kvc.init_kv_cache(B, C, H, D, jnp.bfloat16)
    layer = None
    if stacked:
        cache, layer = _two_layers(cache), jnp.int32(1)
    with backend.override(which):
        out = jax.jit(kvc.write)(cache, k, v, jnp.asarray(pos, jnp.int32), layer)
    keys, values, positions = (out.keys[1], out.values[1], out.positions[1]) if stacked else (
        out.keys, out.values, out.positions)
    assert keys.dtype == values.dtype == jnp.bfloat16
    want_k, want_v = np.zeros((B, H, D, C), np.float32), np.zeros((B, H, C, D), np.float32)
    want_pos = np.full((B, C), -1)
    for b in range(B):
        for t in range(2):
            slot = pos[b, t] % C
            want_k[b, :, :, slot] = np.asarray(k[b, t].astype(jnp.bfloat16), np.float32)
            want_v[b, :, slot] = np.asarray(v[b, t].astype(jnp.bfloat16), np.float32)
            want_pos[b, slot] = pos[b, t]
    np.testing.assert_array_equal(np.asarray(keys, np.float32), want_k)
    np.testing.assert_array_equal(np.asarray(values, np.float32), want_v)
    np.testing.assert_array_equal(np.asarray(positions), want_pos)


@pytest.mark.parametrize("stacked", [False, True])
def test_a_float32_ring_is_read_in_the_query_dtype(stacked):
    # The two attention dots run in the compute (query) dtype whatever the ring holds: a bf16 query over a
    # float32 ring gives what it gives over the same ring rounded to bf16.
    ring = _filled_ring([5, 9, 12])
    q = jnp.asarray(np.random.default_rng(6).standard_normal((B, 1, H, D)), jnp.bfloat16)
    q_pos = jnp.asarray([[4], [8], [11]], jnp.int32)
    rounded = ring.replace(keys=ring.keys.astype(jnp.bfloat16), values=ring.values.astype(jnp.bfloat16))
    kw = {}
    if stacked:
        ring, rounded = _two_layers(ring), _two_layers(rounded)
        kw = dict(layer=jnp.int32(1), max_chunk=4)
    got = kvc.attend(q, ring, q_pos, True, None, **kw)
    want = kvc.attend(q, rounded, q_pos, True, None, **kw)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_bf16_attention_over_one_chunk_of_a_stacked_ring_equals_the_layer_path_bit_for_bit():
    # One chunk is the plain softmax: both layouts round the probabilities and values to the compute dtype
    # for the p.v dot, in the same order, so they agree exactly (several chunks differ only by the online
    # softmax's rescaling).
    ring = _filled_ring([5, 9, 12])
    ring = ring.replace(keys=ring.keys.astype(jnp.bfloat16), values=ring.values.astype(jnp.bfloat16))
    q = jnp.asarray(np.random.default_rng(7).standard_normal((B, 1, H, D)), jnp.bfloat16)
    q_pos = jnp.asarray([[4], [8], [11]], jnp.int32)
    stacked = _two_layers(ring)
    layer = kvc.attend(q, ring, q_pos, True, None, min_prefix=C)
    chunked = kvc.attend(q, stacked, q_pos, True, None, layer=jnp.int32(1), max_chunk=C)
    np.testing.assert_array_equal(np.asarray(chunked, np.float32), np.asarray(layer, np.float32))
