"""Atomic outputs: every file or folder a command writes appears whole or not at all.

    with atomic_path("out/codes.npy") as tmp:      # tmp: a sibling "out/.codes.npy.tmp-<pid>-<rand>"
        np.save(tmp, codes)                          # renamed onto out/codes.npy only if the block succeeds
    with atomic_dir("data/train_tok") as tmp:       # an empty sibling folder; on success it replaces the old one
        write_dataset(tmp)
    atomic_write_text("run/report.json", text)

A failure inside the block (an exception, Ctrl-C) removes the temporary sibling and leaves the previous output
exactly as it was. The sibling lives in the same folder as the target, so the final `os.replace` is a rename
on one filesystem (atomic for files; for folders the old one is first moved aside, then removed once the new
one is in place). `check_output_path` does the path checks that should run before any work: a parent that
is a regular file, a file target that names an existing folder, a folder target that is a file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that cannot be written (names the path and why)."""


def _sibling(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(3)}")


def check_output_path(path: str | os.PathLike, kind: str = "file") -> Path:
    """Raise OutputPathError unless `path` can become a file (`kind="file"`) or folder (`kind="dir"`): no
    ancestor may be a regular file, a file target may not be an existing folder, a folder target may not be
    an existing file. Creates nothing. Returns the path."""
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    p = Path(path)
    if str(p) in ("", "."):
        raise OutputPathError("the output path is empty")
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"cannot write {p}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputPathError(f"cannot write {p}: folder {parent} is not writable")
            break
    if kind == "file" and p.is_dir():
        raise OutputPathError(f"{p} is an existing folder; give the output file's name (e.g. {p / 'out'}...)")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise OutputPathError(f"{p} is an existing file; the output must be a folder")
    return p


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling file path for `target`; renamed onto `target` when the block exits normally,
    removed otherwise. The writer may create the file (nothing exists at the yielded path yet)."""
    target = check_output_path(target, "file")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written for {target}")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """An empty temporary sibling folder for `target`; on normal exit it takes `target`'s place (an old folder
    there is moved aside, then deleted), otherwise it is deleted and `target` is left untouched."""
    target = check_output_path(target, "dir")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if target.exists():
            old = _sibling(target, "old")
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)  # put the previous output back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(target)


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))
