"""LMConfig: presets, reference kwargs / config.json round trips, validation of unsupported options."""

from __future__ import annotations

import dataclasses

import pytest

from moshi_jax.lm.config import MOSHI_7B_KWARGS, LMConfig

PRESETS = ["tiny", "bench_111m", "moshi_2b", "moshi_7b"]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_round_trips_through_reference_kwargs(name):
    cfg = getattr(LMConfig, name)()
    assert LMConfig.from_reference_kwargs(cfg.to_reference_kwargs()) == cfg


def test_7b_preset_matches_released_hyperparameters():
    cfg = LMConfig.moshi_7b()
    t, d = cfg.temporal, cfg.depth
    assert (t.d_model, t.num_layers, t.num_heads, t.dim_feedforward, t.context) == (4096, 32, 32, 16896, 3000)
    assert (t.norm, t.gating, t.positional_embedding, t.layer_scale) == ("rms_norm_f32", "silu", "rope", None)
    assert (d.d_model, d.num_layers, d.num_heads, d.dim_feedforward) == (1024, 6, 16, 4224)
    assert (d.weights_per_step, d.positional_embedding, d.context, d.cache_capacity) == (8, "none", None, 8)
    assert cfg.delays == (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)
    assert (cfg.text_initial_token_id, cfg.initial_token_id, cfg.num_streams, cfg.max_delay) == (32000, 2048, 17, 1)
    assert (cfg.existing_text_padding_id, cfg.existing_text_end_padding_id) == (3, 0)
    assert cfg.depformer_multi_linear and cfg.num_depformer_in == 8


def test_tiny_and_bench_presets_follow_the_contract():
    tiny = LMConfig.tiny()
    assert (tiny.dim, tiny.temporal.num_layers, tiny.temporal.num_heads, tiny.temporal.context) == (64, 2, 4, 256)
    assert (tiny.card, tiny.text_card, tiny.n_q, tiny.dep_q) == (2048, 512, 16, 8)
    assert (tiny.depth.d_model, tiny.depth.num_layers, tiny.depth.num_heads) == (32, 2, 2)
    bench = LMConfig.bench_111m()
    assert (bench.dim, bench.temporal.num_layers, bench.temporal.num_heads) == (512, 6, 8)
    assert (bench.depth.d_model, bench.depth.num_layers) == (256, 4)
    assert (bench.text_card, bench.card, bench.n_q, bench.dep_q) == (32000, 2048, 16, 8)


def test_repo_config_json_keys_are_ignored_and_depformer_inherits_shared_kwargs():
    conf = {**MOSHI_7B_KWARGS, "moshi_name": "model.safetensors", "model_type": "moshi", "lm_gen_config": {"temp": 1},
            "lora": False, "depformer_causal": True}
    assert LMConfig.from_reference_kwargs(conf) == LMConfig.moshi_7b()
    kw = {k: v for k, v in MOSHI_7B_KWARGS.items() if k not in ("depformer_num_layers", "depformer_gating")}
    cfg = LMConfig.from_reference_kwargs(kw)  # like the reference: the depformer takes num_layers / gating
    assert cfg.depth.num_layers == 32 and cfg.depth.gating == "silu"


def test_schedule_is_read_from_the_depth_config_and_sets_the_projection_count():
    cfg = LMConfig.from_reference_kwargs({**MOSHI_7B_KWARGS, "depformer_weights_per_step_schedule":
                                          [0, 1, 1, 2, 2, 2, 3, 3]})
    assert cfg.depformer_weights_per_step_schedule == (0, 1, 1, 2, 2, 2, 3, 3)
    assert cfg.depth.mult == 4 and cfg.num_depformer_in == 4 and cfg.depformer_in_index(5) == 2


@pytest.mark.parametrize("key,value", [("demux_second_stream", True), ("conditioners", {"x": {}}), ("kv_repeat", 2),
                                       ("depformer_norm", "rms_norm"), ("lora", True), ("bias_proj", True)])
def test_unsupported_reference_options_are_refused_by_name(key, value):
    with pytest.raises(ValueError, match=key):
        LMConfig.from_reference_kwargs({**MOSHI_7B_KWARGS, key: value})


def test_unknown_kwargs_and_bad_delays_are_refused():
    with pytest.raises(ValueError, match="unknown reference LM kwargs: \\['hiden_scale'\\]"):
        LMConfig.from_reference_kwargs({**MOSHI_7B_KWARGS, "hiden_scale": 4})
    with pytest.raises(ValueError, match="delays has 3 entries, expected n_q \\+ 1 = 17"):
        LMConfig.from_reference_kwargs({**MOSHI_7B_KWARGS, "delays": [0, 1, 1]})
    with pytest.raises(ValueError, match="dep_q \\(9\\) cannot exceed n_q \\(8\\)"):
        LMConfig.from_reference_kwargs({**MOSHI_7B_KWARGS, "n_q": 8, "dep_q": 9, "delays": [0] * 9})


def test_with_dtypes_sets_both_stacks():
    cfg = LMConfig.tiny().with_dtypes("bfloat16", "bfloat16")
    assert cfg.dtype == cfg.temporal.dtype == cfg.depth.dtype == "bfloat16"
    assert cfg.param_dtype == cfg.depth.param_dtype == "bfloat16"
    # Only the dtypes change.
    assert dataclasses.replace(cfg.temporal, dtype="float32", param_dtype="float32") == LMConfig.tiny().temporal


@pytest.mark.parity
@pytest.mark.parametrize("name", ["tiny", "moshi_2b"])
def test_reference_builds_from_exported_kwargs_with_the_same_param_count(name):
    import torch
    from moshi.models.lm import LMModel as RefLM

    from moshi_jax.lm.checkpoint import abstract_params
    from moshi_jax.lm.model import param_count

    cfg = getattr(LMConfig, name)()
    ref = RefLM(device="meta", dtype=torch.float32, **cfg.to_reference_kwargs())
    assert sum(p.numel() for p in ref.parameters()) == param_count(abstract_params(cfg))
