"""LoRA as moshi-finetune, as a transform of the param tree (the model code is unchanged).

The reference (`moshi/modules/lora.py`) replaces every `nn.Linear` of the LM by
`frozen_W(x) + scaling * lora_B(lora_A(x))` with `lora_A: in -> r` (kaiming_uniform(a=sqrt(5)), i.e.
U(+-1/sqrt(in))), `lora_B: r -> out` (zeros) and `scaling` NOT divided by the rank; merging gives
`W_ref + scaling * B_ref @ A_ref` (torch `[out, in]` layout).

Here a kernel `W` is stored input-first, possibly with leading `layers` / `steps` axes and with the input and
output split over several axes (e.g. in_proj `[d | 3, H, Dh]`, out_proj `[H, Dh | d]`). A LoRA pair for
it is `a: [*lead, *in, r]` (= A_ref^T) and `b: [*lead, r, *out]` (= B_ref^T), and the merged kernel is
`W + scaling * a @ b` reshaped to W's layout. The LoRA params live in a separate tree mirroring the
param tree (`{..., "in_proj": {"a": ..., "b": ...}}`) and are merged on the fly inside the loss, so the
gradient reaches only them (and the embeddings with `train_embeddings`, moshi-finetune's `ft_embed`).

Which params are "Linear"s is read from their logical axis names: leading `layers`/`steps` axes are
stacking axes; a param with at least two other axes is a Linear kernel unless it is an embedding table
(first axis `vocab`, or `emb` in its name, like the reference's `emb`/`text_emb`/`depformer_emb`). Its
input axes are `(heads, head_dim)` when it starts with them (attention out projection), else its first axis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

Array = jax.Array
Path = tuple[str, ...]
STACK_AXES = ("layers", "steps")
RANK_AXIS = "lora_rank"  # logical name of the LoRA rank axis


@dataclasses.dataclass(frozen=True)
class LoraLayout:
    """Static layout of one LoRA target: W shape = [*lead, *in, *out]."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    n_lead: int
    n_in: int

    @property
    def lead(self) -> tuple[int, ...]:
        return self.shape[: self.n_lead]

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.shape[self.n_lead: self.n_lead + self.n_in]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape[self.n_lead + self.n_in:]


def _axes_tuple(spec: Any, ndim: int) -> tuple[str | None, ...]:
    axes = tuple(spec) if spec is not None else ()
    return axes + (None,) * (ndim - len(axes))


def logical_axes(boxed_params: Any) -> dict[Path, tuple[str | None, ...]]:
    """Flat {path: logical axis names} of a (possibly abstract) boxed param tree (`nn.LogicallyPartitioned`)."""
    specs = traverse_util.flatten_dict(nn.get_partition_spec(boxed_params))
    shapes = traverse_util.flatten_dict(nn.unbox(boxed_params))
    return {k: _axes_tuple(specs.get(k), len(v.shape)) for k, v in shapes.items()}


def is_embedding(path: Path, axes: tuple[str | None, ...]) -> bool:
    core = [a for a in axes if a not in STACK_AXES]
    return any("emb" in p for p in path) or (bool(core) and core[0] == "vocab")


def layout_of(path: Path, shape: tuple[int, ...], axes: tuple[str | None, ...]) -> LoraLayout | None:
    """The LoRA layout of a param, or None when it is not a Linear kernel (norms, scales, embeddings)."""
    n_lead = 0
    while n_lead < len(axes) and axes[n_lead] in STACK_AXES:
        n_lead += 1
    core = axes[n_lead:]
    if len(core) < 2 or is_embedding(path, axes):
        return None
    n_in = 2 if core[:2] == ("heads", "head_dim") and len(core) > 2 else 1
    return LoraLayout(tuple(shape), tuple(axes), n_lead, n_in)


def lora_layouts(params: Any, axes: dict[Path, tuple[str | None, ...]]) -> dict[Path, LoraLayout]:
    """{path: layout} of every LoRA target in `params` (arrays or ShapeDtypeStructs, unboxed)."""
    flat = traverse_util.flatten_dict(params)
    missing = set(flat) - set(axes)
    if missing:
        raise ValueError(f"no logical axes for params {sorted(missing)[:5]}")
    out = {}
    for path, leaf in flat.items():
        lay = layout_of(path, tuple(leaf.shape), axes[path])
        if lay is not None:
            out[path] = lay
    return out


def init_lora(key: Array, layouts: dict[Path, LoraLayout], rank: int, dtype=jnp.float32) -> dict:
    """LoRA tree {..path..: {"a": [*lead, *in, r], "b": [*lead, r, *out]}}: a ~ U(+-1/sqrt(fan_in)) (torch
    kaiming_uniform(a=sqrt(5)) on lora_A), b = 0, so the model starts exactly at the base weights."""
    flat = {}
    for i, (path, lay) in enumerate(sorted(layouts.items())):
        fan_in = math.prod(lay.in_shape)
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), lay.lead + lay.in_shape + (rank,), dtype, -bound, bound)
        b = jnp.zeros(lay.lead + (rank,) + lay.out_shape, dtype)
        flat[path + ("a",)] = a
        flat[path + ("b",)] = b
    return traverse_util.unflatten_dict(flat)


def lora_axes(layouts: dict[Path, LoraLayout]) -> dict[Path, tuple[str | None, ...]]:
    """Logical axes of the LoRA tree (flat): a keeps W's input axes, b its output axes, and the rank axis is
    `lora_rank` (mapped to fsdp by the mesh rules): b's output axes (mlp / heads) are tensor-sharded only, so
    without it b (and a of the output projections) and their Adam moments would be replicated over fsdp."""
    out = {}
    for path, lay in layouts.items():
        lead = lay.axes[: lay.n_lead]
        in_axes = lay.axes[lay.n_lead: lay.n_lead + lay.n_in]
        out_axes = lay.axes[lay.n_lead + lay.n_in:]
        out[path + ("a",)] = lead + in_axes + (RANK_AXIS,)
        out[path + ("b",)] = lead + (RANK_AXIS,) + out_axes
    return out


def delta(a: Array, b: Array, lay: LoraLayout, scaling: float) -> Array:
    """scaling * a @ b in W's layout [*lead, *in, *out] (float32 accumulation)."""
    r = a.shape[-1]
    a2 = a.reshape(lay.lead + (math.prod(lay.in_shape), r))
    b2 = b.reshape(lay.lead + (r, math.prod(lay.out_shape)))
    d = jnp.matmul(a2, b2, preferred_element_type=jnp.float32)
    return (scaling * d).reshape(lay.shape)


def merge(params: Any, lora: Any, layouts: dict[Path, LoraLayout], scaling: float, dtype=None) -> Any:
    """params with every target W replaced by W + scaling * a @ b (cast to `dtype`, default W's dtype).
    Non-target leaves are only cast (floating ones) to `dtype`."""
    flat = traverse_util.flatten_dict(params)
    flat_lora = traverse_util.flatten_dict(lora)
    out = {}
    for path, w in flat.items():
        target_dtype = dtype if dtype is not None and jnp.issubdtype(w.dtype, jnp.floating) else w.dtype
        if path in layouts:
            if path + ("a",) not in flat_lora:
                raise KeyError(f"LoRA tree has no factors for {'/'.join(path)}")
            d = delta(flat_lora[path + ("a",)], flat_lora[path + ("b",)], layouts[path], scaling)
            out[path] = (w.astype(jnp.float32) + d).astype(target_dtype)
        else:
            out[path] = w.astype(target_dtype)
    return traverse_util.unflatten_dict(out)


def lora_param_count(layouts: dict[Path, LoraLayout], rank: int) -> int:
    return sum(math.prod(lay.lead) * rank * (math.prod(lay.in_shape) + math.prod(lay.out_shape))
               for lay in layouts.values())
