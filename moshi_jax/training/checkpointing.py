"""Orbax checkpoints of a training run: train state + Grain iterator position + config JSON.

    ckpt = Checkpointer(dir, every=500, keep=3, async_save=True)
    ckpt.save(step, state, data_iter, config_json)        # every `every` steps (force=True: now), async
    step = ckpt.latest_step()
    state = ckpt.restore(step, spec.abstract_state, data_iter)   # onto spec's mesh; data_iter restored in place
    ckpt.close()                                           # waits for pending async saves

One checkpoint = an Orbax Composite `{state: StandardSave(TrainState), data_iter: grain CheckpointSave,
config: JsonSave}`. Restores always go through an abstract target whose leaves carry the CURRENT mesh's
shardings, so a run saved on one mesh resumes on another. Before restoring, the saved tree is checked
against the target (paths, shapes, dtypes) and any mismatch is a `CheckpointMismatchError` that names the
first differing params. LoRA runs save only the trainable tree (factors + trained embeddings); the frozen
base comes back from the init source. Call save/restore outside `jax.set_mesh` (orbax issues #2545, #3164).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

STATE, DATA, CONFIG = "state", "data_iter", "config"


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not fit the model/optimizer of this run."""


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _flat(tree) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(
        x, "dtype"))[0]
    return {_path_str(p): v for p, v in leaves}


class Checkpointer:
    def __init__(self, directory: str | Path, *, every: int = 1, keep: int | None = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        handlers = {STATE: ocp.StandardCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler(),
                    CONFIG: ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any = None, config: dict | str | None = None,
             force: bool = False) -> bool:
        """Save (asynchronously when enabled) if `step` is on the save interval or `force`; True if saving."""
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iter is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(json.loads(config) if isinstance(config, str) else config)
        return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def saved_config(self, step: int | None = None) -> dict | None:
        step = self.latest_step() if step is None else step
        if step is None or not (self.directory / str(step) / CONFIG).exists():
            return None
        return self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

    def check_compatible(self, step: int, abstract_state: Any) -> None:
        """Raise CheckpointMismatchError when the saved state's tree does not match `abstract_state`."""
        meta = self.manager.item_metadata(step)[STATE]
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
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
