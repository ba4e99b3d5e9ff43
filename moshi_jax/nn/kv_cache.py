"""Ring-buffer KV cache with absolute positions (reference `RingKVCache`), as an explicit pytree.

Keys are stored already rotated (RoPE is applied before the write). A slot that was never written
has position -1 and is masked out, so a reset only needs to clear positions and offsets.

Layout: keys `[B, H, D, C]`, values `[B, H, C, D]`, the operand layouts of the two attention dots (q.k^T
and p.v), so XLA reads them without transposing copies. With
`layer` given, the leaves are stacked over layers `[L, ...]` and only that layer is written / read, so a
layer loop can carry the whole stack and update it in place (no per-layer copies of the ring).

int8 ring (`init_kv_cache(..., dtype=jnp.int8)`, the serving option that halves the state): keys / values are
stored as int8 with one float32 scale per (position, head) beside them (`key_scales` / `value_scales`
`[B, H, C]`), quantized on write (`nn.quant.quantize_heads`); attention applies the key scales to the scores
and the value scales to the probabilities, so the ring is never rescaled (it is only converted to the compute
dtype for the two dots; XLA:TPU materialises that converted copy one layer at a time, see README).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from moshi_jax.nn import backend, quant

Array = jax.Array
_CHUNK = 512  # attention walks a stacked ring in chunks of at most this many slots (see `attend`)
_PREFIX = 64  # smallest prefix of a per-layer ring that attention reads (see `prefix_sizes`)


@struct.dataclass
class KVCache:
    keys: Array  # [B, H, D, C] (stacked over layers: [L, B, H, D, C])
    values: Array  # [B, H, C, D] (stacked: [L, B, H, C, D])
    positions: Array  # [B, C] int32 absolute position held by each slot, -1 if empty
    # int8 ring only (else None): float32 scale of each slot's key / value per head, [B, H, C] ([L, B, H, C])
    key_scales: Array | None = None
    value_scales: Array | None = None


def init_kv_cache(batch_size: int, capacity: int, num_heads: int, head_dim: int,
                  dtype: jnp.dtype = jnp.float32) -> KVCache:
    """Empty ring; `dtype` int8: the quantized ring (int8 keys / values plus per-(position, head) scales)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.integer) and dtype != jnp.int8:
        raise ValueError(f"a KV cache is floating point or int8 (quantized), got {dtype}")
    scales = None
    if dtype == jnp.int8:
        scales = jnp.zeros((batch_size, num_heads, capacity), jnp.float32)
    return KVCache(
        keys=jnp.zeros((batch_size, num_heads, head_dim, capacity), dtype),
        values=jnp.zeros((batch_size, num_heads, capacity, head_dim), dtype),
        positions=jnp.full((batch_size, capacity), -1, jnp.int32),
        key_scales=scales,
        value_scales=None if scales is None else jnp.zeros_like(scales),
    )


def write(cache: KVCache, k: Array, v: Array, positions: Array, layer: Array | None = None) -> KVCache:
    """Write `T` new entries (`k`, `v` `[B, T, H, D]` at absolute `positions` `[B, T]`) into their
    slots `position % capacity` (of layer `layer` when the cache is stacked). All `T` entries are written
    before anyone attends, as in the reference: with `T > 1` and a full ring the first query of the chunk
    loses its oldest key."""
    B = k.shape[0]
    capacity = cache.positions.shape[-1]
    slots = positions % capacity
    b = jnp.arange(B)[:, None]
    lead = (b,) if layer is None else (layer, b)
    quantized = cache.key_scales is not None
    if quantized:  # scales [B, T, H]
        (k, k_scale), (v, v_scale) = quant.quantize_heads(k), quant.quantize_heads(v)
    else:
        k, v = k.astype(cache.keys.dtype), v.astype(cache.values.dtype)
    scales = (cache.key_scales, cache.value_scales)
    if layer is None and backend.choices().ring_write == "update_slices":
        keys, values = _write_by_update_slices(cache.keys, cache.values, k, v, slots)
        if quantized:
            scales = _write_by_update_slices(*scales, k_scale[..., None], v_scale[..., None], slots, scales=True)
    else:  # advanced indices around slices: the update's dims are [B, T] then [H, D], i.e. k's own layout
        keys = cache.keys.at[lead + (slice(None), slice(None), slots)].set(k)
        values = cache.values.at[lead + (slice(None), slots)].set(v)
        if quantized:
            scales = tuple(a.at[lead + (slice(None), slots)].set(x)
                           for a, x in zip(scales, (k_scale, v_scale), strict=True))
    return KVCache(keys=keys, values=values,
                   positions=cache.positions.at[lead + (slots,)].set(positions.astype(jnp.int32)),
                   key_scales=scales[0], value_scales=scales[1])


def _write_by_update_slices(keys: Array, values: Array, k: Array, v: Array, slots: Array,
                            scales: bool = False) -> tuple[Array, Array]:
    """The scatter of `write` as a loop of one-slot `dynamic_update_slice`s (one per item and position), which
    update the ring in place on every backend. (XLA:CPU has no bf16 scatter: it converts the whole ring to
    float32, scatters there and converts back, i.e. two float32 copies of every layer's ring per step.)
    `scales`: the rings are an int8 cache's scales `[B, H, C]` and k / v their new entries `[B, T, H, 1]`."""
    B, T = slots.shape

    def one(i, kv):
        ks, vs = kv
        b, t = i // T, i % T
        kn = jax.lax.dynamic_slice(k, (b, t, 0, 0), (1, 1) + k.shape[2:])[:, 0]  # [1, H, D]
        vn = jax.lax.dynamic_slice(v, (b, t, 0, 0), (1, 1) + v.shape[2:])[:, 0]  # [1, H, D]
        slot = slots[b, t]
        if scales:  # [1, H, 1] at slot
            return (jax.lax.dynamic_update_slice(ks, kn, (b, 0, slot)),
                    jax.lax.dynamic_update_slice(vs, vn, (b, 0, slot)))
        return (jax.lax.dynamic_update_slice(ks, kn[..., None], (b, 0, 0, slot)),  # [1, H, D, 1]
                jax.lax.dynamic_update_slice(vs, vn[:, :, None, :], (b, 0, slot, 0)))  # [1, H, 1, D]

    return jax.lax.fori_loop(0, B * T, one, (keys, values))


def _chunk_size(capacity: int, max_chunk: int = _CHUNK) -> int:
    """Largest divisor of `capacity` that is <= max_chunk (the ring is walked in equal chunks)."""
    for s in range(min(capacity, max_chunk), 0, -1):
        if capacity % s == 0:
            return s
    return capacity


def _valid(kp: Array, q_pos: Array, causal: bool, context: int | None) -> Array:
    """kp `[B, S]` slot positions, q_pos `[B, T]` -> `[B, 1, T, S]` (broadcast over heads) mask."""
    valid = (kp >= 0)[:, None, :]  # [B, 1, S]
    if causal:
        delta = q_pos[:, :, None] - kp[:, None, :]  # [B, T, S]
        valid = valid & (delta >= 0)
        if context is not None:
            valid = valid & (delta < context)
    return valid[:, None]


def prefix_sizes(capacity: int, smallest: int = _PREFIX) -> tuple[int, ...]:
    """The ring prefixes `attend` may read from a per-layer cache: smallest, 2x, 4x, ... below capacity, and
    the whole ring."""
    sizes = []
    s = smallest
    while s < capacity:
        sizes.append(s)
        s *= 2
    return (*sizes, capacity)


def _attend_layer(q: Array, cache: KVCache, q_pos: Array, causal: bool, context: int | None,
                  smallest: int = _PREFIX) -> Array:
    """`attend` for one layer's own ring, read in place (no chunk copies; a slice that is the whole buffer is
    read where it is). `backend.choices().ring_attention`: "prefix" reads only the prefix of slots that can
    be written (static sizes picked with `lax.switch`; slots fill from 0 up until the ring is full), the
    whole ring once full; "whole" always reads the whole ring (masked)."""
    B, T, H, D = q.shape
    C = cache.positions.shape[-1]
    sizes = prefix_sizes(C, smallest) if backend.choices().ring_attention == "prefix" else (C,)
    scale = 1.0 / math.sqrt(D)
    dtype = q.dtype

    def branch(S):
        def run(q, keys, values, positions, q_pos, k_scales, v_scales):
            ks, vs, kp = (keys, values, positions) if S == C else (keys[..., :S], values[:, :, :S],
                                                                   positions[:, :S])
            s = jnp.einsum("bthd,bhds->bhts", q, ks.astype(dtype), preferred_element_type=jnp.float32) * scale
            if k_scales is not None:  # int8 ring: q.(k_q * scale_s) = (q.k_q) * scale_s
                s = s * k_scales[:, :, None, :S]
            s = jnp.where(_valid(kp, q_pos, causal, context), s, -jnp.inf)
            m = s.max(-1, keepdims=True)
            p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
            den = p.sum(-1)
            pv = p if v_scales is None else p * v_scales[:, :, None, :S]  # sum_s p_s (v_q,s * scale_s)
            acc = jnp.einsum("bhts,bhsd->bhtd", pv.astype(dtype), vs.astype(dtype), preferred_element_type=jnp.float32)
            return acc / jnp.where(den > 0, den, 1.0)[..., None]
        return run

    args = (q, cache.keys, cache.values, cache.positions, q_pos, cache.key_scales, cache.value_scales)
    if len(sizes) == 1:
        out = branch(C)(*args)
    else:
        need = jnp.max(q_pos) + 1  # slots < need can be written while the ring is not full
        index = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), jnp.minimum(need, C))
        out = jax.lax.switch(index, [branch(S) for S in sizes], *args)
    return out.transpose(0, 2, 1, 3).astype(dtype)


def attend(q: Array, cache: KVCache, q_pos: Array, causal: bool, context: int | None,
           layer: Array | None = None, max_chunk: int = _CHUNK, min_prefix: int = _PREFIX) -> Array:
    """Attention of q `[B, T, H, D]` at absolute positions `q_pos` `[B, T]` over the ring (after `write`)
    -> `[B, T, H, D]`. Key slot valid iff its position >= 0 and (causal) 0 <= q_pos - pos < context.

    Only the slots that can hold a written key are read (slots fill from 0 up: positions p <= max(q_pos)
    live in slots <= p while the ring is not full), so the cost grows with the stream's length up to the
    capacity instead of always paying for the whole ring. A layer's own ring (`layer` None) is read in place
    (`_attend_layer`); a stacked ring in chunks with an online softmax. Scores and softmax in
    float32."""
    if layer is None:
        return _attend_layer(q, cache, q_pos, causal, context, min_prefix)
    B, T, H, D = q.shape
    C = cache.positions.shape[-1]
    S = _chunk_size(C, max_chunk)
    n_total = C // S
    scale = 1.0 / math.sqrt(D)
    dtype = q.dtype

    def chunk(i):
        start = i * S
        ks = jax.lax.dynamic_slice(cache.keys, (layer, 0, 0, 0, start), (1, B, H, D, S))[0]
        vs = jax.lax.dynamic_slice(cache.values, (layer, 0, 0, start, 0), (1, B, H, S, D))[0]
        kp = jax.lax.dynamic_slice(cache.positions, (layer, 0, start), (1, B, S))[0]
        s = jnp.einsum("bthd,bhds->bhts", q, ks.astype(dtype), preferred_element_type=jnp.float32) * scale
        v_scale = None
        if cache.key_scales is not None:  # int8 ring: scales [B, H, S] of the keys (scores) and values (probs)
            k_scale, v_scale = (jax.lax.dynamic_slice(a, (layer, 0, 0, start), (1, B, H, S))[0]
                                for a in (cache.key_scales, cache.value_scales))
            s = s * k_scale[:, :, None, :]
        return jnp.where(_valid(kp, q_pos, causal, context), s, -jnp.inf), vs.astype(dtype), v_scale

    def accumulate(i, carry):
        m, den, acc = carry  # running max [B, H, T], denominator [B, H, T], numerator [B, H, T, D] (float32)
        s, vs, v_scale = chunk(i)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # a row with nothing valid yet
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        den = den * corr + p.sum(-1)
        pv = p if v_scale is None else p * v_scale[:, :, None, :]
        acc = acc * corr[..., None] + jnp.einsum("bhts,bhsd->bhtd", pv.astype(dtype), vs,
                                                 preferred_element_type=jnp.float32)
        return m_new, den, acc

    init = (jnp.full((B, H, T), -jnp.inf, jnp.float32), jnp.zeros((B, H, T), jnp.float32),
            jnp.zeros((B, H, T, D), jnp.float32))
    if n_total == 1:
        _, den, acc = accumulate(0, init)
    else:
        last = jnp.max(q_pos)
        n = jnp.clip(jnp.where(last >= C - 1, n_total, last // S + 1), 1, n_total)
        _, den, acc = jax.lax.fori_loop(0, n, accumulate, init)
    out = acc / jnp.where(den > 0, den, 1.0)[..., None]
    return out.transpose(0, 2, 1, 3).astype(dtype)
