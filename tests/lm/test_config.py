"""LMConfig: presets, reference kwargs / config.json round trips, validation of unsupported options."""

from __future__ import annotations

import dataclasses

import pytest

from moshi_jax.lm.checkpoint import abstract_params
from moshi_jax.lm.config import MOSHI_7B_KWARGS, LMConfig
from moshi_jax.lm.model import param_count

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
    assert (t.max_period, d.max_period) == (10000, 10000)
    assert (d.d_model, d.num_layers, d.num_heads, d.dim_feedforward) == (1024, 6, 16, 4224)
    assert (d.weights_per_step, d.positional_embedding, d.context, d.cache_capacity) == (8, "none", None, 8)
    assert cfg.delays == (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)
    assert (cfg.text_initial_token_id, cfg.initial_token_id, cfg.num_streams, cfg.max_delay) == (32000, 2048, 17, 1)
    assert (cfg.existing_text_padding_id, cfg.existing_text_end_padding_id) == (3, 0)
    assert cfg.depformer_multi_linear and cfg.num_depformer_in == 8


def test_2b_preset_matches_the_released_2b_config():
    # moshi_dev_2b.json / moshi_mlx_2b.json (../shared/spec/moshi_reference.md, section 2.1)
    cfg = LMConfig.moshi_2b()
    t, d = cfg.temporal, cfg.depth
    assert (t.d_model, t.num_layers, t.num_heads, t.dim_feedforward, t.context) == (2560, 24, 20, 10560, 3000)
    assert (t.max_period, t.positional_embedding, t.norm, t.gating) == (100000, "rope", "rms_norm_f32", "silu")
    assert (cfg.text_card, cfg.n_q, cfg.dep_q, cfg.card, cfg.existing_text_padding_id) == (48000, 32, 16, 2048, 3)
    assert cfg.delays == (0, 0) + (2,) * 15 + (0,) + (2,) * 15
    assert (d.d_model, d.num_layers, d.num_heads, d.dim_feedforward, d.weights_per_step) == (1024, 6, 16, 4224, 16)


def test_the_learning_presets_have_their_documented_shapes():
    # The ASR / TTS models of the learning runs (their docstrings, configs/asr_*.py / tts_*.py, README): 8 codebooks
    # of the tiny Mimi (64 bins); STT: no depformer, every delay 0; TTS: a depformer, Moshi's acoustic delay.
    def shape(c):
        t = c.temporal
        return (t.d_model, t.num_layers, t.num_heads, t.context, c.card, c.text_card, c.n_q, c.dep_q)

    stt, tts, stt_base, tts_base = LMConfig.stt_small(), LMConfig.tts_small(), LMConfig.stt_base(), LMConfig.tts_base()
    assert shape(stt) == (192, 4, 4, 128, 64, 512, 8, 0) and stt.depth is None and stt.delays == (0,) * 9
    assert shape(tts) == (192, 4, 4, 128, 64, 512, 8, 8) and tts.delays == (0, 0) + (1,) * 7
    assert shape(stt_base) == (512, 8, 8, 256, 64, 512, 8, 0) and stt_base.delays == stt.delays
    assert shape(tts_base) == (512, 8, 8, 256, 64, 512, 8, 8) and tts_base.delays == tts.delays
    depth = [(c.depth.d_model, c.depth.num_layers, c.depth.num_heads, c.depth.dim_feedforward) for c in (tts, tts_base)]
    assert depth == [(64, 2, 4, 264), (256, 4, 4, 1056)]
    counts = [param_count(abstract_params(c)) for c in (stt, tts)]
    assert counts == [2_104_704, 3_100_800]  # README: the 2.1M-parameter ASR model


def test_tiny_and_bench_presets_follow_the_contract():
    tiny = LMConfig.tiny()
    assert (tiny.dim, tiny.temporal.num_layers, tiny.temporal.num_heads, tiny.temporal.context) == (64, 2, 4, 256)
    assert (tiny.card, tiny.text_card, tiny.n_q, tiny.dep_q) == (2048, 512, 16, 8)
    assert (tiny.depth.d_model, tiny.depth.num_layers, tiny.depth.num_heads, tiny.depth.dim_feedforward) == (
        32, 2, 2, 132)
    bench = LMConfig.bench_111m()
    assert (bench.dim, bench.temporal.num_layers, bench.temporal.num_heads) == (512, 6, 8)
    assert (bench.depth.d_model, bench.depth.num_layers, bench.depth.dim_feedforward) == (256, 4, 1056)
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


def _reference_defaults() -> dict:
    """Defaults of the reference `LMModel` kwargs (and of the `StreamingTransformer` kwargs it forwards)."""
    import inspect

    from moshi.models.lm import LMModel as RefLM
    from moshi.modules.transformer import StreamingTransformer, StreamingTransformerLayer

    out = {}
    for fn in (StreamingTransformerLayer.__init__, StreamingTransformer.__init__, RefLM.__init__):
        for k, p in inspect.signature(fn).parameters.items():
            if p.default is not inspect.Parameter.empty:
                out[k] = p.default
    keep = {"delays", "n_q", "dep_q", "card", "text_card", "dim", "num_heads", "hidden_scale", "norm", "causal",
            "context", "depformer_dim", "depformer_dim_feedforward", "depformer_multi_linear",
            "depformer_weights_per_step", "depformer_pos_emb", "depformer_low_rank_embeddings", "gating",
            "layer_scale", "max_period", "positional_scale", "positional_embedding", "existing_text_padding_id",
            "existing_text_end_padding_id"}
    return {k: v for k, v in out.items() if k in keep}


@pytest.mark.parity
def test_omitted_reference_kwargs_take_the_reference_defaults():
    defaults = _reference_defaults()
    assert defaults["causal"] is True and defaults["delays"] == [0]  # LMModel's own, not the transformer's
    minimal = {"num_layers": 1, "depformer_num_heads": 2, "delays": [0] * 9}
    assert LMConfig.from_reference_kwargs(minimal) == LMConfig.from_reference_kwargs({**defaults, **minimal})
    cfg = LMConfig.from_reference_kwargs(minimal)
    assert (cfg.dim, cfg.temporal.dim_feedforward, cfg.depth.dim_feedforward) == (128, 512, 1024)  # hidden_scale 4
    # and a text-only model needs no depformer kwargs (delays [0], the reference default, is one stream)
    text_only = LMConfig.from_reference_kwargs({"num_layers": 1, "n_q": 0, "dep_q": 0})
    assert text_only.depth is None and text_only.delays == (0,) and text_only.num_streams == 1


@pytest.mark.parametrize("change,match", [
    (dict(delays=(0, 1, -1)), "delays must be >= 0"),
    (dict(depth=None), "depth must be None exactly when dep_q == 0"),
    (dict(dep_q=0), "depth must be None exactly when dep_q == 0"),
    (dict(temporal="norm=batch_norm"), "unknown norm 'batch_norm'"),
    (dict(depth="norm=layer_norm"), "one `norm` for both transformers"),
    (dict(depth="weights_per_step=3"), "depth.weights_per_step must be 0 or dep_q"),
    (dict(depth="weights_per_step=0,weights_per_step_schedule=None"), None),  # shared depth weights: fine
    (dict(depth="context=1"), "depth.context must cover the dep_q depth steps"),
    (dict(depth="context=2"), None),  # exactly dep_q: enough
])
def test_inconsistent_configs_are_refused_with_the_reason(change, match):
    base = LMConfig.from_reference_kwargs({**MOSHI_7B_KWARGS, "n_q": 2, "dep_q": 2, "delays": [0, 0, 1],
                                           "depformer_weights_per_step": True, "num_layers": 1,
                                           "depformer_num_layers": 1})
    kw = {}
    for field, value in change.items():
        if isinstance(value, str) and "=" in value:  # "a=1,b=2": fields of that transformer config
            sub = dict(s.split("=") for s in value.split(","))
            sub = {k: (None if v == "None" else int(v) if v.lstrip("-").isdigit() else v) for k, v in sub.items()}
            value = dataclasses.replace(getattr(base, field), **sub)
        kw[field] = value
    if match is None:
        dataclasses.replace(base, **kw)
    else:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(base, **kw)


def test_a_schedule_without_per_step_weights_is_refused():
    with pytest.raises(ValueError, match="needs depformer weights_per_step"):  # (an empty one: a longer one
        LMConfig.from_reference_kwargs({**MOSHI_7B_KWARGS, "depformer_weights_per_step": False,  # fails earlier)
                                        "depformer_weights_per_step_schedule": []})
    with pytest.raises(ValueError, match="given with dep_q == 0"):
        LMConfig.from_reference_kwargs({"num_layers": 1, "n_q": 0, "dep_q": 0,
                                        "depformer_weights_per_step_schedule": [0]})


def test_one_depformer_projection_without_multi_linear():
    cfg = LMConfig.from_reference_kwargs({**MOSHI_7B_KWARGS, "depformer_multi_linear": False})
    assert cfg.num_depformer_in == 1 and [cfg.depformer_in_index(k) for k in range(8)] == [0] * 8
    multi = LMConfig.moshi_7b()
    assert [multi.depformer_in_index(k) for k in range(8)] == list(range(8))


def test_text_head_size_and_special_token_ids():
    cfg = LMConfig.from_reference_kwargs({**MOSHI_7B_KWARGS, "text_card_out": 100})
    assert (cfg.text_out, cfg.text_card) == (100, 32000)
    assert LMConfig.moshi_7b().text_out == 32000
    assert (cfg.zero_token_id, cfg.ungenerated_token_id) == (-1, -2)
    assert cfg.to_reference_kwargs()["text_card_out"] == 100


@pytest.mark.parametrize("kw,match", [
    ({"activation": "relu"}, "`activation`"),
    ({"depformer_dim_feedforward": [64, 96]}, "different sizes"),
    ({"depformer_kv_cache": 1}, "unknown reference depformer kwargs: \\['depformer_kv_cache'\\]"),
    ({"depformer_num_heads": None}, None),
])
def test_reference_kwargs_this_port_cannot_honour_are_refused(kw, match):
    base = {k: v for k, v in MOSHI_7B_KWARGS.items()}
    if match is None:  # no depformer heads at all: a clear error too
        base.pop("depformer_num_heads")
        with pytest.raises(ValueError, match="need `depformer_num_heads`"):
            LMConfig.from_reference_kwargs(base)
        base.pop("num_layers")
        with pytest.raises(ValueError, match="need `num_layers`"):
            LMConfig.from_reference_kwargs(base)
        return
    with pytest.raises(ValueError, match=match):
        LMConfig.from_reference_kwargs({**base, **kw})


def test_equal_per_step_feedforward_lists_and_falsy_unsupported_options_are_accepted():
    cfg = LMConfig.from_reference_kwargs({**MOSHI_7B_KWARGS, "depformer_dim_feedforward": [96] * 8,
                                          "conditioners": {}, "depformer_norm": None, "lora": False})
    assert cfg.depth.dim_feedforward == 96


def test_configs_the_reference_cannot_express_are_refused_on_export():
    cfg = LMConfig.tiny()
    odd = dataclasses.replace(cfg.temporal, d_model=11, num_heads=1, dim_feedforward=15)  # 15/11 * 11 < 15
    with pytest.raises(ValueError, match="not expressible as hidden_scale"):
        dataclasses.replace(cfg, temporal=odd).to_reference_kwargs()
    with pytest.raises(ValueError, match="no weights_per_step"):
        dataclasses.replace(cfg, temporal=dataclasses.replace(cfg.temporal, weights_per_step=2)).to_reference_kwargs()
    with pytest.raises(ValueError, match="shares `causal` and `norm`"):
        dataclasses.replace(cfg, depth=dataclasses.replace(cfg.depth, causal=False)).to_reference_kwargs()


# Options a config.json may spell out at their reference default (the port implements only the default).
_SPELLED_OUT_DEFAULTS = {"demux_second_text_stream": False, "demux_second_stream": False, "norm_emb": False,
                         "bias_proj": False, "depformer_norm": None, "extra_heads_num_heads": 0,
                         "conditioners": None, "fuser": None, "condition_provider": None, "cross_attention": False,
                         "kv_repeat": 1, "depformer_kv_repeat": 1, "quantize": False, "lora": False,
                         "skip_self_attn": False, "depformer_skip_self_attn": False}


@pytest.mark.parity
def test_the_spelled_out_defaults_are_the_references():
    import inspect

    from moshi.models.lm import LMModel as RefLM
    from moshi.modules.transformer import StreamingTransformerLayer

    sig = {**inspect.signature(StreamingTransformerLayer.__init__).parameters,
           **inspect.signature(RefLM.__init__).parameters}
    for key, value in _SPELLED_OUT_DEFAULTS.items():
        if key in sig:
            assert sig[key].default == value, key


@pytest.mark.parametrize("key", sorted(_SPELLED_OUT_DEFAULTS))
def test_unsupported_options_at_their_default_are_accepted_and_any_other_value_refused(key):
    default = _SPELLED_OUT_DEFAULTS[key]
    assert LMConfig.from_reference_kwargs({**MOSHI_7B_KWARGS, key: default}) == LMConfig.moshi_7b()
    other = {bool: lambda d: not d, int: lambda d: d + 1, type(None): lambda d: {"x": {}}}[type(default)](default)
    with pytest.raises(ValueError, match=f"{key}={other!r} is not supported"):
        LMConfig.from_reference_kwargs({**MOSHI_7B_KWARGS, key: other})


def test_export_reproduces_the_released_7b_kwargs():
    exported = LMConfig.moshi_7b().to_reference_kwargs()
    # depformer_context is ignored on import (the reference forces it), the rest comes back value for value
    want = {k: v for k, v in MOSHI_7B_KWARGS.items() if k != "depformer_context"}
    assert {k: exported[k] for k in want} == want
    assert all(type(exported[k]) is type(v) for k, v in want.items() if isinstance(v, bool | str | list))


def test_sizes_are_integers_and_delays_a_tuple_whatever_the_input_types():
    cfg = LMConfig.from_reference_kwargs({**MOSHI_7B_KWARGS, "hidden_scale": 4.125, "depformer_dim_feedforward": 96.0})
    assert type(cfg.temporal.dim_feedforward) is int and cfg.temporal.dim_feedforward == 16896
    assert type(cfg.depth.dim_feedforward) is int and cfg.depth.dim_feedforward == 96
    listed = dataclasses.replace(cfg, delays=list(cfg.delays))
    assert listed.delays == cfg.delays and hash(listed) == hash(cfg)  # a jit static argument


def test_the_depformer_width_from_a_fractional_hidden_scale_is_an_integer():
    kwargs = {k: v for k, v in MOSHI_7B_KWARGS.items() if k != "depformer_dim_feedforward"}
    cfg = LMConfig.from_reference_kwargs({**kwargs, "hidden_scale": 4.125})  # the reference's int(4.125 * 1024)
    assert type(cfg.depth.dim_feedforward) is int and cfg.depth.dim_feedforward == 4224


def test_an_lm_predicting_one_codebook_has_a_depformer():
    cfg = LMConfig.from_reference_kwargs({**MOSHI_7B_KWARGS, "dep_q": 1})
    assert cfg.depth is not None and cfg.depth.weights_per_step == 1
    assert LMConfig.from_reference_kwargs({**MOSHI_7B_KWARGS, "dep_q": 0}).depth is None


def test_a_width_exports_when_the_reference_recomputes_it_exactly_else_it_is_refused():
    # The reference builds int(hidden_scale * dim): 58 / 56 * 56 is 58.000000000000004 in floating point, which it
    # truncates back to 58, so 58 exports; 61 / 56 * 56 truncates to 60, so 61 cannot.
    cfg = LMConfig.tiny()
    for ff, ok in ((58, True), (61, False)):
        odd = dataclasses.replace(cfg, temporal=dataclasses.replace(cfg.temporal, d_model=56, num_heads=8,
                                                                   dim_feedforward=ff))
        if ok:
            assert LMConfig.from_reference_kwargs(odd.to_reference_kwargs()) == odd
        else:
            with pytest.raises(ValueError, match="not expressible as hidden_scale"):
                odd.to_reference_kwargs()


def test_low_rank_depformer_embeddings_and_a_text_head_size_round_trip_through_reference_kwargs():
    cfg = LMConfig.from_reference_kwargs({**MOSHI_7B_KWARGS, "depformer_low_rank_embeddings": 128,
                                          "text_card_out": 4000})
    assert (cfg.depformer_low_rank_embeddings, cfg.text_card_out) == (128, 4000)
    assert LMConfig.from_reference_kwargs(cfg.to_reference_kwargs()) == cfg


def test_a_depformer_without_per_step_weights_keeps_a_ring_of_dep_q_steps():
    cfg = LMConfig.from_reference_kwargs({**MOSHI_7B_KWARGS, "depformer_weights_per_step": False})
    assert (cfg.depth.weights_per_step, cfg.depth.context, cfg.depth.cache_capacity) == (0, 8, 8)


def test_the_dataclass_defaults_are_the_reference_defaults():
    from_kwargs = LMConfig.from_reference_kwargs({"num_layers": 1, "depformer_num_heads": 2, "delays": [0] * 9})
    direct = LMConfig(text_card=from_kwargs.text_card, card=from_kwargs.card, n_q=8, dep_q=8, delays=[0] * 9,
                      temporal=from_kwargs.temporal, depth=from_kwargs.depth)
    assert direct == from_kwargs


def test_the_lora_settings_of_a_finetuned_repos_config_json_are_not_lm_options():
    conf = {**MOSHI_7B_KWARGS, "lora_rank": 128, "lora_scaling": 2.0, "lora_name": "lora.safetensors"}
    assert LMConfig.from_reference_kwargs(conf) == LMConfig.moshi_7b()
