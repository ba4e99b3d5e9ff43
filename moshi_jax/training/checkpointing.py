"""Orbax checkpoints of a training run: train state + Grain iterator position + config JSON.

    ckpt = Checkpointer(dir, every=500, keep=3, async_save=True)
    ckpt.save(step, state, data_iter, config_json)        # every `every` steps (force=True: now), async
    step = ckpt.latest_good_step()                         # newest step whose checksums verify (see below)
    state = ckpt.restore(step, spec.abstract_state, data_iter)   # onto spec's mesh; data_iter restored in place
    ckpt.close()                                           # waits for pending async saves

One checkpoint = an Orbax Composite `{state: StandardSave(TrainState), data_iter: grain CheckpointSave,
config: JsonSave}`. Restores always go through an abstract target whose leaves carry the CURRENT mesh's
shardings, so a run saved on one mesh resumes on another. Before restoring, the saved tree is checked
against the target (paths, shapes, dtypes) and any mismatch is a `CheckpointMismatchError` that names the
first differing params. LoRA runs save only the trainable tree (factors + trained embeddings); the frozen
base comes back from the init source. Call save/restore outside `jax.set_mesh` (orbax issues #2545, #3164).

Integrity: once Orbax has finalized a step, its folder is sealed with `integrity.json` (size and SHA-256 of
every file in it), written last and atomically. `latest_good_step()` walks the steps newest first and returns
the first one whose files still match their seal; every step it passes over (no seal: the save never
finished; a file missing, truncated or with other bytes; an unreadable seal) gets one log line saying why and
is moved to `<dir>/damaged/<step>` (kept for inspection, out of Orbax's way), so the run resumes from the
newest good step and later saves of those step numbers are possible again. A directory in which no step has
a seal (written before seals existed) resumes from its newest Orbax-finalized step, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from moshi_jax.finite import path_name

STATE, DATA, CONFIG = "state", "data_iter", "config"
SEAL = "integrity.json"  # per-step checksums, written last
DAMAGED = "damaged"  # steps that failed verification are moved here

log = logging.getLogger("moshi_jax.train")


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not fit the model/optimizer of this run."""


class CheckpointCorruptError(RuntimeError):
    """A checkpoint step that cannot be read back (names the step)."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and not p.name.startswith(SEAL))


def seal_step(step_dir: str | Path) -> Path:
    """Write `step_dir/integrity.json`: {relative path: {size, sha256}} of every file (atomically, last)."""
    step_dir = Path(step_dir)
    files = {str(p.relative_to(step_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in _files(step_dir)}
    tmp = step_dir / (SEAL + ".tmp")  # not io_atomic: a folder deleted meanwhile must not be re-created
    with open(tmp, "w") as f:
        f.write(json.dumps({"version": 1, "files": files}, indent=0))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / SEAL)
    return step_dir / SEAL


def verify_step(step_dir: str | Path) -> str | None:
    """None when every file of the step matches its seal, else the reason it does not (one line)."""
    step_dir = Path(step_dir)
    seal = step_dir / SEAL
    if not seal.is_file():
        return f"no {SEAL} (the save did not finish, or it predates checksums)"
    try:
        files = json.loads(seal.read_text())["files"]
        items = [(str(k), int(v["size"]), str(v["sha256"])) for k, v in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{SEAL} is unreadable ({type(e).__name__}: {e})"
    if not items:
        return f"{SEAL} lists no files"
    for rel, size, digest in items:
        p = step_dir / rel
        if not p.is_file():
            return f"file {rel} is missing"
        actual = p.stat().st_size
        if actual != size:
            return f"file {rel} has {actual} bytes, {size} when saved (truncated or overwritten)"
        if _sha256(p) != digest:
            return f"file {rel} has other bytes than when saved (checksum mismatch)"
    return None


def _flat(tree) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(
        x, "dtype"))[0]
    return {path_name(p): v for p, v in leaves}


class Checkpointer:
    def __init__(self, directory: str | Path, *, every: int = 1, keep: int | None = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        handlers = {STATE: ocp.StandardCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler(),
                    CONFIG: ocp.JsonCheckpointHandler()}
        self._async = async_save
        self._to_seal: set[int] = set()  # steps saved by this object and not sealed yet
        self._lock = threading.Lock()  # save() may be called from several threads (tests, hooks)
        self._sealer: threading.Thread | None = None
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def _seal_pending(self, block: bool = False) -> None:
        """Seal the steps this object saved once Orbax has finished them (their folder has its final name).
        Orbax's post-finalization hook runs before that rename, so instead every `save` call (the loop makes
        one per step) and `wait` / `close` (block=True) look for finished steps. Hashing runs on a background
        thread (hashlib releases the GIL), so a large checkpoint does not stall training; a step killed before
        its seal is written is simply not trusted on resume."""
        if self._sealer is not None and (block or not self._sealer.is_alive()):
            self._sealer.join()
            self._sealer = None
        if self._sealer is not None:
            return
        with self._lock:
            ready = [s for s in sorted(self._to_seal) if (self.directory / str(s)).is_dir()]
            self._to_seal.difference_update(ready)
        if not ready or jax.process_index() != 0:
            return
        self._sealer = threading.Thread(target=self._seal, args=(ready,), name="checkpoint-seal", daemon=True)
        self._sealer.start()
        if block:
            self._sealer.join()
            self._sealer = None

    def _seal(self, steps: list[int]) -> None:
        for step in steps:
            try:
                seal_step(self.directory / str(step))
            except OSError as e:  # e.g. deleted meanwhile by keep-last-K: nothing left to seal
                log.debug("checkpoint step %d not sealed: %s", step, e)

    def verify(self, step: int) -> str | None:
        """None when step `step` is intact, else why not (see `verify_step`)."""
        return verify_step(self.directory / str(step))

    def latest_good_step(self) -> int | None:
        """The newest step that verifies; newer ones are logged (one line each, with the reason) and moved to
        `<dir>/damaged/`. None when no step is left."""
        self.manager.wait_until_finished()
        self._seal_pending(block=True)
        steps = sorted(self.all_steps(), reverse=True)
        if steps and not any((self.directory / str(s) / SEAL).is_file() for s in steps):
            # A directory written before seals existed: nothing to verify against, and setting every step
            # aside would silently restart a long run from scratch. Orbax lists only finalized steps.
            log.warning("no checkpoint step in %s carries an %s (written before integrity seals): resuming from "
                        "step %d unverified", self.directory, SEAL, steps[0])
            return steps[0]
        moved = False
        for step in steps:
            reason = self.verify(step)
            if reason is None:
                if moved:
                    self.manager.reload()
                return step
            where = self._quarantine(step)
            log.warning("checkpoint step %d skipped: %s; moved to %s", step, reason, where)
            moved = True
        if moved:
            self.manager.reload()
            log.warning("no intact checkpoint left in %s: starting from the beginning", self.directory)
        return None

    def _quarantine(self, step: int) -> Path:
        src = self.directory / str(step)
        dst = self.directory / DAMAGED / str(step)
        n = 1
        while dst.exists():
            dst = self.directory / DAMAGED / f"{step}.{n}"
            n += 1
        if jax.process_index() == 0:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        return dst

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` (without force) would write a checkpoint."""
        return bool(self.manager.should_save(int(step)))

    def save(self, step: int, state: Any, data_iter: Any = None, config: dict | str | None = None,
             force: bool = False) -> bool:
        """Save (asynchronously when enabled) if `step` is on the save interval or `force`; True if saving."""
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iter is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(json.loads(config) if isinstance(config, str) else config)
        if not self.manager.is_saving_in_progress():
            self._seal_pending()
        saving = self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)
        if saving:
            with self._lock:
                self._to_seal.add(int(step))
        if saving and not self._async:
            self._seal_pending(block=True)
        return saving

    def saved_config(self, step: int | None = None) -> dict | None:
        step = self.latest_step() if step is None else step
        if step is None or not (self.directory / str(step) / CONFIG).exists():
            return None
        return self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

    def check_compatible(self, step: int, abstract_state: Any) -> None:
        """Raise CheckpointMismatchError when the saved state's tree does not match `abstract_state`."""
        try:
            meta = self.manager.item_metadata(step)[STATE]
        except Exception as e:  # noqa: BLE001 - e.g. a damaged metadata JSON: name the step, one line
            raise CheckpointCorruptError(f"checkpoint {self.directory / str(step)}: unreadable metadata "
                                         f"({type(e).__name__}: {str(e).strip()[:300]})") from e
        saved, want = _flat(meta), _flat(abstract_state)
        missing, unexpected = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
        problems = []
        if missing:
            problems.append(f"missing in checkpoint: {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            problems.append(f"not in this model: {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        bad = [f"{k}: saved {tuple(saved[k].shape)} {np.dtype(saved[k].dtype)}, "
               f"expected {tuple(want[k].shape)} {np.dtype(want[k].dtype)}"
               for k in sorted(set(saved) & set(want))
               if tuple(saved[k].shape) != tuple(want[k].shape) or np.dtype(saved[k].dtype) != np.dtype(want[k].dtype)]
        if bad:
            problems.append(f"shape/dtype mismatch: {bad[:6]}{' ...' if len(bad) > 6 else ''}")
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory / str(step)} does not match this run's model/optimizer "
                f"(different model preset/overrides, LoRA settings or optimizer?): " + "; ".join(problems))

    def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
        """The train state at `step`, placed with `abstract_state`'s shardings; `data_iter` (a Grain iterator of
        the same pipeline) is moved to the saved position in place."""
        self.check_compatible(step, abstract_state)
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        has_data = (self.directory / str(step) / DATA).exists()
        if data_iter is not None:
            if not has_data:
                raise CheckpointMismatchError(f"checkpoint step {step} has no data iterator state to restore")
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - Orbax / tensorstore raise many types; say which step, in one line
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise CheckpointCorruptError(
                f"checkpoint {self.directory / str(step)} cannot be restored ({type(e).__name__}: {first}); move "
                f"it aside to resume from an earlier step, or set checkpoint.resume=false") from e
        return restored[STATE]

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._seal_pending(block=True)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self._seal_pending(block=True)
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
