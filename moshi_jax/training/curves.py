"""Loss curves of a run as a PNG (train and held-out eval losses against the step), from its metrics.jsonl.

    plot_loss_curves(run_dir / "metrics.jsonl", run_dir / "loss_curves.png")

metrics.jsonl is appended across resumes: a step logged twice keeps its later record (what the run continued
from). Needs matplotlib (the `bench` extra); without it the report says so and has no figure.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def read_metrics(path: str | Path) -> dict[str, list[dict]]:
    """{prefix: [record, ...] sorted by step, one per step (the later line wins)} of a metrics.jsonl."""
    by_prefix: dict[str, dict[int, dict]] = {}
    for raw in Path(path).read_text().splitlines():
        if raw.strip():
            rec = json.loads(raw)
            by_prefix.setdefault(rec.get("prefix", "train"), {})[int(rec["step"])] = rec
    return {p: [recs[s] for s in sorted(recs)] for p, recs in by_prefix.items()}


def loss_keys(records: list[dict]) -> list[str]:
    keys = {k for r in records for k in r if k.endswith("loss")}
    return sorted(keys, key=lambda k: (k != "loss", k))


def plot_loss_curves(metrics_jsonl: str | Path, out_png: str | Path, title: str = "") -> Path | None:
    """Train (thin) and eval (markers) losses per key against the step, log-scale y. None when matplotlib is
    missing or there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed (pip install moshi-jax[bench]): no loss-curve figure")
        return None
    data = read_metrics(metrics_jsonl)
    train, evals = data.get("train", []), data.get("eval", [])
    keys = loss_keys(train + evals)
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        t = [(r["step"], r[key]) for r in train if key in r]
        e = [(r["step"], r[key]) for r in evals if key in r]
        if t:
            ax.plot(*zip(*t, strict=True), lw=0.8, alpha=0.8, label="train")
        if e:
            ax.plot(*zip(*e, strict=True), "o-", ms=3, label="eval (held-out)")
        ax.set_title(key)
        ax.set_xlabel("step")
        if all(v > 0 for _, v in t + e):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
