"""Training metrics: throughput, MFU estimate, TensorBoard event files, a tqdm bar and concise log lines.

Model FLOPs (for MFU) are counted analytically, PaLM-style: 6 FLOPs per matmul parameter per position it
is applied to (forward + backward), plus 12 * layers * d_model * context per position for attention
scores and values. Embedding tables (lookups) and vectors (norms, scales) are not matmul parameters. A
parameter with a `steps` axis (the depth transformer's per-codebook weights) applies one slice per depth
position, so it counts once per frame in total; other depth parameters count once per depth position
(`per_frame_uses`). XLA's own count of the compiled step (which includes rematerialisation) is reported
separately by `step.aot_compile_step` / `cost_flops`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from moshi_jax.training.lora import STACK_AXES, is_embedding

logger = logging.getLogger("moshi_jax.train")

Path_ = tuple[str, ...]

# Dense bf16 peak FLOP/s per device (chip for TPUs, GPU for NVIDIA), public spec sheets.
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
}


def guess_peak_flops(device: Any | None = None) -> float:
    """Peak bf16 FLOP/s of `device` (default: the first device) from its kind; 0 when unknown (e.g. CPU)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in kind:
            return PEAK_FLOPS[key]
    return 0.0


def matmul_flops_per_frame(shapes: dict[Path_, tuple[int, ...]], axes: dict[Path_, tuple],
                           per_frame_uses: Callable[[Path_], int] = lambda path: 1) -> float:
    """6 * sum over matmul params of (params used per frame): training FLOPs per frame, attention excluded."""
    total = 0.0
    for path, shape in shapes.items():
        ax = axes.get(path, (None,) * len(shape))
        core = [a for a in ax if a not in STACK_AXES]
        if len(core) < 2 or is_embedding(path, ax):
            continue
        size = math.prod(shape)
        if "steps" in ax:
            total += size  # one slice per depth position: the whole tensor once per frame
        else:
            total += size * per_frame_uses(path)
    return 6.0 * total


def attention_flops_per_frame(layers: int, d_model: int, context: int, positions_per_frame: int = 1) -> float:
    """12 * layers * d_model * context per position (QK^T and AV, forward + backward), PaLM's convention."""
    return 12.0 * layers * d_model * context * positions_per_frame


class Throughput:
    """Wall time per step and tokens/s between `tick()` calls (the first step, with compilation, is excluded
    from the averages)."""

    def __init__(self):
        self.last = None
        self.times: list[float] = []

    def tick(self) -> float | None:
        now = time.perf_counter()
        dt = None if self.last is None else now - self.last
        self.last = now
        if dt is not None:
            self.times.append(dt)
        return dt

    def mean_step_time(self, skip_first: int = 1) -> float | None:
        t = self.times[skip_first:] or self.times
        return sum(t) / len(t) if t else None


class MetricsLogger:
    """Scalars to TensorBoard (`<run_dir>/tensorboard`), a tqdm bar and a log line every `log_every` steps.
    `primary=False` (processes other than 0 of a multi-process run): only the history, nothing written."""

    def __init__(self, run_dir: str | Path, total_steps: int, log_every: int = 10, tensorboard: bool = True,
                 progress_bar: bool = True, initial_step: int = 0, primary: bool = True):
        self.log_every = max(1, log_every)
        self.primary = primary
        self.writer = None
        if tensorboard and primary:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.bar = None
        if progress_bar and primary:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)
        self.history: list[dict] = []
        # Every record as a JSON line (appended across resumes; a re-run step's later line wins): the run's
        # metric history on disk, e.g. for `moshi-jax export --best`.
        self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a") if primary else None  # closed in close()

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append({"prefix": prefix, **record})
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"prefix": prefix, **record}) + "\n")
            self.jsonl.flush()
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"{prefix}/{k}", float(v), step)
        if prefix == "train" and self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", refresh=False)
        if self.primary and (prefix != "train" or step % self.log_every == 0):
            logger.info(format_line(prefix, step, record))

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


_ORDER = ("loss", "text_loss", "audio_loss", "grad_norm", "lr", "tokens_per_s", "step_time", "mfu")


def format_line(prefix: str, step: int, record: dict) -> str:
    """`train step 120 | loss 3.2101 | text_loss 1.0 | ... | lr 2.00e-06 | tokens_per_s 12000` (known keys first)."""
    keys = [k for k in _ORDER if k in record] + sorted(k for k in record if k not in _ORDER and k != "step")
    parts = []
    for k in keys:
        v = record[k]
        parts.append(f"{k} {v:.2e}" if k == "lr" or (v != 0 and abs(v) < 1e-3) else f"{k} {v:.4g}")
    return f"{prefix} step {step} | " + " | ".join(parts)
