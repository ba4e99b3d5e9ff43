"""Symmetric int8 quantization for serving: weight-only int8 kernels and the int8 KV ring's write side.

    q = quantize_int8(x, axes)            # QuantizedWeight(q int8, scale float32): x ~ q * scale
    x_hat = q.dequantize(jnp.bfloat16)    # q * scale, rounded once to the compute dtype
    layer = quantize_layer_params(tree)   # a transformer layer's big kernels -> QuantizedWeight

Scales are the absolute maximum over the reduced `axes` / 127 (kept as size-1 axes), so every entry
round-trips within half a step: |x - q * scale| <= scale / 2 = amax / 254 (0.39% of its group's maximum).

Weights: one scale per output channel (the kernel's contracted axes are reduced). The kernel stays int8 in
memory and is dequantized where the matmul reads it (`nn.attention.apply_kernel`): XLA fuses the convert and
scale into the dot's operand on GPU / TPU, so a decode step reads half the weight bytes.

KV ring (`nn.kv_cache`, `init_kv_cache(..., dtype=jnp.int8)`): keys and values are quantized on write with
one scale per (position, head) (`quantize_heads`); attention never rescales the ring: the key scales
multiply the scores q.k (one per key slot) and the value scales the probabilities before p.v.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array
QMAX = 127  # symmetric: -127..127 (-128 unused, so that negation is exact)
KV_CACHE_DTYPES = (None, "int8")  # None: the model's compute dtype
WEIGHT_DTYPES = (None, "int8")  # None: the params as they are

#: A transformer layer's kernels quantized by `quantize_layer_params` -> their contracted axes (counted from
#: the end, so that a leading per-step axis does not matter). Norm scales and LayerScales stay as they are.
CONTRACTED_AXES = {
    "in_proj": (-4,),  # [dim, 3, H, Dh]
    "out_proj": (-3, -2),  # [H, Dh, dim]
    "linear_in": (-3,),  # [dim, 2, hidden]
    "linear_out": (-2,),  # [hidden, dim]
    "linear1": (-2,),  # [dim, ff] (plain MLP)
    "linear2": (-2,),  # [ff, dim]
}


@struct.dataclass
class QuantizedWeight:
    """An int8 tensor and its float32 scales (same rank, size 1 along the quantized-over axes)."""

    q: Array  # int8, the original shape
    scale: Array  # float32, broadcastable to `q`

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def ndim(self) -> int:
        return self.q.ndim

    def dequantize(self, dtype=jnp.float32) -> Array:
        """q * scale in float32, rounded once to `dtype`."""
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)

    def astype(self, dtype) -> Array:
        """Dequantized (so that code written for plain kernels, `w.astype(dtype)`, reads it unchanged)."""
        return self.dequantize(dtype)


def check_dtype_option(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)} (None: keep the model's dtype), got {value!r}")


def quantize_int8(x: Array, axes: int | Sequence[int]) -> QuantizedWeight:
    """Symmetric int8 quantization of `x` with one scale per slice over `axes` (amax / 127; an all-zero
    slice gets scale 0 and quantizes to 0)."""
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    x32 = jnp.asarray(x, jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=axes, keepdims=True) / QMAX
    q = jnp.round(x32 / jnp.where(scale > 0, scale, 1.0))
    return QuantizedWeight(q=jnp.clip(q, -QMAX, QMAX).astype(jnp.int8), scale=scale)


def quantize_heads(x: Array) -> tuple[Array, Array]:
    """KV entries x `[B, T, H, D]` -> (int8 `[B, T, H, D]`, float32 scales `[B, T, H]`): one scale per
    (position, head)."""
    qw = quantize_int8(x, -1)
    return qw.q, qw.scale[..., 0]


def quantize_layer_leaf(path: Sequence[Any], leaf: Any) -> Any:
    """`leaf` quantized per output channel if its name (the last key of `path`) is a big kernel of
    `CONTRACTED_AXES`, else unchanged (and an already quantized leaf stays as it is)."""
    name = getattr(path[-1], "key", None) if path else None
    if name not in CONTRACTED_AXES or isinstance(leaf, QuantizedWeight):
        return leaf
    return quantize_int8(leaf, CONTRACTED_AXES[name])


def quantize_layer_params(tree: Any) -> Any:
    """A (per-layer or per-step) transformer param tree with its big kernels as `QuantizedWeight`s."""
    return jax.tree_util.tree_map_with_path(quantize_layer_leaf, tree,
                                            is_leaf=lambda n: isinstance(n, QuantizedWeight))


def nbytes(tree: Any) -> int:
    """Bytes held by the arrays of `tree` (int8 kernels and their scales included)."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
