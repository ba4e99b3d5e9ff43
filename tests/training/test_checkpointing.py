"""Checkpointing: kill/resume in a new process is bitwise identical (data order included), restore onto
another mesh, clear errors on mismatch, keep-last-K."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from toy_lm_for_training import RULES, make_mesh, toy_config, toy_task, train_toy

from moshi_jax.training.checkpointing import Checkpointer, CheckpointMismatchError
from moshi_jax.training.config import OptimizerConfig
from moshi_jax.training.optimizer import make_optimizer
from moshi_jax.training.train_state import build_state_spec

HERE = Path(__file__).parent
TOTAL, KILL_AT = 4, 2


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """TOTAL steps without interruption (saves a checkpoint at the end)."""
    d = tmp_path_factory.mktemp("straight")
    state, sums = train_toy(d / "ckpt", TOTAL, TOTAL)
    return d / "ckpt", jax.device_get(state), sums


def _worker(ckpt_dir, stop_at, out):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), str(HERE)]),
               XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, str(HERE / "toy_lm_for_training.py"), str(ckpt_dir), str(TOTAL), str(stop_at),
                    str(out)], check=True, env=env, timeout=600)
    return np.load(out)


def test_kill_and_resume_in_new_process_is_bitwise_identical_including_data_order(straight_run, tmp_path):
    _, state, sums = straight_run
    _worker(tmp_path / "ckpt", KILL_AT, tmp_path / "a.npz")  # process 1: KILL_AT steps, save, exit
    resumed = _worker(tmp_path / "ckpt", TOTAL, tmp_path / "b.npz")  # process 2: restore, finish
    # The restored grain iterator continues exactly where process 1 stopped.
    assert list(resumed["sums"]) == sums[KILL_AT:]
    leaves = jax.tree_util.tree_leaves_with_path(state)
    assert len(leaves) == len(resumed.files) - 1
    for path, x in leaves:
        np.testing.assert_array_equal(resumed[jax.tree_util.keystr(path)], np.asarray(x),
                                      err_msg=jax.tree_util.keystr(path))


def test_restore_onto_another_mesh_gives_the_same_values(straight_run):
    ckpt_dir, state, _ = straight_run
    task, tx = toy_task(), make_optimizer(OptimizerConfig(lr=1e-2, schedule="one_cycle", pct_start=0.3), TOTAL)
    mesh = make_mesh((1, 4, 2))
    spec = build_state_spec(task, tx, mesh, RULES)
    with Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.latest_step() == TOTAL and ckpt.saved_config() == {"total": TOTAL}
        restored = ckpt.restore(TOTAL, spec.abstract_state)
    w = restored.params["transformer"]["layers"]["mlp"]["linear_in"]
    assert w.sharding.mesh.shape == mesh.shape and w.sharding.spec == spec.state_shardings.params[
        "transformer"]["layers"]["mlp"]["linear_in"].spec
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_of_another_model_is_a_clear_error(straight_run):
    ckpt_dir, _, _ = straight_run
    import dataclasses

    bigger = toy_task(dataclasses.replace(toy_config(), dim_feedforward=128))
    tx = make_optimizer(OptimizerConfig(lr=1e-2), TOTAL)
    spec = build_state_spec(bigger, tx, make_mesh((1, 1, 1)), RULES)
    with Checkpointer(ckpt_dir) as ckpt, pytest.raises(CheckpointMismatchError, match="linear_in: saved"):
        ckpt.restore(TOTAL, spec.abstract_state)


def test_saves_on_interval_and_keeps_last_k(tmp_path):
    tree = {"w": np.arange(4, dtype=np.float32)}
    with Checkpointer(tmp_path, every=2, keep=2, async_save=True) as ckpt:
        saved = [ckpt.save(s, jax.tree.map(lambda x, s=s: x + s, tree)) for s in range(1, 8)]
    # Orbax always saves the first step it is given, then steps on the interval.
    assert saved == [True, True, False, True, False, True, False]
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [4, 6]
        abstract = {"w": jax.ShapeDtypeStruct((4,), np.float32, sharding=jax.sharding.SingleDeviceSharding(
            jax.devices()[0]))}
        np.testing.assert_array_equal(np.asarray(ckpt.restore(6, abstract)["w"]), tree["w"] + 6)
