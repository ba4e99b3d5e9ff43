"""Where the time of a traced step goes: the top device ops of a `jax.profiler` trace, by total time.

    python -m benchmarks.trace_summary runs/accel/profile/train --steps 3 --top 20

`jax.profiler.trace(dir)` writes `dir/plugins/profile/<run>/<host>.trace.json.gz` (Chrome trace events). The
compiled program's ops are the complete ("X") events of the device op lines: on GPU / TPU the "XLA Ops" thread
of each `/device:...` process; XLA:CPU has no device process and runs them on its client thread
(`tf_XLA...CpuClient`, also holding bookkeeping events that are left out) and its Eigen pool threads
(`tf_XLAEigen`), whose op times are summed (CPU time, not wall time). Ops are summed by name (one HLO
instruction, e.g. `fusion.12`) and by category (the name without its `.N` suffix, or the trace's
`hlo_category` where present: convolution / fusion / all-reduce ...), with the share of the total op time and,
given the number of traced steps, the milliseconds per step.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path

#: events on XLA:CPU's op threads that are runtime bookkeeping, not ops of the program (thread-pool waits appear
#: only when the pool is busy, e.g. on a loaded machine)
_CPU_BOOKKEEPING = re.compile(r"^(end: |ThreadpoolListener|ThunkExecutor|TfrtCpu|PjRt|Execute|\w*ThreadPool::)")


def find_trace(path: Path) -> Path:
    """`path` itself if it is a trace file, else the newest `*.trace.json.gz` under it."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(path.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no *.trace.json.gz under {path} (was it written by jax.profiler.trace?)")
    return found[-1]


def load_trace(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def op_lines(events: list[dict]) -> tuple[set[tuple], str]:
    """The (pid, tid) lines holding the program's ops, and which kind they are ("device" or "cpu")."""
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device = {k for k, name in threads.items()
              if str(procs.get(k[0], "")).startswith("/device:") and name == "XLA Ops"}
    if device:
        return device, "device"
    # XLA:CPU runs a program's thunks on the client thread and on its Eigen intra-op pool (which thread takes which
    # op varies from run to run): both hold ops; op time is then summed over threads (CPU time, not wall time)
    return {k for k, name in threads.items() if "XLA" in name and ("Client" in name or "Eigen" in name)}, "cpu"


def category(event: dict) -> str:
    cat = (event.get("args") or {}).get("hlo_category")
    return str(cat) if cat else re.sub(r"(\.\d+)+$", "", event["name"]).lstrip("%")


def summarize(path: Path, top: int = 20, steps: int | None = None) -> dict:
    """{trace, lines, total_ms, ms_per_step, ops: [{name, category, count, total_ms, share}], categories: [...]}."""
    trace = find_trace(path)
    events = load_trace(trace)
    lines, kind = op_lines(events)
    by_name: dict[str, list] = collections.defaultdict(lambda: [0, 0.0, ""])
    for e in events:
        if e.get("ph") != "X" or (e["pid"], e.get("tid")) not in lines:
            continue
        if kind == "cpu" and _CPU_BOOKKEEPING.match(e["name"]):
            continue
        r = by_name[e["name"]]
        r[0] += 1
        r[1] += float(e.get("dur", 0.0)) / 1e3  # trace durations are microseconds
        r[2] = category(e)
    total = sum(r[1] for r in by_name.values())
    if not total:
        raise ValueError(f"{trace}: no op events on the device / XLA:CPU lines")
    cats: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for count, ms, cat in by_name.values():
        cats[cat][0] += count
        cats[cat][1] += ms

    def rows(items, with_cat):
        out = []
        for name, v in sorted(items, key=lambda kv: -kv[1][1])[:top]:
            r = {"name": name, "count": v[0], "total_ms": round(v[1], 3), "share": round(v[1] / total, 4)}
            if with_cat:
                r["category"] = v[2]
            if steps:
                r["ms_per_step"] = round(v[1] / steps, 3)
            out.append(r)
        return out

    return {"trace": str(trace), "lines": kind, "total_ms": round(total, 3),
            "ms_per_step": round(total / steps, 3) if steps else None, "distinct_ops": len(by_name),
            "ops": rows(by_name.items(), True), "categories": rows(cats.items(), False)}


def markdown(s: dict, top: int = 10) -> str:
    lines = [f"op time {s['total_ms']} ms ({s['lines']} op lines, {s['distinct_ops']} distinct ops"
             + (f", {s['ms_per_step']} ms per step)" if s.get("ms_per_step") else ")"), "",
             "| category | count | ms | share |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['count']} | {r['total_ms']} | {r['share']:.1%} |" for r in s["categories"][:top]]
    lines += ["", "| op | category | count | ms | share |", "|---|---|---|---|---|"]
    lines += [f"| {r['name'][:60]} | {r['category']} | {r['count']} | {r['total_ms']} | {r['share']:.1%} |"
              for r in s["ops"][:top]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trace_summary", description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path, help="a jax.profiler.trace directory or a *.trace.json.gz file")
    p.add_argument("--top", type=int, default=20, help="ops and categories to list (default 20)")
    p.add_argument("--steps", type=int, default=None, help="steps in the trace (adds ms per step)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    args = p.parse_args(argv)
    s = summarize(args.path, args.top, args.steps)
    print(json.dumps(s, indent=1) if args.json else markdown(s, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
