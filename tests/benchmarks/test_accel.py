"""`python -m benchmarks.accel --smoke`: every section runs in its own process on CPU with tiny configs and the run
writes results.json + results.md with real figures (no section errors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_accel_smoke_run_measures_every_section_and_writes_json_and_markdown(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.accel", "--smoke", "--out", str(tmp_path),
                           "--budget-s", "1500", "--profile"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    for name in ("env", "engine", "train", "lora7b", "mimi_batch", "train_cpu_tricks", "engine_int8"):
        assert "error" not in res[name] and "skipped" not in res[name], (name, res[name])
    assert res["env"]["backend"] == "cpu"
    for b in ("1", "2"):
        r = res["engine"]["batches"][b]
        assert 0 < r["median_ms"] <= r["p99_ms"] and r["n"] == 3
    assert res["engine"]["lm_B1"]["median_ms"] > 0
    assert res["train"]["frames_per_s"] > 0 and res["train"]["remat"] == "dots"
    assert res["lora7b"]["lora"] is True and res["lora7b"]["frames_per_s"] > 0
    # both ways: the CPU kernel choices + unrolled stacks against the default (on CPU: the CPU choices, scanned)
    tricks = res["train_cpu_tricks"]
    assert tricks["scan_layers"] is False and "materialize_transposes=True" in tricks["kernels"]
    assert res["train"]["scan_layers"] is True and tricks["frames_per_s"] > 0
    # --profile: a jax.profiler trace of steady-state steps, summarised by op
    prof = res["train"]["profile"]
    assert Path(prof["trace"]).is_file() and prof["total_ms"] > 0 and prof["ops"][0]["count"] >= 3
    assert res["mimi_batch"]["ours_encode"]["median_ms"] > 0
    e8 = res["engine_int8"]
    assert e8["lm_param_bytes"] < res["engine"]["lm_param_bytes"]  # int8 transformer kernels
    assert e8["state_bytes_B2"] < 0.75 * res["engine"]["state_bytes_B2"]  # int8 KV rings
    assert 0 < e8["batches"]["2"]["median_ms"] <= e8["batches"]["2"]["p99_ms"]
    q = e8["quality"]["variants"]["int8 KV + weights"]
    assert 0 < q["text"]["max_abs"] and 0 <= q["audio"]["kl_mean"] and 0 <= q["text"]["top1_agree"] <= 1
    md = (tmp_path / "results.md").read_text()
    assert "full-duplex step, batch 2" in md and "full train step" in md and "LoRA train step" in md
    assert "int8 KV + weights, batch 2" in md and "int8 KV + weights vs bf16" in md
    assert "CPU tricks on" in md and "## profile: train" in md


def test_accel_help_lists_the_remat_and_microbatch_flags():
    out = subprocess.run([sys.executable, "-m", "benchmarks.accel", "--help"], cwd=REPO, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert out.returncode == 0 and "--train-remat" in out.stdout and "--train-microbatches" in out.stdout
