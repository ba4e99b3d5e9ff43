"""Feed-forward blocks: plain MLP (Mimi) and activation-gated MLP (Helium / depth transformer)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moshi_jax.nn.attention import apply_kernel, fan_in_normal, per_step_param
from moshi_jax.nn.matmul import einsum

Array = jax.Array

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch F.gelu is exact
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "elu": jax.nn.elu,
}


def gated_hidden_dim(dim: int, dim_feedforward: int) -> int:
    """Hidden width of the reference's ActivationGating for a given `dim_feedforward`."""
    return (21 * dim) // 8 if dim_feedforward == 4 * dim else (2 * dim_feedforward) // 3


class MLP(nn.Module):
    """`gating == "none"`: linear2(act(linear1(x))). Otherwise linear_out(act(gate) * value) with
    `linear_in` producing (gate, value) halves, per step if `weights_per_step`."""

    # No defaults: the transformer configs (nn.transformer.TransformerConfig, mimi's) are the one source of each.
    dim: int
    dim_feedforward: int
    gating: str
    activation: str
    weights_per_step: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: Array, step_index: Array | None = None) -> Array:
        x = x.astype(self.dtype)
        if self.gating == "none":
            if self.weights_per_step:
                raise ValueError("weights_per_step needs a gated MLP (as in the reference)")
            act = ACTIVATIONS[self.activation]
            w1 = self.param("linear1", nn.with_logical_partitioning(fan_in_normal(self.dim), ("embed", "mlp")),
                            (self.dim, self.dim_feedforward), self.param_dtype)
            w2 = self.param("linear2", nn.with_logical_partitioning(
                fan_in_normal(self.dim_feedforward), ("mlp", "embed")), (self.dim_feedforward, self.dim),
                self.param_dtype)
            return einsum("btf,fd->btd", act(einsum("btd,df->btf", x, w1.astype(self.dtype))), w2.astype(self.dtype))
        act = ACTIVATIONS[self.gating]
        hidden = gated_hidden_dim(self.dim, self.dim_feedforward)
        w_in = per_step_param(self, "linear_in", (self.dim, 2, hidden), ("embed", "gate", "mlp"),
                              self.weights_per_step, fan_in_normal(self.dim), self.param_dtype)
        w_out = per_step_param(self, "linear_out", (hidden, self.dim), ("mlp", "embed"),
                               self.weights_per_step, fan_in_normal(hidden), self.param_dtype)
        h = apply_kernel("btd,dgf->btgf", x, w_in, step_index, self.dtype)
        h = act(h[:, :, 0]) * h[:, :, 1]
        return apply_kernel("btf,fd->btd", h, w_out, step_index, self.dtype)
