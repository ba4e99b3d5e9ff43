"""Device mesh (data, fsdp, tensor), batch shardings and the logical-axis rules: the one place that maps the
models' logical axis names to mesh axes.

    mesh = make_mesh((1, -1, 1))                     # all available devices on fsdp
    sh = batch_sharding(mesh, 3)                      # [B, K, T] batch: B over (data, fsdp)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES): ...

Axes: `data` = pure data parallelism (params replicated across it), `fsdp` = data parallelism with params and
optimizer state sharded (ZeRO-3; XLA all-gathers a layer's weights before use), `tensor` = model parallelism
of the wide dimensions (MLP hidden, heads, vocabularies). The batch is split over data x fsdp.
The mesh uses `AxisType.Auto` axes (classic GSPMD: shardings from in/out_shardings and the param specs;
jax 0.10's `jax.make_mesh` default is Explicit, which the training step does not use).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or None: replicated). Every name used by moshi_jax.nn / .lm / .mimi params
# must appear here (tests/training check it against the real models), so nothing is replicated by accident.
# flax resolves a param's axes left to right and never uses one mesh axis twice in a param, so e.g.
# [vocab, embed] tables shard vocab on tensor and embed on fsdp.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", BATCH_AXES),
    ("time", None),
    ("codebooks", None),
    ("act_embed", None),  # d_model of the residual stream (nn/transformer.py RESIDUAL_AXES): not sharded
    # transformer params (moshi_jax.nn)
    ("embed", "fsdp"),  # d_model: the big axis of every weight -> ZeRO-3 sharding
    ("mlp", "tensor"),  # FFN hidden
    ("heads", "tensor"),
    ("head_dim", None),
    ("qkv", None),  # the (q, k, v) axis of the fused in_proj
    ("gate", None),  # the (gate, value) axis of the gated FFN's linear_in
    ("norm", None),  # norm scales / layer scales: small vectors, replicated
    ("layers", None),  # the scanned layer axis: never sharded (scan slices it)
    ("steps", None),  # per-codebook weights of the depth transformer (weights_per_step)
    # LM params (moshi_jax.lm): embedding tables and output heads
    ("vocab", "tensor"),  # text / audio vocabularies (tables and heads)
    ("dep_embed", "fsdp"),  # depformer_in output (the depth d_model); fsdp only if `embed` left it free
    ("low_rank", None),  # low-rank depformer embeddings (off for Moshi)
    # LoRA factors (moshi_jax.training.lora): the rank axis takes fsdp where the factor's other axes left it free
    ("lora_rank", "fsdp"),
    # Mimi conv params (moshi_jax.nn.conv): small, replicated
    ("conv_kernel", None),
    ("conv_in", None),
    ("conv_out", None),
)


def rule_names(rules: Iterable[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> set[str]:
    return {name for name, _ in rules}


def missing_rules(axes: dict[Any, tuple[str | None, ...]], rules: Iterable[tuple[str, Any]] = LOGICAL_AXIS_RULES
                  ) -> dict[str, list]:
    """{logical name: [param paths]} of names used by params (flat {path: axes}) that have no rule."""
    known = rule_names(rules)
    out: dict[str, list] = {}
    for path, names in axes.items():
        for n in names:
            if n is not None and n not in known:
                out.setdefault(n, []).append(path)
    return out


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh of the first prod(shape) of `devices` (default: all devices of the
    default backend). One size may be -1: all remaining devices. On TPUs the devices are laid out by
    `mesh_utils.create_device_mesh` (ICI-aware); elsewhere in order."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape must have 3 sizes (data, fsdp, tensor), got {tuple(shape)}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh sizes must be positive with at most one -1, got {tuple(shape)}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if len(devices) % known:
            raise ValueError(f"mesh {tuple(shape)}: {len(devices)} devices are not divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    n = math.prod(shape)
    if n > len(devices):
        raise ValueError(f"mesh {tuple(shape)} needs {n} devices, only {len(devices)} available "
                         f"({devices[0].platform if devices else 'none'})")
    chosen = devices[:n]
    grid = None
    if chosen and chosen[0].platform == "tpu" and n == len(devices):
        try:
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_device_mesh(tuple(shape), chosen)
        except (ValueError, NotImplementedError, AssertionError):
            grid = None  # unusual shapes: plain order below
    if grid is None:
        grid = np.array(chosen, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the other `ndim - 1` axes replicated."""
    if ndim < 1:
        raise ValueError(f"a batch array needs at least 1 dimension, got ndim={ndim}")
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh) -> int:
    """The global batch size must be a multiple of this (the number of batch shards)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """`spec` with the mesh axes that do not evenly divide their dimension dropped (that dimension is then split
    over the longest dividing prefix of its axes, or replicated). jax arrays cannot be sharded unevenly, and
    some dimensions are odd on purpose: the input tables have card + 1 / text_card + 1 rows (the initial
    token), so e.g. `vocab -> tensor` applies to the 32000-way text head but not to the 32001-row table."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    out = []
    for dim, entry in zip(shape, entries, strict=True):
        axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        kept: list[str] = []
        for a in axes:
            if dim % (math.prod(mesh.shape[x] for x in kept) * mesh.shape[a]):
                break
            kept.append(a)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def param_partition_specs(axes: dict[Any, tuple[str | None, ...]], rules: Iterable[tuple[str, Any]] = (
        LOGICAL_AXIS_RULES)) -> dict[Any, PartitionSpec]:
    """Flat {path: mesh PartitionSpec} from flat {path: logical axes} (as flax resolves them)."""
    import flax.linen as nn

    rules = tuple(rules)
    return {k: nn.logical_to_mesh_axes(v, rules) for k, v in axes.items()}
