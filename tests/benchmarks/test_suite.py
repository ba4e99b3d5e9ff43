"""The benchmark suite's bookkeeping, and one small end-to-end run (tiny engine, batch 1, no reference)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import suite


def test_percentiles_report_median_and_p99_in_milliseconds():
    p = suite.percentiles([0.001] * 99 + [0.101])
    assert p["median_ms"] == pytest.approx(1.0) and p["frames"] == 100
    assert 1.0 < p["p99_ms"] <= 101.0 and p["max_ms"] == pytest.approx(101.0)


def test_realtime_sessions_takes_the_largest_batch_within_80ms_and_the_throughput_bound():
    rows = [{"batch": 1, "x": {"median_ms": 10.0, "p99_ms": 12.0}},
            {"batch": 8, "x": {"median_ms": 40.0, "p99_ms": 70.0}},
            {"batch": 32, "x": {"median_ms": 100.0, "p99_ms": 150.0}}]
    s = suite.realtime_sessions(rows, "x")
    assert s["largest_batch_p99_within_80ms"] == 8
    assert s["throughput_bound_sessions"] == pytest.approx(32 * 80 / 100)  # max(8, 16, 25.6)
    assert suite.realtime_sessions([{"batch": 4, "x": {"median_ms": 200.0, "p99_ms": 300.0}}], "x")[
        "largest_batch_p99_within_80ms"] == 0


def test_speech_frames_are_real_speech_shifted_per_conversation():
    x = suite.speech_frames(5, 3, 1920)
    assert x.shape == (5, 3, 1920) and x.dtype == np.float32
    assert np.abs(x).max() > 0.05  # speech, not silence
    assert not np.array_equal(x[:, 0], x[:, 1])


def test_suite_writes_a_report_that_says_it_ran_on_random_weights(tmp_path):
    rc = suite.main(["--quick", "--sections", "latency", "--configs", "tiny", "--batches", "1", "--no-reference",
                     "--out", str(tmp_path)])
    assert rc == 0
    report = (tmp_path / "report.md").read_text()
    assert "seeded RANDOM weights" in report and "| tiny | 1 |" in report
    data = json.loads((tmp_path / "results.json").read_text())
    row = data["sections"]["latency"]["data"]["rows"][0]
    assert row["ours"]["frames"] == 10 and row["ours"]["median_ms"] > 0
    assert data["weights_dir"] is None
