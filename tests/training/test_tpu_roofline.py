"""The roofline arithmetic of train/tpu_aot.py (no compile needed): time at the chip's peaks, implied MFU, and the
sessions a chip holds and serves from two compiled batch sizes."""

from __future__ import annotations

import pytest

from train import tpu_aot


def test_roofline_is_the_slower_of_compute_and_memory_time_at_the_chips_peaks():
    peak, bw, _ = tpu_aot.chip_peaks("v5p:2x2x1")
    r = tpu_aot.roofline_seconds("v5p:2x2x1", flops=peak * 0.002, bytes_accessed=bw * 0.010)
    assert r["bound"] == "memory" and r["roofline_s"] == pytest.approx(0.010)
    r = tpu_aot.roofline_seconds("v5e:2x2", flops=197e12, bytes_accessed=0.819e12 * 0.5)
    assert r["bound"] == "compute" and r["roofline_s"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no peak figures"):
        tpu_aot.chip_peaks("v9z:2x2")


def test_train_roofline_implies_the_mfu_of_the_model_flops_over_all_chips():
    peak = tpu_aot.chip_peaks("v5p:2x2x2")[0]
    # 8 chips, each doing 1 s of work at peak (compute-bound); the model needs 80% of the FLOPs XLA counts
    r = tpu_aot.train_roofline("v5p:2x2x2", flops_per_device=peak, bytes_per_device=1.0,
                               model_flops=0.8 * 8 * peak, num_devices=8, frames_per_step=16 * 1250)
    assert r["roofline_s"] == pytest.approx(1.0) and r["implied_mfu"] == pytest.approx(0.8)
    assert r["frames_per_s"] == pytest.approx(20000)


def test_sessions_per_chip_is_the_smaller_of_what_fits_the_hbm_and_what_runs_in_real_time():
    gib = 2**30

    def point(b, t):
        return {"argument_size_in_bytes": (16 + 1.5 * b) * gib, "output_size_in_bytes": 1.5 * b * gib,
                "alias_size_in_bytes": 1.5 * b * gib, "temp_size_in_bytes": 0.5 * gib, "state_bytes": 1.5 * b * gib,
                "roofline_s": t}

    res = {"per_batch": {"1": point(1, 0.010), "32": point(32, 0.041)}}  # +1 ms per session
    s = tpu_aot.sessions_per_chip(res, hbm=95 * gib)
    assert s["bytes_per_extra_session"] == pytest.approx(1.5 * gib)
    assert s["sessions_fit_hbm"] == 52  # (95 - 16.5) / 1.5 = 52.3
    assert s["sessions_real_time_roofline"] == 71  # 32 + (80 - 41) ms / 1 ms
    assert s["sessions_per_chip"] == 52


def _point(layers: int, **over) -> dict:
    """A compiled point of a step whose every per-device quantity is base + layers * per_layer."""
    base = {k: 1000.0 * (i + 1) for i, k in enumerate(tpu_aot.LINEAR_FIELDS)}
    per = {k: 10.0 * (i + 1) for i, k in enumerate(tpu_aot.LINEAR_FIELDS)}
    p = {k: base[k] + layers * per[k] for k in tpu_aot.LINEAR_FIELDS}
    p.update({"temporal_layers": layers, "while_loops": 0, "scan_layers": False, "config": "x", "overrides": [],
              "topology": "v5p:2x2x2", "device_kind": "TPU v5", "mesh": {}, "num_devices": 8,
              "batch": [4, 17, 100], "compile_seconds": 1.0, "remat": "full", "lora": False,
              "compute_dtype": "bfloat16"}, **over)
    return p


def test_fit_layers_extrapolates_linearly_and_reports_the_third_points_error():
    pts = [_point(1), _point(2), _point(4, flops_per_device_step=_point(4)["flops_per_device_step"] * 1.01)]
    fit = tpu_aot.fit_layers(pts, full_layers=32)
    want = _point(32)
    for k in tpu_aot.LINEAR_FIELDS:
        assert fit["at_full_depth"][k] == pytest.approx(want[k])
    assert fit["fit_depths"] == [1, 2] and fit["check_depths"] == [4]
    assert fit["linearity_rel_error"]["4"]["flops_per_device_step"] == pytest.approx(1 / 1.01 - 1)
    assert fit["linearity_max_rel_error"] == pytest.approx(1 - 1 / 1.01)


def test_fit_layers_refuses_points_with_while_loops_or_one_depth():
    with pytest.raises(ValueError, match="while loops"):
        tpu_aot.fit_layers([_point(1), _point(2, while_loops=1)], 32)
    tpu_aot.fit_layers([_point(1, while_loops=2), _point(2)], 32)  # a 1-layer stack's trip-count-1 loop is exact
    with pytest.raises(ValueError, match="distinct depths"):
        tpu_aot.fit_layers([_point(1), _point(1)], 32)


def test_extrapolated_step_scales_one_microbatch_to_the_whole_step():
    one = tpu_aot.extrapolated_step([_point(1), _point(2)], 32)
    four = tpu_aot.extrapolated_step([_point(1), _point(2)], 32, microbatches=4)
    n = 8
    assert four["batch"] == [16, 17, 100] and one["batch"] == [4, 17, 100]
    assert four["flops_per_device_step"] == pytest.approx(4 * one["flops_per_device_step"])
    update = tpu_aot.ADAMW_BYTES_PER_PARAM * one["trainable_params"] / n
    assert four["bytes_accessed_per_device_step"] == pytest.approx(4 * one["bytes_accessed_per_device_step"]
                                                                   - 3 * update)
    accumulator = 4 * one["trainable_params"] / n  # one float32 gradient accumulator
    assert four["peak_bytes_per_device_estimate"] == pytest.approx(one["peak_bytes_per_device_estimate"]
                                                                   + accumulator)
    assert four["roofline"]["frames_per_s"] == pytest.approx(16 * 100 / four["roofline"]["roofline_s"])
    assert one["fits_hbm"] == (one["peak_bytes_per_device_estimate"] <= 95 * 2**30)


def test_temporaries_that_shrink_with_depth_are_not_extrapolated_but_bounded_below():
    a, b = _point(1), _point(2)
    b["temp_size_in_bytes"] = a["temp_size_in_bytes"] - 100.0  # XLA scheduled the deeper step tighter
    r = tpu_aot.extrapolated_step([a, b], 32)
    assert r["memory_is_lower_bound"] is True and r["temp_size_in_bytes"] == a["temp_size_in_bytes"]
    assert r["peak_bytes_per_device_estimate"] == pytest.approx(
        r["argument_size_in_bytes"] + r["output_size_in_bytes"] - r["alias_size_in_bytes"] + a["temp_size_in_bytes"])
    assert tpu_aot.extrapolated_step([_point(1), _point(2)], 32)["memory_is_lower_bound"] is False
