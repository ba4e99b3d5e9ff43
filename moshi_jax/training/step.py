"""The sharded train step: bf16 compute, float32 grads and master weights, clipping, microbatch accumulation.

    step_fn = make_train_step(task, spec.partition, tx, schedule, microbatches=2, compute_dtype="bfloat16")
    step = ShardedStep(step_fn, spec, batch_shardings)        # jit with in/out shardings, state donated
    state, metrics = step(state, batch, frozen)

Inside: the float32 trainable params (and frozen base, LoRA merged) are cast to the compute dtype, the
loss is differentiated w.r.t. the float32 trainable params (so grads are float32), grads are averaged
over microbatches with a `lax.scan` (moshi-finetune semantics: the mean of the microbatch losses), the
global norm is logged before clipping, and optax applies clip + AdamW.
Non-finite guard: when the loss or the gradient norm is NaN/inf, the step keeps the old params and optimizer
state (a select inside the jitted step, fused with the update) and reports `nonfinite = 1`; the loop then
stops naming the step (`nan_policy="stop"`) or counts the skipped update (`"skip"`). The state never
becomes NaN, so no checkpoint holds a diverged model.
Microbatch i takes rows i, i+M, i+2M, ... of the global batch, so with the batch sharded over
(data, fsdp) every device keeps working on its own rows in every microbatch.

`aot_compile_step(...)` lowers and compiles the same step from abstract shapes only (no param is
allocated) for any mesh, including one made of TPU topology devices on a CPU host, and returns XLA's
memory and cost analysis.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moshi_jax.training.train_state import (
    ParamPartition,
    StateSpec,
    TrainState,
    TrainTask,
    build_state_spec,
    replicated,
)

Array = jax.Array


def split_microbatches(batch: dict, microbatches: int) -> dict:
    """[B, ...] leaves -> [M, B/M, ...]; microbatch i = rows i::M (strided, see module doc)."""

    def split(x):
        B = x.shape[0]
        if B % microbatches:
            raise ValueError(f"batch size {B} not divisible by {microbatches} microbatches")
        return x.reshape((B // microbatches, microbatches) + x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def make_train_step(task: TrainTask, partition: ParamPartition, tx: optax.GradientTransformation,
                    schedule: Callable[[Array], Array], *, microbatches: int = 1,
                    compute_dtype: str = "float32") -> Callable:
    """`step(state, batch, frozen) -> (state, metrics)`, pure (jit it with `ShardedStep`)."""
    cdtype = jnp.dtype(compute_dtype)

    def loss_fn(trainable, frozen, batch, rng):
        params = partition.combine(trainable, frozen, cdtype)
        loss, metrics = task.loss(params, batch, rng)
        return loss.astype(jnp.float32), metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict, frozen: Any) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        if microbatches == 1:
            (loss, metrics), grads = grad_fn(state.params, frozen, batch, step_rng)
        else:
            mbs = split_microbatches(batch, microbatches)
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            first = jax.tree.map(lambda x: x[0], mbs)
            metric_shapes = jax.eval_shape(loss_fn, state.params, frozen, first, step_rng)
            acc0 = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metric_shapes))

            def body(acc, xs):
                i, mb = xs
                (loss_i, m), g = grad_fn(state.params, frozen, mb, jax.random.fold_in(step_rng, i))
                g_acc, lm_acc = acc
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                lm_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), lm_acc, (loss_i, m))
                return (g_acc, lm_acc), None

            (grads, (loss, metrics)), _ = jax.lax.scan(body, acc0, (jnp.arange(microbatches), mbs))
            grads = jax.tree.map(lambda g: g / microbatches, grads)
            loss, metrics = jax.tree.map(lambda x: x / microbatches, (loss, metrics))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt_state),
                                         (state.params, state.opt_state))
        out = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
               "nonfinite": 1.0 - finite.astype(jnp.float32)}
        out.update({k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()})
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), out

    return step


def make_eval_step(task: TrainTask, partition: ParamPartition, compute_dtype: str = "float32") -> Callable:
    """`eval_step(state, batch, frozen) -> metrics` (loss and the task's metrics, no update)."""
    cdtype = jnp.dtype(compute_dtype)

    def eval_step(state: TrainState, batch: dict, frozen: Any) -> dict:
        params = partition.combine(state.params, frozen, cdtype)
        loss, metrics = task.loss(params, batch, jax.random.fold_in(state.rng, 1))
        out = {"loss": loss.astype(jnp.float32)}
        out.update({k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()})
        return out

    return eval_step


class ShardedStep:
    """A step jitted over `spec.mesh` with explicit in/out shardings; the train state (arg 0) is donated.
    Tracing happens under the mesh and the logical axis rules (for activation sharding constraints)."""

    def __init__(self, fn: Callable, spec: StateSpec, batch_shardings: Any, donate: bool = True,
                 returns_state: bool = True):
        self.spec = spec
        rep = replicated(spec.mesh)
        in_sh = (spec.state_shardings, batch_shardings, spec.frozen_shardings)
        out_sh = (spec.state_shardings, rep) if returns_state else rep
        self._jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh,
                               donate_argnums=(0,) if donate else ())

    def _context(self):
        return _MeshRules(self.spec.mesh, self.spec.rules)

    def __call__(self, state, batch, frozen):
        with self._context():
            return self._jitted(state, batch, frozen)

    def lower(self, state, batch, frozen):
        with self._context():
            return self._jitted.lower(state, batch, frozen)


class _MeshRules:
    def __init__(self, mesh, rules):
        self.mesh, self.rules = mesh, rules

    def __enter__(self):
        self._m = jax.set_mesh(self.mesh)
        self._r = nn.logical_axis_rules(self.rules)
        self._m.__enter__()
        self._r.__enter__()

    def __exit__(self, *exc):
        self._r.__exit__(*exc)
        self._m.__exit__(*exc)


# ----------------------------------------------------------------------------------------------- AOT


@dataclasses.dataclass
class AotResult:
    compiled: Any  # jax.stages.Compiled
    memory: dict  # XLA CompiledMemoryStats as a dict (bytes per device)
    flops: float  # XLA cost analysis flops for one step (per device program)
    compile_seconds: float
    num_devices: int
    lowered: Any = None  # jax.stages.Lowered: the program before XLA's optimisations

    def summary(self) -> dict:
        return {"flops": self.flops, "compile_seconds": self.compile_seconds, "num_devices": self.num_devices,
                **self.memory}


def abstract_batch(batch_shapes: dict[str, tuple[tuple[int, ...], Any]], batch_shardings: Any) -> dict:
    """{name: ShapeDtypeStruct(shape, dtype, sharding)} from {name: (shape, dtype)}."""
    return {k: jax.ShapeDtypeStruct(shape, jnp.dtype(dt), sharding=batch_shardings[k] if isinstance(
        batch_shardings, dict) else batch_shardings) for k, (shape, dt) in batch_shapes.items()}


def aot_compile_step(task: TrainTask, tx: optax.GradientTransformation, schedule: Callable, mesh, rules,
                     batch_shapes: dict, batch_shardings: Any, *, lora=None, microbatches: int = 1,
                     compute_dtype: str = "float32", compiler_options: dict | None = None) -> AotResult:
    """Lower + compile the train step from shapes only and report per-device memory and flops."""
    spec = build_state_spec(task, tx, mesh, rules, lora)
    fn = make_train_step(task, spec.partition, tx, schedule, microbatches=microbatches,
                         compute_dtype=compute_dtype)
    step = ShardedStep(fn, spec, batch_shardings)
    batch = abstract_batch(batch_shapes, batch_shardings)
    t0 = time.perf_counter()
    lowered = step.lower(spec.abstract_state, batch, spec.abstract_frozen)
    compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
    seconds = time.perf_counter() - t0
    return AotResult(compiled, memory_stats(compiled), cost_flops(compiled), seconds, mesh.size, lowered)


def memory_stats(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
             "generated_code_size_in_bytes")
    return {n: int(getattr(m, n)) for n in names if hasattr(m, n)}


def cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))
