"""Streaming transformer stack (reference `StreamingTransformer`), layers stacked and scanned.

`Transformer(cfg)(x [B, T, d], state) -> (y, state)`: with `state=None` it runs one-shot over `x`
(positions 0..T-1); with a `TransformerState` it continues a stream from `state.offset`, reading and
writing each layer's KV ring. The layer parameters are stacked on a leading `layers` axis and run
with `nn.scan`, so compile time does not grow with depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moshi_jax.nn import kv_cache as kvc
from moshi_jax.nn.attention import Attention
from moshi_jax.nn.mlp import MLP
from moshi_jax.nn.norms import Norm
from moshi_jax.nn.rope import sin_embedding

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of one transformer stack; names follow the reference's kwargs."""

    d_model: int
    num_heads: int
    num_layers: int
    dim_feedforward: int
    causal: bool = True
    context: int | None = None  # sliding attention window in steps; None = unbounded
    norm: str = "layer_norm"  # see moshi_jax.nn.norms.NORMS
    gating: str = "none"  # "none" (plain MLP with `activation`) or the gate activation ("silu", ...)
    activation: str = "gelu"
    layer_scale: float | None = None  # LayerScale init value; None = no LayerScale
    positional_embedding: str = "rope"  # "rope" | "rope_concat" | "sin" | "sin_rope" | "none"
    max_period: float = 10_000.0
    positional_scale: float = 1.0
    weights_per_step: int = 0  # distinct weight sets along positions (depth transformer)
    weights_per_step_schedule: tuple[int, ...] | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # "none" | "full" | "dots" (rematerialisation policy for training)
    # One-shot (training) stack as a rolled loop (compile time independent of depth) or unrolled: XLA:CPU
    # copies each layer's saved activations into the stacked residual buffers of a rolled loop (~1.5 s of a
    # 4.4 s bench_111m train step), so shallow stacks train faster unrolled. Params are stacked either way.
    scan_layers: bool = True

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def mult(self) -> int:
        """Number of per-step weight sets (0 when weights are shared across positions)."""
        if not self.weights_per_step:
            return 0
        if self.weights_per_step_schedule:
            return max(self.weights_per_step_schedule) + 1
        return self.weights_per_step

    @property
    def cache_capacity(self) -> int:
        if self.context is not None:
            return self.context
        if self.weights_per_step:
            return self.weights_per_step
        raise ValueError("a streaming KV cache needs `context` (or weights_per_step) to size it")

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} not divisible by num_heads {self.num_heads}")
        if self.weights_per_step_schedule is not None and len(self.weights_per_step_schedule) != \
                self.weights_per_step:
            raise ValueError("weights_per_step_schedule must have weights_per_step entries")


@struct.dataclass
class TransformerState:
    offset: Array  # [B] int32: absolute position of the next step
    # leaves stacked [L, B, ...] (the scanned `Transformer`), or one KVCache per layer (`stream_layers`)
    layers: kvc.KVCache | tuple[kvc.KVCache, ...]


def init_state(cfg: TransformerConfig, batch_size: int, dtype: jnp.dtype | None = None,
               per_layer: bool = False) -> TransformerState:
    """Fresh streaming state (empty KV rings, offset 0); needs no parameters. `per_layer`: a tuple of
    separate per-layer rings (for `stream_layers`: each layer's ring is read in place, no stack slicing)."""
    dtype = dtype or jnp.dtype(cfg.dtype)

    def one():
        return kvc.init_kv_cache(batch_size, cfg.cache_capacity, cfg.num_heads, cfg.head_dim, dtype)

    if per_layer:
        layers = tuple(one() for _ in range(cfg.num_layers))
    else:
        layers = jax.tree.map(lambda a: jnp.broadcast_to(a, (cfg.num_layers,) + a.shape), one())
    return TransformerState(offset=jnp.zeros((batch_size,), jnp.int32), layers=layers)


#: Logical axes of the residual stream [B, T, d] in training: batch over the data-parallel mesh axes, d_model
#: whole on every device (rule `act_embed`). Without it GSPMD followed the weights' fsdp-sharded d_model and ran
#: matmuls contraction-sharded on the whole global batch: a v5p:2x2x2 7B LoRA compile read 2.6x the bytes per
#: chip (81 GB instead of 31 GB per layer per step) and did attention for all sequences on every chip.
RESIDUAL_AXES = ("batch", "time", "act_embed")


def constrain_residual(x: Array) -> Array:
    """Shard the residual stream as `RESIDUAL_AXES` under a mesh with logical axis rules (the sharded train step);
    a no-op without rules (single device, streaming, tests)."""
    return nn.with_logical_constraint(x, RESIDUAL_AXES)


class TransformerLayer(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: Array, cache: kvc.KVCache | None, positions: Array, step_index: Array | None,
                 layer: Array | None = None) -> tuple[Array, kvc.KVCache | None]:
        """`layer`: `cache` holds every layer's ring stacked `[L, ...]`; this layer uses entry `layer`."""
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        if cache is None:
            x = constrain_residual(x)
        rope = cfg.positional_embedding if cfg.positional_embedding in ("rope", "rope_concat") else "none"
        if cfg.positional_embedding == "sin_rope":
            rope = "rope"
        h = Norm(cfg.norm, cfg.d_model, pdtype, name="norm1")(x)
        h, cache = Attention(cfg.d_model, cfg.num_heads, cfg.causal, cfg.context, rope, cfg.max_period,
                             cfg.mult, dtype, pdtype, name="self_attn")(h, positions, cache, step_index, layer)
        x = x + self._scale(h, "layer_scale_1")
        if cache is None:
            x = constrain_residual(x)
        h = Norm(cfg.norm, cfg.d_model, pdtype, name="norm2")(x)
        h = MLP(cfg.d_model, cfg.dim_feedforward, cfg.gating, cfg.activation, cfg.mult, dtype, pdtype,
                name="mlp")(h, step_index)
        x = x + self._scale(h, "layer_scale_2")
        return x, cache

    def _scale(self, h: Array, name: str) -> Array:
        if self.cfg.layer_scale is None:
            return h
        scale = self.param(name, nn.with_logical_partitioning(
            nn.initializers.constant(self.cfg.layer_scale), ("norm",)), (self.cfg.d_model,),
            jnp.dtype(self.cfg.param_dtype))
        return h * scale.astype(h.dtype)


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: Array, state: TransformerState | None = None
                 ) -> tuple[Array, TransformerState | None]:
        cfg = self.cfg
        B, T, _ = x.shape
        in_dtype = x.dtype
        x = x.astype(cfg.dtype)  # the residual stream is in the compute dtype (output: back to the input's)
        if state is not None and isinstance(state.layers, tuple):
            raise ValueError("per-layer KV caches (init_state(per_layer=True)) are for `stream_layers`; the "
                             "scanned Transformer needs the stacked state")
        offset = jnp.zeros((B,), jnp.int32) if state is None else state.offset
        positions = offset[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
        if cfg.positional_embedding in ("sin", "sin_rope"):
            x = x + cfg.positional_scale * sin_embedding(positions, cfg.d_model, cfg.max_period, x.dtype)
        step_index = None
        if cfg.mult:
            # The reference keeps one step counter for the depth transformer (not per batch item).
            step_index = offset[0] + jnp.arange(T, dtype=jnp.int32)
            if cfg.weights_per_step_schedule:
                step_index = jnp.asarray(cfg.weights_per_step_schedule, jnp.int32)[step_index]

        if state is None:
            layer_cls = TransformerLayer
            if cfg.remat != "none":
                layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
            stack = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                unroll=1 if cfg.scan_layers else cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, name="layers")
            x, _ = stack(x, None, positions, step_index)
        else:
            # Streaming: the stacked KV rings ride in the scan carry and each layer updates its own entry
            # in place. (Scanning them as xs/ys would copy every layer's whole ring in and out per step.)
            def body(layer_mod: TransformerLayer, carry, layer):
                h, caches = carry
                h, caches = layer_mod(h, caches, positions, step_index, layer)
                return (h, caches), None

            stack = nn.scan(
                body,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=0,
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            (x, caches), _ = stack(TransformerLayer(cfg, name="layers"), (x, state.layers),
                                   jnp.arange(cfg.num_layers, dtype=jnp.int32))
        x = x.astype(in_dtype)
        if state is None:
            return x, None
        return x, TransformerState(offset=state.offset + T, layers=caches)


def unstack_layers(stacked: Any, num_layers: int) -> tuple[Any, ...]:
    """`params["layers"]` of a scanned stack (leaves `[L, ...]`) -> a tuple of `L` per-layer trees.

    Done once, outside the jitted step: a layer read from its own buffer is used in place, whereas slicing
    the stacked leaves inside the step (scan or not) makes XLA copy every layer's weights on every call."""
    return tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(num_layers))


def select_step_weights(layer_params: Any, step: int) -> Any:
    """A per-layer tree with its per-step kernels (leading `steps` axis, see `per_step_param`) cut down to
    entry `step`, keeping a size-1 `steps` axis: run it with step index 0 (`stream_layers(..., step_index=0)`)."""
    per_step = ("in_proj", "out_proj", "linear_in", "linear_out")

    def cut(path, a):
        name = getattr(path[-1], "key", None)
        return a[step: step + 1] if name in per_step else a

    return jax.tree_util.tree_map_with_path(cut, layer_params)


def stream_layers(cfg: TransformerConfig, layer_params: tuple[Any, ...], x: Array, state: TransformerState,
                  step_index: int | None = None) -> tuple[Array, TransformerState]:
    """Streaming `Transformer(cfg)(x, state)` with per-layer params (`unstack_layers`), layers unrolled.

    x `[B, T, d]` -> (y `[B, T, d]`, state advanced by T); `state` holds one KV ring per layer
    (`init_state(per_layer=True)`). Same maths as the scanned stack; weights and rings are read where they
    are (no per-call copies). `step_index`: with per-step weights (`cfg.mult`), the entry
    of the per-step kernels to use for every position (params from `select_step_weights` use 0); None
    computes it from the offset as `Transformer` does."""
    if len(layer_params) != cfg.num_layers:
        raise ValueError(f"expected {cfg.num_layers} per-layer param trees, got {len(layer_params)}")
    B, T, _ = x.shape
    in_dtype = x.dtype
    x = x.astype(cfg.dtype)  # as in `Transformer`
    positions = state.offset[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    if cfg.positional_embedding in ("sin", "sin_rope"):
        x = x + cfg.positional_scale * sin_embedding(positions, cfg.d_model, cfg.max_period, x.dtype)
    steps = None
    layer_cfg = cfg
    if cfg.mult:
        if step_index is not None:
            steps = jnp.full((T,), step_index, jnp.int32)
            # the params hold one step's kernels (steps axis of size 1): declare them so to Flax's shape check
            layer_cfg = dataclasses.replace(cfg, weights_per_step=1, weights_per_step_schedule=None)
        else:
            steps = state.offset[0] + jnp.arange(T, dtype=jnp.int32)
            if cfg.weights_per_step_schedule:
                steps = jnp.asarray(cfg.weights_per_step_schedule, jnp.int32)[steps]
    if not isinstance(state.layers, tuple) or len(state.layers) != cfg.num_layers:
        raise ValueError(f"stream_layers needs {cfg.num_layers} per-layer KV caches (init_state(per_layer=True))")
    layer = TransformerLayer(layer_cfg, parent=None)
    caches = []
    for p, cache in zip(layer_params, state.layers, strict=True):
        x, cache = layer.apply({"params": p}, x, cache, positions, steps)
        caches.append(cache)
    return x.astype(in_dtype), TransformerState(offset=state.offset + T, layers=tuple(caches))
