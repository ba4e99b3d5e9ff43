"""Ring-buffer KV cache with absolute positions (reference `RingKVCache`), as an explicit pytree.

Keys are stored already rotated (RoPE is applied before the write). A slot that was never written
has position -1 and is masked out, so a reset only needs to clear positions and offsets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


@struct.dataclass
class KVCache:
    keys: Array  # [B, C, H, D]
    values: Array  # [B, C, H, D]
    positions: Array  # [B, C] int32 absolute position held by each slot, -1 if empty


def init_kv_cache(batch_size: int, capacity: int, num_heads: int, head_dim: int,
                  dtype: jnp.dtype = jnp.float32) -> KVCache:
    shape = (batch_size, capacity, num_heads, head_dim)
    return KVCache(
        keys=jnp.zeros(shape, dtype),
        values=jnp.zeros(shape, dtype),
        positions=jnp.full((batch_size, capacity), -1, jnp.int32),
    )


def write(cache: KVCache, k: Array, v: Array, positions: Array) -> KVCache:
    """Write `T` new entries (`k`, `v` `[B, T, H, D]` at absolute `positions` `[B, T]`) into their
    slots `position % capacity`. All `T` entries are written before anyone attends, as in the
    reference: with `T > 1` and a full ring the first query of the chunk loses its oldest key."""
    B = k.shape[0]
    capacity = cache.keys.shape[1]
    slots = positions % capacity
    b = jnp.arange(B)[:, None]
    return KVCache(
        keys=cache.keys.at[b, slots].set(k.astype(cache.keys.dtype)),
        values=cache.values.at[b, slots].set(v.astype(cache.values.dtype)),
        positions=cache.positions.at[b, slots].set(positions.astype(jnp.int32)),
    )
