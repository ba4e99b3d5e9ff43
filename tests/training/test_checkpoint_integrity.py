"""Checkpoint integrity: every saved step is sealed with checksums; a damaged newest step (flipped bytes of the
same size, a truncated array file, an emptied metadata JSON, no seal) is logged with the reason, set aside,
and the run resumes from the newest intact step."""

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from toy_lm_for_training import RULES, make_mesh, toy_program, toy_train_config

from moshi_jax.training.checkpointing import SEAL, Checkpointer, verify_step
from moshi_jax.training.config import CheckpointConfig
from moshi_jax.training.loop import train_loop

STEPS = 3


def _cfg(run_dir, steps=STEPS):
    cfg = toy_train_config(run_dir, steps)
    return dataclasses.replace(cfg, checkpoint=CheckpointConfig(every=1, keep=5))


@pytest.fixture(scope="module")
def sealed_run(tmp_path_factory):
    """A toy run of STEPS steps with a checkpoint after every step."""
    run_dir = tmp_path_factory.mktemp("sealed")
    train_loop(_cfg(run_dir), toy_program(), make_mesh((1, 1, 1)), RULES)
    return run_dir


def _copy(run_dir, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def _largest_array_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def _flip_bytes(p: Path):
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 8] = bytes(b ^ 0xFF for b in data[mid:mid + 8])
    p.write_bytes(bytes(data))


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _empty_metadata(p: Path):
    p.write_text("")


def test_every_saved_step_is_sealed_and_verifies(sealed_run):
    ckpt_dir = sealed_run / "checkpoints"
    with Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.all_steps() == [1, 2, 3]
        for step in ckpt.all_steps():
            assert (ckpt_dir / str(step) / SEAL).is_file()
            assert ckpt.verify(step) is None


@pytest.mark.parametrize("damage, target, reason", [
    (_flip_bytes, "array", "other bytes than when saved"),
    (_truncate, "array", "truncated"),
    (_empty_metadata, "state/_METADATA", "truncated"),
    (_empty_metadata, "_CHECKPOINT_METADATA", "truncated"),
])
def test_damaged_newest_step_is_skipped_with_one_line_saying_why(sealed_run, tmp_path, caplog, damage, target,
                                                                 reason):
    run = _copy(sealed_run, tmp_path)
    step3 = run / "checkpoints" / "3"
    path = _largest_array_file(step3) if target == "array" else step3 / target
    size = path.stat().st_size
    damage(path)
    if damage is _flip_bytes:
        assert path.stat().st_size == size  # same size: only the checksum can tell
    with caplog.at_level(logging.WARNING, logger="moshi_jax"), Checkpointer(run / "checkpoints") as ckpt:
        assert ckpt.latest_good_step() == 2
        assert ckpt.all_steps() == [1, 2]
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and "step 3 skipped" in lines[0] and reason in lines[0]
    assert (run / "checkpoints" / "damaged" / "3").is_dir()  # kept for inspection, out of Orbax's way


def test_step_without_seal_is_not_trusted(sealed_run, tmp_path, caplog):
    run = _copy(sealed_run, tmp_path)
    (run / "checkpoints" / "3" / SEAL).unlink()
    assert "no integrity.json" in verify_step(run / "checkpoints" / "3")
    with caplog.at_level(logging.WARNING, logger="moshi_jax"), Checkpointer(run / "checkpoints") as ckpt:
        assert ckpt.latest_good_step() == 2
    assert any("step 3 skipped: no integrity.json" in r.getMessage() for r in caplog.records)


def test_directory_from_before_seals_resumes_its_newest_step_with_a_warning(sealed_run, tmp_path, caplog):
    run = _copy(sealed_run, tmp_path)
    for step in (1, 2, 3):
        (run / "checkpoints" / str(step) / SEAL).unlink()
    with caplog.at_level(logging.WARNING, logger="moshi_jax"), Checkpointer(run / "checkpoints") as ckpt:
        assert ckpt.latest_good_step() == 3
    assert any("resuming from step 3 unverified" in r.getMessage() for r in caplog.records)
    assert not (run / "checkpoints" / "damaged").exists()  # nothing set aside


def test_run_resumes_from_the_newest_intact_step_and_finishes(sealed_run, tmp_path, caplog):
    """The damaged step 3 blocks nothing: the run resumes at step 2, redoes step 3 (bit-identical to the
    first time, data order included) and saves it again."""
    run = _copy(sealed_run, tmp_path)
    step3 = run / "checkpoints" / "3"
    _flip_bytes(_largest_array_file(step3))
    with caplog.at_level(logging.INFO, logger="moshi_jax"):
        report = train_loop(_cfg(run), toy_program(), make_mesh((1, 1, 1)), RULES)
    assert report["start_step"] == 2 and report["end_step"] == STEPS
    assert any("step 3 skipped" in r.getMessage() for r in caplog.records)
    import jax

    from moshi_jax.training.optimizer import make_optimizer
    from moshi_jax.training.train_state import build_state_spec

    spec = build_state_spec(toy_program().task, make_optimizer(_cfg(run).optimizer, STEPS), make_mesh((1, 1, 1)),
                            RULES)
    with Checkpointer(sealed_run / "checkpoints") as a, Checkpointer(run / "checkpoints") as b:
        assert b.verify(3) is None
        x, y = a.restore(3, spec.abstract_state), b.restore(3, spec.abstract_state)
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_no_intact_step_starts_from_scratch_and_keeps_the_damaged_ones(sealed_run, tmp_path, caplog):
    run = _copy(sealed_run, tmp_path)
    for step in (1, 2, 3):
        _truncate(_largest_array_file(run / "checkpoints" / str(step)))
    with caplog.at_level(logging.WARNING, logger="moshi_jax"), Checkpointer(run / "checkpoints") as ckpt:
        assert ckpt.latest_good_step() is None
        assert ckpt.all_steps() == []
    assert sorted(p.name for p in (run / "checkpoints" / "damaged").iterdir()) == ["1", "2", "3"]
    assert any("starting from the beginning" in r.getMessage() for r in caplog.records)


def test_restoring_a_damaged_step_directly_is_one_clear_error(sealed_run, tmp_path):
    from moshi_jax.training.checkpointing import CheckpointCorruptError
    from moshi_jax.training.optimizer import make_optimizer
    from moshi_jax.training.train_state import build_state_spec

    run = _copy(sealed_run, tmp_path)
    _empty_metadata(run / "checkpoints" / "3" / "state" / "_METADATA")
    spec = build_state_spec(toy_program().task, make_optimizer(_cfg(run).optimizer, STEPS), make_mesh((1, 1, 1)),
                            RULES)
    with Checkpointer(run / "checkpoints") as ckpt:
        with pytest.raises(CheckpointCorruptError, match=r"checkpoints/3") as e:
            ckpt.restore(3, spec.abstract_state)
    assert "\n" not in str(e.value)
