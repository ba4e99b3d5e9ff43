"""Normalisations used by the reference transformers (`create_norm_fn` names)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# name -> (kind, eps). Every norm computes in float32 and rounds once to the input dtype: on bfloat16 input
# that is what the reference gives for all four, bit for bit (PyTorch's CPU LayerNorm / RMSNorm ops accumulate
# in float32 too, the "_f32" variants cast explicitly); computing the plain ones in bf16 differed by one bf16
# ulp on about 40% of the values (tests/nn/test_transformer_parity.py).
NORMS: dict[str, tuple[str, float]] = {
    "layer_norm": ("layer", 1e-5),
    "layer_norm_f32": ("layer", 1e-8),
    "rms_norm": ("rms", 1e-5),
    "rms_norm_f32": ("rms", 1e-8),
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
        family, eps = NORMS[self.kind]
        in_dtype = x.dtype
        h = x.astype(jnp.float32)  # (bf16 / f16 params promote to float32 against it, exactly)
        if family == "rms":
            alpha = self.param("alpha", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                               (self.dim,), self.param_dtype)
            var = eps + jnp.mean(jnp.square(h), axis=-1, keepdims=True)
            y = h * (alpha * jax.lax.rsqrt(var))
        else:
            scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                               (self.dim,), self.param_dtype)
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                              (self.dim,), self.param_dtype)
            mean = jnp.mean(h, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
            y = (h - mean) * jax.lax.rsqrt(var + eps) * scale + bias
        return y.astype(in_dtype)
