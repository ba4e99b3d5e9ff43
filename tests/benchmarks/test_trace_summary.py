"""benchmarks/trace_summary.py: the top ops of a real jax.profiler trace (XLA:CPU) and of a device-line trace."""

from __future__ import annotations

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import trace_summary


def test_summary_of_a_cpu_trace_lists_the_programs_ops_by_time(tmp_path):
    f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum())
    a = jnp.ones((384, 384))
    f(a, a).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(3):
            f(a, a).block_until_ready()
    s = trace_summary.summarize(tmp_path, top=5, steps=3)
    assert s["lines"] == "cpu" and s["total_ms"] > 0
    assert s["ms_per_step"] == pytest.approx(s["total_ms"] / 3, rel=1e-3)
    ops = s["ops"]
    assert ops and all(r["count"] % 3 == 0 for r in ops)  # each op ran once per traced step
    assert [r["total_ms"] for r in ops] == sorted((r["total_ms"] for r in ops), reverse=True)
    assert sum(r["share"] for r in s["categories"]) == pytest.approx(1, abs=1e-3)
    assert not any(r["name"].startswith(("end: ", "ThreadpoolListener")) for r in ops)  # no runtime bookkeeping
    assert "| op | category |" in trace_summary.markdown(s)


def test_summary_of_a_device_trace_reads_only_the_xla_ops_line(tmp_path):
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "XLA Ops"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Modules"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 9, "args": {"name": "tf_XLAPjRtCpuClient/1"}}]
    ops = [{"ph": "X", "pid": 1, "tid": 7, "name": "fusion.3", "dur": 600.0, "args": {"hlo_category": "matmul"}},
           {"ph": "X", "pid": 1, "tid": 7, "name": "fusion.3", "dur": 600.0, "args": {"hlo_category": "matmul"}},
           {"ph": "X", "pid": 1, "tid": 7, "name": "all-reduce.1", "dur": 300.0},
           {"ph": "X", "pid": 1, "tid": 8, "name": "jit_step", "dur": 5000.0},  # the module, not an op
           {"ph": "X", "pid": 2, "tid": 9, "name": "host_op", "dur": 9000.0}]  # host line ignored on a device
    path = tmp_path / "host.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + ops}, f)
    s = trace_summary.summarize(tmp_path, steps=2)
    assert s["lines"] == "device" and s["total_ms"] == pytest.approx(1.5)
    assert s["ops"][0] == {"name": "fusion.3", "count": 2, "total_ms": 1.2, "share": 0.8, "category": "matmul",
                           "ms_per_step": 0.6}
    assert [r["name"] for r in s["categories"]] == ["matmul", "all-reduce"]


def test_summary_without_a_trace_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.trace.json.gz"):
        trace_summary.summarize(tmp_path)
