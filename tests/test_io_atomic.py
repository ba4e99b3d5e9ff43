"""Atomic outputs: a failed writer leaves the previous file / folder exactly as it was and no temporary
behind; path checks catch a parent that is a file, a file target that is a folder, a folder target that is
a file."""

import pytest

from moshi_jax.io_atomic import (
    OutputPathError,
    atomic_dir,
    atomic_path,
    atomic_write_text,
    check_output_path,
)


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "first")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer crashed")
    assert target.read_text() == "first" and _names(tmp_path) == ["out.txt"]
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and not tmp.exists()
        tmp.write_text("second")
    assert target.read_text() == "second" and _names(tmp_path) == ["out.txt"]


def test_atomic_path_creates_parents_and_refuses_a_writer_that_wrote_nothing(tmp_path):
    target = tmp_path / "a" / "b" / "out.bin"
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(target):
            pass
    assert not target.exists()
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"x")
    assert target.read_bytes() == b"x"


def test_atomic_dir_swaps_whole_folders_and_keeps_the_old_one_on_failure(tmp_path):
    target = tmp_path / "data"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "b.txt").write_text("new")
            raise KeyboardInterrupt
    assert _names(target) == ["a.txt"] and _names(tmp_path) == ["data"]
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("new")
    assert _names(target) == ["b.txt"] and _names(tmp_path) == ["data"]


@pytest.mark.parametrize("make, kind, message", [
    (lambda d: d / "file.txt" / "out.npy", "file", "is a file, not a folder"),
    (lambda d: d / "file.txt" / "deeper" / "out", "dir", "is a file, not a folder"),
    (lambda d: d, "file", "is an existing folder"),
    (lambda d: d / "file.txt", "dir", "is an existing file"),
])
def test_output_path_checks(tmp_path, make, kind, message):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputPathError, match=message):
        check_output_path(make(tmp_path), kind)
    assert check_output_path(tmp_path / "new" / "out.wav", "file") == tmp_path / "new" / "out.wav"
    assert not (tmp_path / "new").exists()  # checking creates nothing
