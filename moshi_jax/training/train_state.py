"""Train state, full vs LoRA param partition, sharded initialisation and abstract (shape-only) state.

    task = TrainTask(init=lambda key: LMModel(cfg).init(key, codes), loss=...)
    spec = build_state_spec(task, tx, mesh, rules, lora=None)       # shapes + shardings, nothing allocated
    state, frozen = init_train_state(spec, task, tx, seed=0)          # jitted with out_shardings

`TrainState` holds only what the optimizer changes: the trainable params in float32 (master weights), the
optax state, the step and the RNG. With LoRA the frozen base weights are a separate tree (`frozen`)
passed to the step beside the state (not donated, not checkpointed: they come back from the init
source). Params AND optimizer state are created directly with their mesh shardings (jit out_shardings),
never on one device first (jax_stack_notes pain point 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moshi_jax.training import lora as lora_lib
from moshi_jax.training.config import LoraConfig

Array = jax.Array
Path = tuple[str, ...]
Rules = tuple[tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class TrainTask:
    """What the training core needs from a model.

    init: key -> params tree whose leaves are `nn.LogicallyPartitioned` (Linen `Module.init(...)["params"]`).
    loss: (params in compute dtype, batch, rng) -> (scalar loss, {name: scalar metric}).
    """

    init: Callable[[Array], Any]
    loss: Callable[[Any, dict, Array], tuple[Array, dict]]


@struct.dataclass
class TrainState:
    step: Array  # int32 []: optimizer steps taken
    params: Any  # trainable params, float32 master copy (LoRA: {"lora": ..., "base": trained embeddings})
    opt_state: Any
    rng: Array  # uint32 [2] raw PRNG key, split once per step


@dataclasses.dataclass(frozen=True, eq=False)
class ParamPartition:
    """Which model params are trained, and how the model's params are assembled from (trainable, frozen).

    Full fine-tuning: trainable = the whole param tree, frozen = {}. LoRA: trainable = {"lora": factors,
    "base": embedding tables if `train_embeddings` else {}}, frozen = every other base param."""

    lora: LoraConfig | None
    layouts: dict[Path, lora_lib.LoraLayout]  # LoRA targets (empty for full fine-tuning)
    trained_base: frozenset[Path]  # base params trained alongside LoRA

    @property
    def is_lora(self) -> bool:
        return self.lora is not None

    def split(self, params: Any, lora_params: Any = None) -> tuple[Any, Any]:
        if not self.is_lora:
            return params, {}
        flat = traverse_util.flatten_dict(params)
        base = {k: v for k, v in flat.items() if k in self.trained_base}
        frozen = {k: v for k, v in flat.items() if k not in self.trained_base}
        trainable = {"lora": lora_params, "base": traverse_util.unflatten_dict(base) if base else {}}
        return trainable, traverse_util.unflatten_dict(frozen)

    def combine(self, trainable: Any, frozen: Any, dtype=None) -> Any:
        """The model's params (floating leaves cast to `dtype` when given); LoRA merged into the kernels."""
        if not self.is_lora:
            return _cast(trainable, dtype)
        flat = traverse_util.flatten_dict(frozen)
        if trainable["base"]:
            flat.update(traverse_util.flatten_dict(trainable["base"]))
        base = traverse_util.unflatten_dict(flat)
        return lora_lib.merge(base, trainable["lora"], self.layouts, self.lora.scaling, dtype)

    def trainable_axes(self, axes: dict[Path, tuple]) -> dict[Path, tuple]:
        if not self.is_lora:
            return dict(axes)
        out = {("lora",) + k: v for k, v in lora_lib.lora_axes(self.layouts).items()}
        out.update({("base",) + k: axes[k] for k in self.trained_base})
        return out

    def frozen_axes(self, axes: dict[Path, tuple]) -> dict[Path, tuple]:
        if not self.is_lora:
            return {}
        return {k: v for k, v in axes.items() if k not in self.trained_base}


def make_partition(lora: LoraConfig | None, abstract_params: Any, axes: dict[Path, tuple]) -> ParamPartition:
    """Full fine-tuning when `lora` is None or disabled, else LoRA on every Linear kernel."""
    if lora is None or not lora.enabled:
        return ParamPartition(None, {}, frozenset())
    layouts = lora_lib.lora_layouts(abstract_params, axes)
    if not layouts:
        raise ValueError("LoRA enabled but no Linear kernel found in the param tree (check logical axis names)")
    trained = frozenset(k for k in axes if lora.train_embeddings and lora_lib.is_embedding(k, axes[k]))
    return ParamPartition(lora, layouts, trained)


def _cast(tree: Any, dtype) -> Any:
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# ----------------------------------------------------------------------------------------------- shardings


def logical_shardings(flat_axes: dict[Path, tuple], mesh: Mesh, rules: Rules, shapes: Any = None) -> Any:
    """Nested tree of NamedShardings from flat {path: logical axis names} via the logical axis rules. With
    `shapes` (a tree of arrays / ShapeDtypeStructs with the same paths), mesh axes that do not evenly divide
    their dimension are dropped for that param (`mesh.fit_spec`)."""
    from moshi_jax.training.mesh import fit_spec

    if not flat_axes:
        return {}
    flat_shapes = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()} if shapes else {}
    out = {}
    for k, v in flat_axes.items():
        spec = nn.logical_to_mesh_axes(v, rules)
        if k in flat_shapes:
            spec = fit_spec(spec, flat_shapes[k], mesh)
        out[k] = NamedSharding(mesh, spec)
    return traverse_util.unflatten_dict(out)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any, param_shardings: Any,
                        mesh: Mesh) -> Any:
    """Shard every params-shaped optimizer leaf (Adam moments) like its param; replicate the rest (counts,
    injected hyperparameters)."""
    return optax.tree_map_params(tx, lambda _, s: s, abstract_opt_state, param_shardings,
                                 transform_non_params=lambda _: replicated(mesh))


@dataclasses.dataclass(frozen=True, eq=False)
class StateSpec:
    """Everything known about the train state before allocating it."""

    partition: ParamPartition
    axes: dict[Path, tuple]  # flat logical axes of the model's params
    abstract_params: Any  # model params as ShapeDtypeStructs (unboxed, float32 master)
    state_shardings: TrainState
    frozen_shardings: Any
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings (for restore / AOT)
    abstract_frozen: Any
    mesh: Mesh
    rules: Rules


def build_state_spec(task: TrainTask, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules,
                     lora: LoraConfig | None = None) -> StateSpec:
    """Shapes, logical axes and mesh shardings of (TrainState, frozen) from `jax.eval_shape` only."""
    key = jax.random.PRNGKey(0)
    abstract_boxed = jax.eval_shape(task.init, key)
    axes = lora_lib.logical_axes(abstract_boxed)
    abstract_params = nn.unbox(abstract_boxed)
    partition = make_partition(lora, abstract_params, axes)

    init_fn = _make_init_fn(task, partition, tx)
    abstract_state, abstract_frozen = jax.eval_shape(init_fn, key)
    trainable_sh = logical_shardings(partition.trainable_axes(axes), mesh, rules, abstract_state.params)
    if partition.is_lora:  # an empty "base" ({}) has no axes entries, so add it back
        trainable_sh = {"lora": trainable_sh["lora"], "base": trainable_sh.get("base", {})}
    frozen_sh = logical_shardings(partition.frozen_axes(axes), mesh, rules, abstract_frozen)
    state_sh = TrainState(step=replicated(mesh), params=trainable_sh,
                          opt_state=opt_state_shardings(tx, abstract_state.opt_state, trainable_sh, mesh),
                          rng=replicated(mesh))
    return StateSpec(partition, axes, abstract_params, state_sh, frozen_sh,
                     with_shardings(abstract_state, state_sh), with_shardings(abstract_frozen, frozen_sh),
                     mesh, rules)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _make_init_fn(task: TrainTask, partition: ParamPartition, tx: optax.GradientTransformation):
    def init_fn(key: Array) -> tuple[TrainState, Any]:
        k_params, k_lora, k_state = jax.random.split(key, 3)
        params = nn.unbox(task.init(k_params))
        return _state_from_params(params, partition, tx, k_lora, k_state)

    return init_fn


def _state_from_params(params: Any, partition: ParamPartition, tx, k_lora: Array, k_state: Array,
                       lora_params: Any = None):
    params = _cast(params, jnp.float32)  # master weights
    if partition.is_lora and lora_params is None:
        lora_params = lora_lib.init_lora(k_lora, partition.layouts, partition.lora.rank)
    elif partition.is_lora:
        lora_params = _cast(lora_params, jnp.float32)
    trainable, frozen = partition.split(params, lora_params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable), rng=k_state)
    return state, frozen


def init_train_state(spec: StateSpec, task: TrainTask, tx: optax.GradientTransformation, seed: int
                     ) -> tuple[TrainState, Any]:
    """Random init of (state, frozen), created sharded (jit with out_shardings)."""
    init_fn = jax.jit(_make_init_fn(task, spec.partition, tx),
                      out_shardings=(spec.state_shardings, spec.frozen_shardings))
    with jax.set_mesh(spec.mesh):
        return init_fn(jax.random.PRNGKey(seed))


def init_from_params(spec: StateSpec, params: Any, tx: optax.GradientTransformation, seed: int,
                     lora_params: Any = None) -> tuple[TrainState, Any]:
    """(state, frozen) from given model params (e.g. a reference checkpoint): params are placed with their
    shardings first, then the optimizer state and LoRA factors are created sharded. `lora_params`: the initial
    LoRA tree of a LoRA run (e.g. an imported adapter; shaped like `spec`'s), default fresh factors."""
    got = traverse_util.flatten_dict(params)
    want = traverse_util.flatten_dict(spec.abstract_params)
    if set(got) != set(want):
        raise ValueError(f"params do not match the model: missing {sorted(set(want) - set(got))[:5]}, "
                         f"unexpected {sorted(set(got) - set(want))[:5]}")
    bad = [(k, tuple(got[k].shape), want[k].shape) for k in want if tuple(got[k].shape) != tuple(want[k].shape)]
    if bad:
        raise ValueError(f"param shapes do not match the model (path, got, expected): {bad[:5]}")
    param_sh = logical_shardings(spec.axes, spec.mesh, spec.rules, spec.abstract_params)
    params = jax.device_put(params, param_sh)
    if lora_params is not None:
        want_lora = spec.abstract_state.params["lora"]
        if jax.tree.structure(lora_params) != jax.tree.structure(want_lora) or any(
                tuple(x.shape) != tuple(y.shape) for x, y in zip(jax.tree.leaves(lora_params),
                                                                 jax.tree.leaves(want_lora), strict=True)):
            raise ValueError("initial LoRA tree does not match the run's LoRA targets / rank")
        lora_params = jax.device_put(lora_params, spec.state_shardings.params["lora"])

    def build(p, lora, key):
        _, k_lora, k_state = jax.random.split(key, 3)
        return _state_from_params(p, spec.partition, tx, k_lora, k_state, lora)

    fn = jax.jit(build, out_shardings=(spec.state_shardings, spec.frozen_shardings))
    with jax.set_mesh(spec.mesh):
        return fn(params, lora_params, jax.random.PRNGKey(seed))


def export_params(spec: StateSpec, state: TrainState, frozen: Any) -> Any:
    """The model's float32 params with LoRA merged in (for the reference-layout export)."""
    fn = jax.jit(lambda t, f: spec.partition.combine(t, f, jnp.float32))
    with jax.set_mesh(spec.mesh):
        return fn(state.params, frozen)


def count_params(abstract: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(abstract))
