"""Train step: sharded == single device, donation, microbatch accumulation, mixed precision, AOT compile."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_lm_for_training import RULES, batch_sharding, make_mesh, random_batch, toy_config, toy_task

from moshi_jax.training.config import OptimizerConfig
from moshi_jax.training.optimizer import make_optimizer, make_schedule
from moshi_jax.training.step import ShardedStep, aot_compile_step, make_train_step
from moshi_jax.training.train_state import build_state_spec, init_train_state

OPT = OptimizerConfig(lr=1e-2, schedule="cosine", warmup_steps=1)


@functools.cache
def _initial_state_on_host():
    """One sharded init (its compile is the slow part), reused on every mesh via device_put."""
    task, tx = toy_task(), make_optimizer(OPT, 10)
    spec = build_state_spec(task, tx, make_mesh((2, 2, 2)), RULES)
    return jax.device_get(init_train_state(spec, task, tx, seed=0))


def _setup(mesh_shape, microbatches=1, compute_dtype="float32", task=None):
    task = task or toy_task()
    tx = make_optimizer(OPT, 10)
    mesh = make_mesh(mesh_shape)
    spec = build_state_spec(task, tx, mesh, RULES)
    state, frozen = jax.device_put(_initial_state_on_host(), (spec.state_shardings, spec.frozen_shardings))
    fn = make_train_step(task, spec.partition, tx, make_schedule(OPT, 10), microbatches=microbatches,
                         compute_dtype=compute_dtype)
    step = ShardedStep(fn, spec, batch_sharding(mesh))
    return spec, step, state, frozen, mesh


@functools.cache
def _run(mesh_shape, n_batches, microbatches=1, compute_dtype="float32"):
    """(state, losses) after `n_batches` steps on fixed random batches (cached: compiles are the cost here)."""
    task = toy_task(toy_config(compute_dtype))
    spec, step, state, frozen, mesh = _setup(mesh_shape, microbatches, compute_dtype, task)
    losses = []
    for b in [random_batch(i) for i in range(n_batches)]:
        state, m = step(state, jax.device_put(b, batch_sharding(mesh)), frozen)
        losses.append(float(m["loss"]))
    return state, losses


def _assert_trees_close(a, b, rtol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        err = np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12)
        assert err <= rtol, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"


def test_step_on_2x2x2_mesh_equals_single_device_step():
    s8, l8 = _run((2, 2, 2), 2)
    s1, l1 = _run((1, 1, 1), 2)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    assert l8[1] < l8[0]
    _assert_trees_close(s8.params, s1.params, 1e-5)
    _assert_trees_close(s8.opt_state, s1.opt_state, 1e-5)
    # The params really are sharded on the big mesh (fsdp on embed, tensor on mlp).
    w = s8.params["transformer"]["layers"]["mlp"]["linear_in"]
    assert w.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor")
    assert s8.opt_state[1].inner_state[0].mu["transformer"]["layers"]["mlp"]["linear_in"].sharding == w.sharding


def test_two_microbatches_equal_one_big_batch():
    s2, l2 = _run((2, 2, 2), 2, microbatches=2)
    s1, l1 = _run((2, 2, 2), 2, microbatches=1)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    _assert_trees_close(s2.params, s1.params, 1e-5)


def test_bf16_compute_keeps_float32_master_weights_and_moments():
    state, losses = _run((2, 2, 2), 2, compute_dtype="bfloat16")
    assert np.all(np.isfinite(losses))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    mu = state.opt_state[1].inner_state[0].mu
    assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(jnp.float32)}
    # The bf16 step is close to (not equal to) the float32 one.
    s32, l32 = _run((2, 2, 2), 2)
    assert losses != l32
    _assert_trees_close(state.params, s32.params, 2e-2)


def test_aot_compile_from_abstract_shapes_reports_memory_flops_and_donation():
    task = toy_task()
    tx = make_optimizer(OPT, 10)
    mesh = make_mesh((2, 2, 2))
    res = aot_compile_step(task, tx, make_schedule(OPT, 10), mesh, RULES, {"tokens": ((8, 8), "int32")},
                           batch_sharding(mesh)["tokens"], microbatches=2)
    s = res.summary()
    assert s["flops"] > 0 and s["argument_size_in_bytes"] > 0 and s["temp_size_in_bytes"] >= 0
    assert res.num_devices == 8
    # The donated train state aliases the outputs: at least the per-device share of the whole state.
    spec = build_state_spec(task, tx, mesh, RULES)
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(spec.abstract_state))
    assert s["alias_size_in_bytes"] >= state_bytes // 8 > 0


def test_indivisible_microbatches_is_a_clear_error():
    task = toy_task()
    tx = make_optimizer(OPT, 10)
    spec = build_state_spec(task, tx, make_mesh((1, 1, 1)), RULES)
    fn = make_train_step(task, spec.partition, tx, make_schedule(OPT, 10), microbatches=3)
    with pytest.raises(ValueError, match="not divisible by 3 microbatches"):
        jax.eval_shape(fn, spec.abstract_state, random_batch(0, batch=8), spec.abstract_frozen)
