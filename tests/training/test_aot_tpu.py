"""AOT: the real LM's sharded train step lowers and compiles for a TPU topology (libtpu compile-only) on a
machine without TPUs, in the separate libtpu venv (`python -m train.tpu_aot setup`; skipped without it)."""

import json
import os
import subprocess
import sys

import pytest

from train import tpu_aot

READY, WHY = tpu_aot.venv_is_ready()
pytestmark = pytest.mark.skipif(not READY, reason=f"TPU compile-only venv unavailable: {WHY}")


def test_tiny_lm_train_step_compiles_for_v5e_2x2_with_donated_sharded_state():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run([sys.executable, "-m", "train.tpu_aot", "compile", "tiny", "compute_dtype=bfloat16",
                           "--topology", "v5e:2x2", "--mesh", "1,2,2"], capture_output=True, text=True,
                          cwd=tpu_aot.REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["num_devices"] == 4 and r["device_kind"].startswith("TPU v5")
    assert r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert r["flops_per_device_step"] > 0 and r["params"] == r["trainable_params"] > 0
    # Each device holds its shard of the float32 train state, and donation aliases it to the outputs.
    per_device_state = r["train_state_bytes_total"] / r["num_devices"]
    assert r["argument_size_in_bytes"] >= per_device_state
    assert r["alias_size_in_bytes"] >= 0.9 * per_device_state
    assert r["argument_size_in_bytes"] < 0.75 * r["train_state_bytes_total"]  # sharded, not replicated
    # roofline against v5e's peaks: the slower of compute and HBM time, and the MFU that implies
    rf = r["roofline"]
    assert r["bytes_accessed_per_device_step"] > 0
    assert rf["roofline_s"] == max(rf["compute_s"], rf["memory_s"]) > 0
    assert abs(rf["compute_s"] - r["flops_per_device_step"] / 197e12) < 1e-12
    assert 0 < rf["implied_mfu"] <= 1.5


def test_layer_extrapolation_from_unrolled_shallow_compiles_matches_the_full_depth_compile():
    # Unrolled compiles at 1 and 2 temporal layers predict the 3-layer step; the 3-layer compile is the check.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run([sys.executable, "-m", "train.tpu_aot", "compile", "tiny", "model.temporal.num_layers=3",
                           "data.seq_frames=16", "--batch-size", "4", "--topology", "v5e:2x2",
                           "--extrapolate-layers", "1,2,3"], capture_output=True, text=True, cwd=tpu_aot.REPO,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [p["temporal_layers"] for p in r["points"]] == [1, 2, 3] and r["temporal_layers"] == 3
    # unrolled: every layer counted (a 1-layer stack is a trip-count-1 loop in the traced program, gone once compiled)
    assert all(p["while_loops"] == 0 for p in r["points"][1:]) and not any(p["scan_layers"] for p in r["points"])
    assert r["points"][0]["compiled_while_loops"] == 0
    err = r["fit"]["linearity_rel_error"]["3"]
    assert abs(err["flops_per_device_step"]) < 0.01
    assert abs(err["bytes_accessed_per_device_step"]) < 0.05
    assert err["model_flops_per_step"] == pytest.approx(0, abs=1e-12)  # the analytic count is exactly linear
    assert abs(err["argument_size_in_bytes"]) < 1e-3  # state shards: linear up to padding
    assert abs(err["alias_size_in_bytes"]) < 1e-3
    # (temporaries follow XLA's scheduling, not a formula: reported with their error, not asserted)
    assert "temp_size_in_bytes" in err
    full = r["points"][2]
    assert r["flops_per_device_step"] == pytest.approx(full["flops_per_device_step"], rel=0.01)
    assert r["model_flops_per_step"] == pytest.approx(full["model_flops_per_step"])
    # XLA's count of the whole unrolled step is the model's FLOPs and a little more (dense causal attention,
    # norms, softmax), unlike a scanned stack's one-layer count.
    assert 1.0 <= r["xla_over_model_flops"] < 1.6
    rf = r["roofline"]
    assert rf["roofline_s"] == max(rf["compute_s"], rf["memory_s"]) and not rf["xla_counts_loop_body_once"]
    assert rf["frames_per_s"] == pytest.approx(4 * 16 / rf["roofline_s"])
    assert r["fits_hbm"] is True
