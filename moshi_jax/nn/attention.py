"""Multi-head self-attention with RoPE, causal sliding-window masks and an optional KV ring buffer.

Matches `moshi.modules.transformer.StreamingMultiheadAttention` (fused q/k/v projection, no biases,
scale 1/sqrt(head_dim)), including `weights_per_step` (one projection per position, used by the depth
transformer).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from moshi_jax.nn import kv_cache as kvc
from moshi_jax.nn.matmul import einsum
from moshi_jax.nn.quant import QuantizedWeight
from moshi_jax.nn.rope import apply_rope

Array = jax.Array
NEG_INF = -1e30  # finite, so a fully masked row cannot produce NaN


def per_step_param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
                   mult: int, init, dtype) -> Array:
    """A kernel, with a leading `steps` axis of size `mult` when weights differ per position."""
    if mult:
        return module.param(name, nn.with_logical_partitioning(_stacked(init, mult), ("steps",) + axes),
                            (mult,) + shape, dtype)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def apply_kernel(spec: str, x: Array, kernel: Array, step_index: Array | None, dtype=None) -> Array:
    """`einsum(spec)` of x `[B, T, ...]` with a plain kernel, or with per-step kernels gathered at
    `step_index` `[T]` (the kernel's leading axis); the kernel is cast to `dtype` after the gather. An int8
    kernel (`nn.quant.QuantizedWeight`) is dequantized where the dot reads it (fused into it on GPU / TPU)."""
    if isinstance(kernel, QuantizedWeight):
        kernel = kernel.dequantize(dtype or jnp.float32)
    if step_index is None:
        return einsum(spec, x, kernel if dtype is None else kernel.astype(dtype))
    if step_index.shape[0] == 1:
        # One position (streaming): slice this step's kernel and use a plain dot. A batched dot over a size-1
        # step axis makes XLA (CPU) copy and transpose the step's weights first.
        kernel = jax.lax.dynamic_index_in_dim(kernel, step_index[0], axis=0, keepdims=False)
        return einsum(spec, x, kernel if dtype is None else kernel.astype(dtype))
    lhs, out = spec.split("->")
    xs, ks = lhs.split(",")
    kernel = kernel[step_index]
    return einsum(f"{xs},t{ks}->{out}", x, kernel if dtype is None else kernel.astype(dtype))


def _stacked(init, mult: int):
    def stacked_init(key, shape, dtype=jnp.float32):
        keys = jax.random.split(key, mult)
        return jnp.stack([init(k, shape[1:], dtype) for k in keys])

    return stacked_init


def dot_attention(q: Array, k: Array, v: Array, q_pos: Array, k_pos: Array, causal: bool,
                  context: int | None) -> Array:
    """q `[B, T, H, D]`, k/v `[B, S, H, D]`, positions `[B, T]` / `[B, S]` (-1 = empty slot)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) * scale
    valid = k_pos[:, None, :] >= 0
    if causal:
        delta = q_pos[:, :, None] - k_pos[:, None, :]
        valid = valid & (delta >= 0)
        if context is not None:
            valid = valid & (delta < context)
    scores = jnp.where(valid[:, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return einsum("bhts,bshd->bthd", probs, v)


class Attention(nn.Module):
    """`__call__(x [B, T, d], positions [B, T], cache, step_index) -> (y [B, T, d], cache)`.

    Without a cache, attends within `x` (training / one-shot). With a `KVCache`, writes this chunk's
    keys and values into the ring first, then attends over the ring (streaming); with `layer`, the cache
    holds all layers stacked and only that layer's ring is used."""

    # (no defaults for the stack's hyperparameters: TransformerConfig is their one source)
    dim: int
    num_heads: int
    causal: bool
    context: int | None
    rope: str  # "rope" (interleaved) | "rope_concat" | "none"
    max_period: float
    weights_per_step: int  # number of distinct per-position weight sets (0: shared)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, positions: Array, cache: kvc.KVCache | None = None,
                 step_index: Array | None = None, layer: Array | None = None) -> tuple[Array, kvc.KVCache | None]:
        H = self.num_heads
        Dh = self.dim // H
        w_in = per_step_param(self, "in_proj", (self.dim, 3, H, Dh), ("embed", "qkv", "heads", "head_dim"),
                              self.weights_per_step, fan_in_normal(self.dim), self.param_dtype)
        w_out = per_step_param(self, "out_proj", (H, Dh, self.dim), ("heads", "head_dim", "embed"),
                               self.weights_per_step, fan_in_normal(self.dim), self.param_dtype)
        qkv = apply_kernel("btd,dphk->btphk", x.astype(self.dtype), w_in, step_index, self.dtype)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.rope != "none":
            q, k = apply_rope(q, k, positions, self.max_period, interleave=self.rope == "rope")
        if cache is None:
            out = dot_attention(q, k, v, positions, positions, self.causal, self.context)
        else:  # `layer`: the cache is the whole stack [L, ...], updated in place at that layer
            cache = kvc.write(cache, k, v, positions, layer)
            out = kvc.attend(q, cache, positions, self.causal, self.context, layer)
        y = apply_kernel("bthk,hkd->btd", out, w_out, step_index, self.dtype)
        return y, cache


def fan_in_normal(fan_in: int):
    """Truncated normal, std 1/sqrt(fan_in) (reference `_init_layer` for the temporal transformer)."""
    std = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.truncated_normal(key, -3.0, 3.0, shape, dtype)

    return init

