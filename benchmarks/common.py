"""Shared benchmark helpers: timing (compile apart from steady state), machine info, tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Row:
    name: str
    ours_s: float  # steady-state median, seconds
    ref_s: float | None  # reference median, seconds (same run), None if not measured
    compile_s: float | None = None  # first call minus steady state (JAX compile + first run)
    unit: str = "s"
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return None if not self.ref_s else self.ours_s / self.ref_s


# glibc malloc: one arena, no mmap'd blocks, no trimming. By default glibc hands big freed buffers back to the
# OS and every step page-faults them in again (a bench_111m train step: ~430k faults, 1.7 GB, ~0.45 s of
# 2.5 s; the PyTorch reference pays the same). Both implementations run in one process, so both get it.
MALLOC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"


def keep_freed_memory(enabled: bool = True) -> None:
    """Re-exec this process (same argv) with `MALLOC_TUNABLES` unless GLIBC_TUNABLES is already set."""
    if not enabled or "GLIBC_TUNABLES" in os.environ or platform.system() != "Linux":
        return
    os.environ["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def block(x):
    """Wait for JAX arrays (any pytree) to be computed."""
    import jax

    return jax.block_until_ready(x)


def time_fn(fn: Callable[[], object], warmup: int = 2, iters: int = 10) -> tuple[float, float, list[float]]:
    """Returns (first_call_s, steady_median_s, samples). The first call includes compilation."""
    t0 = time.perf_counter()
    block(fn())
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        block(fn())
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        block(fn())
        samples.append(time.perf_counter() - t0)
    return first, statistics.median(samples), samples


def machine_info() -> dict:
    import jax

    info = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def print_table(title: str, rows: list[Row]) -> str:
    lines = [f"### {title}", "", "| measure | moshi-jax | reference (PyTorch) | ratio (ours/ref) | compile | note |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(f"| {r.name} | {fmt_time(r.ours_s)} | {fmt_time(r.ref_s)} | {ratio} | "
                     f"{fmt_time(r.compile_s)} | {r.note} |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_results(path: str | Path | None, title: str, rows: list[Row], extra: dict | None = None) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"title": title, "machine": machine_info(), "rows": [asdict(r) | {"ratio": r.ratio} for r in rows]}
    if extra:
        payload.update(extra)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
