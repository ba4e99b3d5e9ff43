"""Mimi's encoder / decoder transformer: the shared `TransformerLayer`, unrolled with per-layer params.

Why not the shared scanned `Transformer`: in streaming Mimi feeds 2 steps per call, so the stack is
bound by reading its 100 MB of weights; under `scan` each layer's weights are first copied out of
the stacked array (a dynamic slice), which costs about 40 % more time on CPU. Here every layer owns
its params (`layer_{i}`) and its KV ring, so nothing is copied. Semantics are the shared layer's:
pre-norm LayerNorm, LayerScale, interleaved RoPE on absolute positions, causal sliding window, and
a KV ring written before attending (the reference's chunked-ring behaviour).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moshi_jax.nn import kv_cache as kvc
from moshi_jax.nn.transformer import TransformerConfig, TransformerLayer

Array = jax.Array


@struct.dataclass
class StackState:
    offset: Array  # [B] int32: absolute position of the next step
    layers: tuple[kvc.KVCache, ...]  # one ring per layer: keys/values [B, context, H, Dh], positions [B, context]


def init_stack_state(cfg: TransformerConfig, batch_size: int) -> StackState:
    """Fresh state (empty rings, offset 0); needs no params."""
    layers = tuple(kvc.init_kv_cache(batch_size, cfg.cache_capacity, cfg.num_heads, cfg.head_dim,
                                     jnp.dtype(cfg.dtype)) for _ in range(cfg.num_layers))
    return StackState(offset=jnp.zeros((batch_size,), jnp.int32), layers=layers)


class UnrolledTransformer(nn.Module):
    """`(x [B, T, d], state) -> (y [B, T, d], state)`; `state=None`: one-shot at positions 0..T-1."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: Array, state: StackState | None = None) -> tuple[Array, StackState | None]:
        cfg = self.cfg
        B, T, _ = x.shape
        offset = jnp.zeros((B,), jnp.int32) if state is None else state.offset
        positions = offset[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
        caches = []
        for i in range(cfg.num_layers):
            x, cache = TransformerLayer(cfg, name=f"layer_{i}")(
                x, None if state is None else state.layers[i], positions, None)
            caches.append(cache)
        if state is None:
            return x, None
        return x, StackState(offset=state.offset + T, layers=tuple(caches))
