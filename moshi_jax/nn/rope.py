"""Rotary and sinusoidal position embeddings (reference `moshi.modules.rope`, `create_sin_embedding`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def apply_rope(q: Array, k: Array, positions: Array, max_period: float, interleave: bool = True
               ) -> tuple[Array, Array]:
    """Rotate q, k `[B, T, H, D]` by absolute `positions` `[B, T]`.

    Interleaved pairs (x[2i], x[2i+1]) rotate as complex numbers (GPT-J style, the reference's "rope");
    `interleave=False` pairs the two halves ("rope_concat"). Angles are computed in float32.
    """
    D = q.shape[-1]
    freqs = jnp.exp(jnp.arange(D // 2, dtype=jnp.float32) * (-math.log(max_period) * 2 / D))
    angle = positions.astype(jnp.float32)[:, :, None, None] * freqs  # [B, T, 1, D/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)

    def rotate(x: Array) -> Array:
        if interleave:
            xr = x.reshape(*x.shape[:-1], D // 2, 2).astype(jnp.float32)
            re, im = xr[..., 0], xr[..., 1]
        else:
            re, im = x[..., : D // 2].astype(jnp.float32), x[..., D // 2:].astype(jnp.float32)
        out_re, out_im = re * cos - im * sin, re * sin + im * cos
        if interleave:
            return jnp.stack([out_re, out_im], axis=-1).reshape(x.shape).astype(x.dtype)
        return jnp.concatenate([out_re, out_im], axis=-1).astype(x.dtype)

    return rotate(q), rotate(k)


def sin_embedding(positions: Array, dim: int, max_period: float = 10_000.0, dtype=jnp.float32) -> Array:
    """`[B, T]` positions -> `[B, T, dim]` as `cat([cos, sin])` (reference `create_sin_embedding`)."""
    half = dim // 2
    adim = jnp.arange(half, dtype=dtype)[None, None, :]
    phase = positions.astype(dtype)[:, :, None] / (jnp.asarray(max_period, dtype) ** (adim / (half - 1)))
    return jnp.concatenate([jnp.cos(phase), jnp.sin(phase)], axis=-1)
