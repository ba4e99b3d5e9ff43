"""Non-finite losses / gradients never pass silently: the jitted step keeps the old state and flags the step;
the loop stops naming the step (nan_policy=stop, no checkpoint past it) or skips and counts (nan_policy=skip);
non-finite params are never exported."""

import dataclasses
import json
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_lm_for_training import RULES, make_mesh, toy_dataset, toy_program, toy_task, toy_train_config

from moshi_jax.training.checkpointing import Checkpointer
from moshi_jax.training.config import CheckpointConfig, ConfigError, OptimizerConfig, load_config
from moshi_jax.training.loop import TrainingDivergedError, _export, train_loop
from moshi_jax.training.optimizer import make_optimizer, make_schedule
from moshi_jax.training.step import ShardedStep, make_train_step
from moshi_jax.training.train_lm import Program
from moshi_jax.training.train_state import TrainTask, build_state_spec, init_train_state


def _poisoned(batch) -> bool:
    """The toy batches whose loss the poisoned task makes NaN (about one in three)."""
    return int(np.asarray(batch["tokens"]).sum()) % 3 == 0


def _poisoned_task() -> TrainTask:
    base = toy_task()

    def loss(params, batch, rng):
        value, metrics = base.loss(params, batch, rng)
        return jnp.where(batch["tokens"].sum() % 3 == 0, jnp.nan, value), metrics

    return TrainTask(init=base.init, loss=loss)


def _poisoned_steps(n: int) -> list[int]:
    """1-based steps (of the toy pipeline's first n batches) with a NaN loss."""
    it = iter(toy_dataset())
    return [i + 1 for i in range(n) if _poisoned(next(it))]


def _cfg(run_dir, steps, policy):
    cfg = toy_train_config(run_dir, steps)
    return dataclasses.replace(cfg, nan_policy=policy, checkpoint=CheckpointConfig(every=1, keep=20))


def _program():
    return dataclasses.replace(toy_program(), task=_poisoned_task())


def test_nonfinite_step_keeps_params_and_optimizer_state_and_flags_it():
    mesh = make_mesh((1, 1, 1))
    opt = OptimizerConfig(lr=1e-2)
    tx = make_optimizer(opt, 10)
    spec = build_state_spec(_poisoned_task(), tx, mesh, RULES)
    step = ShardedStep(make_train_step(_poisoned_task(), spec.partition, tx, make_schedule(opt, 10)), spec,
                       toy_program().batch_shardings(mesh), donate=False)
    state = init_train_state(spec, _poisoned_task(), tx, 0)[0]
    bad = {"tokens": jnp.zeros((8, 8), jnp.int32)}  # sum 0: poisoned
    good = {"tokens": jnp.ones((8, 8), jnp.int32)}  # sum 64: finite
    after_bad, m_bad = step(state, bad, {})
    after_good, m_good = step(state, good, {})
    assert float(m_bad["nonfinite"]) == 1.0 and not np.isfinite(float(m_bad["loss"]))
    assert float(m_good["nonfinite"]) == 0.0
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                    jax.tree.leaves((after_bad.params, after_bad.opt_state)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(after_bad.step) == int(state.step) + 1
    assert not np.array_equal(np.asarray(after_good.params["text_linear"]), np.asarray(state.params["text_linear"]))


def test_nan_loss_stops_the_run_naming_the_step_and_no_checkpoint_past_it(tmp_path):
    first = _poisoned_steps(20)[0]
    with pytest.raises(TrainingDivergedError, match=rf"^step {first}: non-finite loss nan") as e:
        train_loop(_cfg(tmp_path, first + 2, "stop"), _program(), make_mesh((1, 1, 1)), RULES)
    assert "nan_policy=skip" in str(e.value)
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert all(s < first for s in ckpt.all_steps())


def test_skip_policy_skips_and_counts_every_nonfinite_update(tmp_path, caplog):
    steps = 8
    expected = _poisoned_steps(steps)
    assert 0 < len(expected) < steps  # the poison hits some steps, not all
    with caplog.at_level(logging.WARNING, logger="moshi_jax"):
        report = train_loop(_cfg(tmp_path, steps, "skip"), _program(), make_mesh((1, 1, 1)), RULES)
    assert report["end_step"] == steps and report["skipped_steps"] == len(expected)
    assert json.loads((tmp_path / "report.json").read_text())["skipped_steps"] == len(expected)
    assert "Skipped updates" in (tmp_path / "report.md").read_text()
    flagged = [int(m.group(1)) for r in caplog.records
               if (m := re.match(r"step (\d+): non-finite .* update skipped", r.getMessage()))]
    assert flagged == expected


def test_nonfinite_params_are_never_exported_and_the_old_export_stays(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "model.safetensors").write_text("previous export")

    def export(params, out_dir):
        (out_dir / "model.safetensors").write_text("new")
        return [out_dir / "model.safetensors"]

    program = Program(task=toy_task(), batch_shardings=None, train_iter=None, export=export)
    params = {"text_emb": np.array([1.0, np.nan], np.float32), "text_linear": np.ones(2, np.float32)}
    with pytest.raises(TrainingDivergedError, match="refusing to export.*text_emb"):
        _export(program, params, out)
    assert (out / "model.safetensors").read_text() == "previous export"
    params["text_emb"][1] = 0.0
    assert _export(program, params, out) == [out / "model.safetensors"]
    assert (out / "model.safetensors").read_text() == "new"


def test_nan_policy_is_validated():
    assert load_config("tiny", ["nan_policy=skip"]).nan_policy == "skip"
    with pytest.raises(ConfigError, match="nan_policy must be one of"):
        load_config("tiny", ["nan_policy=ignore"])
