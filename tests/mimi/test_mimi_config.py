"""MimiConfig: the default is the released Mimi (checked against the reference's own config), derived
sizes, and clear errors for inconsistent configs."""

import pytest

from moshi_jax.mimi.checkpoint import reference_config
from moshi_jax.mimi.config import MimiConfig


def test_default_is_the_released_configuration():
    cfg = MimiConfig()
    assert (cfg.sample_rate, cfg.frame_rate, cfg.frame_size, cfg.hop_length) == (24_000, 12.5, 1920, 960)
    assert (cfg.encoder_frame_rate, cfg.resample_stride) == (25.0, 2)
    assert (cfg.n_q, cfg.n_q_semantic, cfg.n_q_acoustic, cfg.bins, cfg.num_codebooks) == (32, 1, 31, 2048, 8)
    t = cfg.transformer
    assert (t.d_model, t.num_heads, t.num_layers, t.dim_feedforward, t.context) == (512, 8, 8, 2048, 250)
    assert (t.norm, t.gating, t.layer_scale, t.positional_embedding) == ("layer_norm", "none", 0.01, "rope")


@pytest.mark.parity
def test_reference_config_of_the_default_equals_the_reference_loader_config():
    from moshi.models import loaders

    ours = reference_config(MimiConfig())
    theirs = loaders._mimi_config
    assert {k: ours[k] for k in ("sample_rate", "channels", "frame_rate")} == \
        {k: theirs[k] for k in ("sample_rate", "channels", "frame_rate")}
    for part in ("seanet", "quantizer", "transformer"):
        common = set(ours[part]) & set(theirs[part])
        assert {k: ours[part][k] for k in common} == {k: theirs[part][k] for k in common}, part
        assert set(theirs[part]) <= set(ours[part]), part  # nothing of theirs left out


def test_tiny_keeps_the_rates_and_frame_size():
    tiny = MimiConfig.tiny()
    assert (tiny.frame_size, tiny.resample_stride, tiny.n_q) == (1920, 2, 32)
    assert tiny.dimension < 64 and tiny.context < 10


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_codebooks=0), "num_codebooks 0 must be in 1..32"),
    (dict(num_codebooks=33), "num_codebooks 33 must be in 1..32"),
    (dict(n_q_semantic=32), "n_q_semantic"),
    (dict(frame_rate=10.0), "not an integer multiple"),
    (dict(ratios=(8, 6, 5, 7)), "not a multiple of the SEANet hop"),
    (dict(num_heads=7), "not divisible by num_heads"),
    (dict(channels=2), "only mono"),
])
def test_inconsistent_configs_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MimiConfig(**kwargs)


def test_check_num_codebooks():
    cfg = MimiConfig()
    assert cfg.check_num_codebooks(None) == 8 and cfg.check_num_codebooks(32) == 32
    with pytest.raises(ValueError, match="num_codebooks must be in 1..32, got 40"):
        cfg.check_num_codebooks(40)
