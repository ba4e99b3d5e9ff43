"""Checkpointing: kill/resume in a new process is bitwise identical (data order included), restore onto
another mesh, clear errors on mismatch, keep-last-K."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from toy_lm_for_training import (
    RULES,
    make_mesh,
    toy_config,
    toy_dataset,
    toy_task,
    toy_train_config,
    train_toy,
)

from moshi_jax.training.checkpointing import Checkpointer, CheckpointMismatchError
from moshi_jax.training.config import OptimizerConfig
from moshi_jax.training.optimizer import make_optimizer
from moshi_jax.training.train_state import build_state_spec

HERE = Path(__file__).parent
TOTAL, KILL_AT = 4, 2


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """TOTAL steps of the project's train loop without interruption (saves a checkpoint at the end)."""
    run_dir = tmp_path_factory.mktemp("straight")
    report = train_toy(run_dir, TOTAL, TOTAL)
    return run_dir, report


def _worker(run_dir, stop_at):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), str(HERE)]),
               XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, str(HERE / "toy_lm_for_training.py"), str(run_dir), str(TOTAL), str(stop_at)],
                   check=True, env=env, timeout=600)
    return json.loads((Path(run_dir) / "report.json").read_text())


def _restore(run_dir, step, mesh_shape=(2, 2, 2)):
    """(state on `mesh_shape`, the next batch of the restored data iterator)."""
    spec = build_state_spec(toy_task(), _tx(), make_mesh(mesh_shape), RULES)
    it = iter(toy_dataset())
    with Checkpointer(Path(run_dir) / "checkpoints") as ckpt:
        state = ckpt.restore(step, spec.abstract_state, it)
    return state, spec, next(it)


def _tx():
    return make_optimizer(toy_train_config("", TOTAL).optimizer, TOTAL)


def test_kill_and_resume_in_new_process_is_bitwise_identical_including_data_order(straight_run, tmp_path):
    straight_dir, straight_report = straight_run
    killed = _worker(tmp_path, KILL_AT)  # process 1: KILL_AT steps, checkpoint, exit
    assert killed["end_step"] == KILL_AT
    resumed = _worker(tmp_path, TOTAL)  # process 2: restore the checkpoint, finish the run
    assert resumed["start_step"] == KILL_AT and resumed["end_step"] == TOTAL
    assert resumed["final"]["loss"] == straight_report["final"]["loss"]
    a, _, next_a = _restore(straight_dir, TOTAL)
    b, _, next_b = _restore(tmp_path, TOTAL)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    # Both data iterators stand at the same position (TOTAL batches in), not at the start.
    np.testing.assert_array_equal(next_a["tokens"], next_b["tokens"])
    assert not np.array_equal(next_a["tokens"], next(iter(toy_dataset()))["tokens"])


def test_restore_onto_another_mesh_gives_the_same_values(straight_run):
    run_dir, _ = straight_run
    ref, _, _ = _restore(run_dir, TOTAL)
    restored, spec, _ = _restore(run_dir, TOTAL, mesh_shape=(1, 4, 2))
    w = restored.params["transformer"]["layers"]["mlp"]["linear_in"]
    assert w.sharding.mesh.shape == spec.mesh.shape
    assert w.sharding.spec == spec.state_shardings.params["transformer"]["layers"]["mlp"]["linear_in"].spec
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with Checkpointer(Path(run_dir) / "checkpoints") as ckpt:
        assert json.loads(json.dumps(ckpt.saved_config()))["steps"] == TOTAL


def test_checkpoint_of_another_model_is_a_clear_error(straight_run):
    run_dir, _ = straight_run
    import dataclasses

    bigger = toy_task(dataclasses.replace(toy_config(), dim_feedforward=128))
    tx = make_optimizer(OptimizerConfig(lr=1e-2), TOTAL)
    spec = build_state_spec(bigger, tx, make_mesh((1, 1, 1)), RULES)
    with Checkpointer(Path(run_dir) / "checkpoints") as ckpt:
        with pytest.raises(CheckpointMismatchError, match="linear_in: saved"):
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
