"""Normalisations used by the reference transformers (`create_norm_fn` names)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# name -> (kind, eps, computed in float32)
NORMS: dict[str, tuple[str, float, bool]] = {
    "layer_norm": ("layer", 1e-5, False),
    "layer_norm_f32": ("layer", 1e-8, True),
    "rms_norm": ("rms", 1e-5, False),
    "rms_norm_f32": ("rms", 1e-8, True),
}


class Norm(nn.Module):
    """LayerNorm (`scale`, `bias`) or RMSNorm (`alpha`) over the last axis, as named in `NORMS`."""

    kind: str
    dim: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.kind not in NORMS:
            raise ValueError(f"unknown norm {self.kind!r}; expected one of {sorted(NORMS)}")
        family, eps, f32 = NORMS[self.kind]
        in_dtype = x.dtype
        h = x.astype(jnp.float32) if f32 else x
        if family == "rms":
            alpha = self.param("alpha", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                               (self.dim,), self.param_dtype)
            var = eps + jnp.mean(jnp.square(h), axis=-1, keepdims=True)
            y = h * (alpha.astype(var.dtype) * jax.lax.rsqrt(var))
        else:
            scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                               (self.dim,), self.param_dtype)
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                              (self.dim,), self.param_dtype)
            mean = jnp.mean(h, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
            y = (h - mean) * jax.lax.rsqrt(var + eps) * scale.astype(h.dtype) + bias.astype(h.dtype)
        return y.astype(in_dtype)
