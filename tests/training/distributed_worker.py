"""One process of a multi-process test run (tests/training/test_distributed.py starts several of these, each with
its own XLA_FLAGS device count and MOSHI_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID).

    python distributed_worker.py train [--kill-at STEP] [config] key=value ...   # `moshi-jax train ...`
    python distributed_worker.py shards OUT_JSON EPOCHS [config] key=value ...   # this process's training windows

`--kill-at STEP` SIGKILLs the process when the loop is about to save step STEP, once step STEP - 1's checkpoint
is complete and sealed (a preemption at a known point). `shards` joins the run, builds the training pipeline of the
config and writes the `window` ids of the rows this process loads in EPOCHS epochs of the (single) source.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def _kill_at(step: int) -> None:
    from moshi_jax.training.checkpointing import Checkpointer

    save = Checkpointer.save

    def save_or_die(self, s, *args, **kwargs):
        if int(s) == step:
            self.wait()  # step - 1 is on disk and sealed (every process waits for it)
            os.kill(os.getpid(), signal.SIGKILL)
        return save(self, s, *args, **kwargs)

    Checkpointer.save = save_or_die


def _shards(out: str, epochs: int, argv: list[str]) -> None:
    import jax
    import numpy as np

    from moshi_jax.data import pipeline
    from moshi_jax.data.records import TokenizedDataset
    from moshi_jax.training import config as config_lib
    from moshi_jax.training import distributed

    name, overrides = config_lib.main_overrides(argv)
    cfg = config_lib.load_config(name, overrides)
    distributed.join(cfg)
    (source,) = cfg.data.sources
    lengths = np.array([r["num_frames"] for r in TokenizedDataset.open(source.path).records])
    windows = int(np.sum(-(-lengths // cfg.data.seq_frames)))
    steps = epochs * windows // cfg.data.batch_size
    it = iter(pipeline.make_dataset(cfg.data, config_lib.build_lm_config(cfg), train=True))
    rows = [next(it)["window"].tolist() for _ in range(steps)]
    with open(out, "w") as f:
        json.dump({"process": jax.process_index(), "count": jax.process_count(), "windows": windows,
                   "rows": rows}, f)


def main(argv: list[str]) -> None:
    mode, rest = argv[0], argv[1:]
    if mode == "train":
        if rest[:1] == ["--kill-at"]:
            _kill_at(int(rest[1]))
            rest = rest[2:]
        from moshi_jax import cli

        sys.exit(cli.main(["train", *rest]))
    elif mode == "shards":
        _shards(rest[0], int(rest[1]), rest[2:])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
