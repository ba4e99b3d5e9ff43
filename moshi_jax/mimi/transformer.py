"""Mimi's encoder / decoder transformer (reference `ProjectedTransformer` with d_model = latent width).

Pre-norm layers: x += LayerScale(attn(LayerNorm(x))); x += LayerScale(MLP(LayerNorm(x))), with fused
q/k/v projection, interleaved RoPE on absolute positions, causal sliding window `context`, exact-GELU
MLP. Parameter names, shapes and logical axes are those of the shared `moshi_jax.nn` layers (whose
Norm, MLP, RoPE and one-shot attention are used here), so the same checkpoint mapping applies.

Two streaming-specific choices, both for speed (a streamed 80 ms frame feeds only 2 steps, so the
stack is bound by memory traffic, not arithmetic):
- layers are unrolled, each with its own params (`layer_{i}`) and KV ring: under `scan`, every
  layer's weights are first copied out of the stacked array (about 40 % slower on CPU);
- the ring stores keys and values both `[B, H, Dh, C]`: both attention matmuls then contract the ring's
  innermost axis and read it in place (with `[B, C, H, Dh]`, XLA transposes both rings in every layer and
  step; values as `[B, H, C, Dh]` put the contraction on an outer axis, a slow matmul form on CPU).
The ring semantics are the reference's `RingKVCache`: all new steps are written before attending
(with 2 steps per call and a full ring, the first step loses its oldest key), slots hold absolute
positions (-1 = empty), and a key is visible iff 0 <= q_pos - k_pos < context.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moshi_jax.nn.attention import NEG_INF, dot_attention, fan_in_normal
from moshi_jax.nn.mlp import MLP
from moshi_jax.nn.norms import Norm
from moshi_jax.nn.rope import apply_rope
from moshi_jax.nn.transformer import TransformerConfig

Array = jax.Array


@struct.dataclass
class RingCache:
    keys: Array  # [B, H, Dh, C]
    values: Array  # [B, H, Dh, C]
    positions: Array  # [B, C] int32 absolute position held by each slot, -1 if empty


@struct.dataclass
class StackState:
    offset: Array  # [B] int32: absolute position of the next step
    layers: tuple[RingCache, ...]  # one ring per layer


def init_stack_state(cfg: TransformerConfig, batch_size: int) -> StackState:
    """Fresh state (empty rings, offset 0); needs no params."""
    B, H, Dh, C = batch_size, cfg.num_heads, cfg.head_dim, cfg.cache_capacity
    dtype = jnp.dtype(cfg.dtype)
    layers = tuple(RingCache(keys=jnp.zeros((B, H, Dh, C), dtype), values=jnp.zeros((B, H, Dh, C), dtype),
                             positions=jnp.full((B, C), -1, jnp.int32))
                   for _ in range(cfg.num_layers))
    return StackState(offset=jnp.zeros((B,), jnp.int32), layers=layers)


def _write(cache: RingCache, k: Array, v: Array, positions: Array) -> RingCache:
    """Write k, v `[B, T, H, Dh]` at absolute `positions` `[B, T]` into slots `position % C`."""
    slots = positions % cache.positions.shape[1]

    def one(c: RingCache, kk: Array, vv: Array, pos: Array, sl: Array) -> RingCache:
        return RingCache(keys=c.keys.at[:, :, sl].set(kk.transpose(1, 2, 0).astype(c.keys.dtype)),
                         values=c.values.at[:, :, sl].set(vv.transpose(1, 2, 0).astype(c.values.dtype)),
                         positions=c.positions.at[sl].set(pos))

    return jax.vmap(one)(cache, k, v, positions, slots)


def _ring_attention(q: Array, cache: RingCache, q_pos: Array, context: int) -> Array:
    """q `[B, T, H, Dh]` over the ring -> `[B, T, H, Dh]` (causal, sliding window)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bthd,bhds->bhts", q, cache.keys.astype(q.dtype)).astype(jnp.float32) * scale
    delta = q_pos[:, :, None] - cache.positions[:, None, :]
    valid = (cache.positions[:, None, :] >= 0) & (delta >= 0) & (delta < context)
    probs = jax.nn.softmax(jnp.where(valid[:, None], scores, NEG_INF), axis=-1).astype(q.dtype)
    return jnp.einsum("bhts,bhds->bthd", probs, cache.values.astype(q.dtype))


class Attention(nn.Module):
    """Self-attention `(x [B, T, d], positions [B, T], cache) -> (y, cache)`; params as `nn.attention.Attention`."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: Array, positions: Array, cache: RingCache | None) -> tuple[Array, RingCache | None]:
        cfg = self.cfg
        d, H, Dh = cfg.d_model, cfg.num_heads, cfg.head_dim
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        w_in = self.param("in_proj", nn.with_logical_partitioning(
            fan_in_normal(d), ("embed", "qkv", "heads", "head_dim")), (d, 3, H, Dh), pdtype)
        w_out = self.param("out_proj", nn.with_logical_partitioning(
            fan_in_normal(d), ("heads", "head_dim", "embed")), (H, Dh, d), pdtype)
        qkv = jnp.einsum("btd,dphk->btphk", x.astype(dtype), w_in.astype(dtype))
        q, k = apply_rope(qkv[:, :, 0], qkv[:, :, 1], positions, cfg.max_period, interleave=True)
        v = qkv[:, :, 2]
        if cache is None:
            out = dot_attention(q, k, v, positions, positions, True, cfg.context)
        else:
            cache = _write(cache, k, v, positions)
            out = _ring_attention(q, cache, positions, cfg.context)
        return jnp.einsum("bthk,hkd->btd", out, w_out.astype(dtype)), cache


class Layer(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: Array, positions: Array, cache: RingCache | None) -> tuple[Array, RingCache | None]:
        cfg = self.cfg
        pdtype = jnp.dtype(cfg.param_dtype)
        h, cache = Attention(cfg, name="self_attn")(Norm(cfg.norm, cfg.d_model, pdtype, name="norm1")(x),
                                                      positions, cache)
        x = x + self._scale(h, "layer_scale_1")
        h = MLP(cfg.d_model, cfg.dim_feedforward, cfg.gating, cfg.activation, 0, jnp.dtype(cfg.dtype), pdtype,
                name="mlp")(Norm(cfg.norm, cfg.d_model, pdtype, name="norm2")(x))
        return x + self._scale(h, "layer_scale_2"), cache

    def _scale(self, h: Array, name: str) -> Array:
        scale = self.param(name, nn.with_logical_partitioning(nn.initializers.constant(self.cfg.layer_scale),
                                                              ("norm",)), (self.cfg.d_model,),
                           jnp.dtype(self.cfg.param_dtype))
        return h * scale.astype(h.dtype)


class MimiTransformer(nn.Module):
    """`(x [B, T, d], state) -> (y [B, T, d], state)`; `state=None`: one-shot at positions 0..T-1."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: Array, state: StackState | None = None) -> tuple[Array, StackState | None]:
        cfg = self.cfg
        if not (cfg.causal and cfg.context and cfg.layer_scale is not None and cfg.positional_embedding == "rope"
                and not cfg.weights_per_step):
            raise ValueError("MimiTransformer expects a causal, windowed, LayerScale, RoPE transformer config")
        B, T, _ = x.shape
        offset = jnp.zeros((B,), jnp.int32) if state is None else state.offset
        positions = offset[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
        caches = []
        for i in range(cfg.num_layers):
            x, cache = Layer(cfg, name=f"layer_{i}")(x, positions, None if state is None else state.layers[i])
            caches.append(cache)
        if state is None:
            return x, None
        return x, StackState(offset=state.offset + T, layers=tuple(caches))
