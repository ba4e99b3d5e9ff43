"""Per-session settings from the websocket URL's query string: parsing, ranges, errors naming the parameter."""

from __future__ import annotations

import numpy as np
import pytest

from moshi_jax.engine.session import LIMITS, SessionSettings, SettingsError, parse_query
from moshi_jax.nn.sampling import SamplingConfig, seed_key

REFERENCE_CLIENT_QUERY = [  # what the reference web client sends by default
    ("text_temperature", "0.7"), ("text_topk", "25"), ("audio_temperature", "0.8"), ("audio_topk", "250"),
    ("pad_mult", "0"), ("text_seed", "123"), ("audio_seed", "456"), ("repetition_penalty", "1"),
    ("repetition_penalty_context", "64")]


def test_an_empty_query_gives_the_server_defaults():
    defaults = SessionSettings.from_sampling(SamplingConfig(temp=0.6, top_k=100, temp_text=0.5, top_k_text=10), 1.5)
    s = parse_query([], defaults)
    assert (s.text_temperature, s.text_topk, s.audio_temperature, s.audio_topk, s.pad_mult) == (0.5, 10, 0.6, 100, 1.5)
    assert s.text_seed is None and s.ignored == ()


def test_greedy_engine_defaults_are_temperature_zero():
    s = SessionSettings.from_sampling(SamplingConfig.greedy())
    assert s.text_temperature == 0.0 and s.audio_temperature == 0.0


def test_the_reference_clients_query_is_read_exactly():
    s = parse_query(REFERENCE_CLIENT_QUERY)
    assert s.as_dict() == {"text_temperature": 0.7, "text_topk": 25, "audio_temperature": 0.8, "audio_topk": 250,
                           "pad_mult": 0.0, "text_seed": 123, "audio_seed": 456, "repetition_penalty": 1.0,
                           "repetition_penalty_context": 64}
    assert isinstance(s.text_topk, int) and isinstance(s.text_seed, int)


@pytest.mark.parametrize("name, value", [
    ("text_temperature", "-0.1"), ("text_temperature", "11"), ("audio_temperature", "nan"),
    ("audio_temperature", "inf"), ("text_topk", "-1"), ("audio_topk", "2.5"), ("audio_topk", "abc"),
    ("pad_mult", "21"), ("pad_mult", ""), ("text_seed", "-3"), ("audio_seed", str(1 << 64)),
    ("repetition_penalty", "0"), ("repetition_penalty", "11"), ("repetition_penalty_context", "257"),
    ("repetition_penalty_context", "1e9"),
])
def test_out_of_range_or_malformed_values_are_refused_naming_the_parameter(name, value):
    with pytest.raises(SettingsError, match=f"bad setting {name}="):
        parse_query([(name, value)])


def test_a_repeated_parameter_is_refused():
    with pytest.raises(SettingsError, match="text_topk: given more than once"):
        parse_query([("text_topk", "5"), ("text_topk", "6")])


def test_every_bound_is_inclusive():
    for name, (kind, lo, hi) in LIMITS.items():
        for v in (lo, hi):
            text = str(int(v)) if kind is int else repr(float(v))
            assert getattr(parse_query([(name, text)]), name) == v


def test_unknown_parameters_are_ignored_and_reported():
    s = parse_query([("email", "x@y"), ("text_topk", "7")])
    assert s.text_topk == 7 and s.ignored == ("email",)


def test_64_bit_seeds_are_exact_and_map_to_the_threefry_key():
    big = (1 << 64) - 1
    s = parse_query([("text_seed", str(big)), ("audio_seed", "7")])
    assert s.text_seed == big
    values = s.engine_values()
    assert values["text_seed_key"].tolist() == [0xFFFFFFFF, 0xFFFFFFFF]
    import jax

    np.testing.assert_array_equal(values["audio_seed_key"], np.asarray(jax.random.PRNGKey(7)))
    assert seed_key(5 << 32 | 9).tolist() == [5, 9]


def test_missing_seeds_are_drawn_given_ones_are_kept():
    s = parse_query([("text_seed", "11")]).with_seeds()
    assert s.text_seed == 11 and isinstance(s.audio_seed, int) and 0 <= s.audio_seed < 1 << 32
    with pytest.raises(ValueError, match="seeds are not set"):
        parse_query([]).engine_values()


def test_engine_values_name_the_engine_fields():
    v = parse_query(REFERENCE_CLIENT_QUERY).engine_values()
    assert v["text_temp"] == 0.7 and v["text_top_k"] == 25 and v["audio_temp"] == 0.8 and v["audio_top_k"] == 250
    assert v["pad_bias"] == 0.0 and v["repetition_penalty"] == 1.0 and v["repetition_context"] == 64
