"""The engine's int8 serving options (EngineConfig.kv_cache_dtype / weight_dtype): the compiled step's memory
(XLA's memory analysis, CPU compile) shows the per-session state and each extra session's cost about halved by
the int8 KV ring, the donated int8 state stays aliased, int8 weights halve the prepared transformer layers
(quantized while the raw stacks are consumed), and bad option values are refused."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.engine.engine import Engine, EngineConfig, preset_configs, random_lm_params
from moshi_jax.lm import model as lm_model
from moshi_jax.lm.config import TINY_KWARGS, LMConfig
from moshi_jax.mimi.config import MimiConfig
from moshi_jax.mimi.model import MimiCodec
from moshi_jax.nn import quant


def _mid_lm(mimi: MimiConfig) -> LMConfig:
    """bf16 LM whose KV rings dominate the state: 8 layers, head_dim 64, a 512-frame context (4 MiB / session)."""
    lm = LMConfig.from_reference_kwargs({**TINY_KWARGS, "dim": 256, "num_heads": 4, "num_layers": 8,
                                         "context": 512, "depformer_num_layers": 1, "card": mimi.bins})
    return lm.with_dtypes("bfloat16", "bfloat16")


def _footprint(m) -> int:
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def _per_session(engine: Engine) -> tuple[float, float]:
    """(state bytes, compiled-step bytes) per extra session, from compiles at batch 2 and 4."""
    import flax.linen as nn

    cfg = engine.lm_cfg
    raw = jax.eval_shape(lambda k: nn.unbox(lm_model.init_params(cfg, k)), jax.random.PRNGKey(0))
    params = {"mimi": jax.eval_shape(lambda k: MimiCodec(engine.mimi_cfg).init(k), jax.random.PRNGKey(1)),
              "lm": jax.eval_shape(lambda p: lm_model.prepare_streaming_params(
                  p, cfg, weight_dtype=engine.cfg.weight_dtype), raw)}
    res = {}
    for B in (2, 4):
        state = jax.eval_shape(lambda B=B: engine.init_state(B))
        pcm = jax.ShapeDtypeStruct((B, engine.frame_size), jnp.float32)
        active = jax.ShapeDtypeStruct((B,), jnp.bool_)
        compiled = engine.step_donated.lower(params, state, pcm, active).compile()
        m = compiled.memory_analysis()
        state_bytes = quant.nbytes(state)
        assert m.alias_size_in_bytes >= state_bytes, (m.alias_size_in_bytes, state_bytes)  # donated state reused
        res[B] = (state_bytes, _footprint(m))
    return (res[4][0] - res[2][0]) / 2, (res[4][1] - res[2][1]) / 2


def _state_per_session(engine: Engine) -> float:
    return (quant.nbytes(jax.eval_shape(lambda: engine.init_state(4)))
            - quant.nbytes(jax.eval_shape(lambda: engine.init_state(2)))) / 2


def test_an_int8_kv_cache_halves_each_sessions_state_and_its_cost_in_the_compiled_step():
    """A bf16 session costs at least its state (1 + 2/L of it on CPU: tests/engine/test_engine_memory.py); an
    int8 session's state is about half of that and its whole cost in the compiled step stays well under it."""
    mimi = MimiConfig.tiny()
    lm = _mid_lm(mimi)
    state_bf16 = _state_per_session(Engine(mimi, lm, EngineConfig()))
    state_int8, cost_int8 = _per_session(Engine(mimi, lm, EngineConfig(kv_cache_dtype="int8", weight_dtype="int8")))
    assert state_bf16 > 4 * 2**20  # the KV rings dominate
    # int8 entries + one float32 scale per (position, head) (4 / head_dim 64 bytes more per entry)
    assert state_int8 <= 0.55 * state_bf16, state_int8 / state_bf16
    # XLA:CPU still converts one layer's K and V to float32 for its dot: about 1 + 4/L of the int8 state
    L = lm.temporal.num_layers
    assert cost_int8 <= (1 + 4 / L + 0.1) * state_int8, cost_int8 / state_int8
    assert cost_int8 <= 0.85 * state_bf16, (cost_int8 / state_bf16, cost_int8 / state_int8)


def test_int8_weights_halve_the_prepared_layers_and_consuming_the_raw_stacks_gives_the_same_params():
    mimi_cfg, lm_cfg = preset_configs("tiny")
    lm_cfg = lm_cfg.with_dtypes("bfloat16", "bfloat16")
    engine = Engine(mimi_cfg, lm_cfg, EngineConfig(weight_dtype="int8"))
    raw = {"mimi": MimiCodec(mimi_cfg).init(jax.random.PRNGKey(1)), "lm": random_lm_params(lm_cfg, 0)}
    bf16 = lm_model.prepare_streaming_params(raw["lm"], lm_cfg)
    kept = engine.prepare_params(raw)
    kernels = [x for x in jax.tree.leaves(kept["lm"].temporal_layers, is_leaf=lambda n: isinstance(
        n, quant.QuantizedWeight)) if isinstance(x, quant.QuantizedWeight)]
    assert len(kernels) == 4 * lm_cfg.temporal.num_layers  # in / out projections, MLP in / out of every layer
    for part in ("temporal_layers", "depth_steps"):
        q, b = quant.nbytes(getattr(kept["lm"], part)), quant.nbytes(getattr(bf16, part))
        assert q < 0.7 * b, (part, q / b)  # int8 kernels + float32 per-channel scales (a large share at dim 64)
    stacked = jax.tree.leaves(raw["lm"]["transformer"]) + jax.tree.leaves(raw["lm"]["depformer"])
    consumed = engine.prepare_params(raw, consume=True)
    assert all(a.is_deleted() for a in stacked)
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(consumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # raw params in the step are quantized there: the same frames as the prepared int8 params
    raw = {"mimi": raw["mimi"], "lm": random_lm_params(lm_cfg, 0)}
    state, pcm = engine.init_state(1), np.zeros((1, engine.frame_size), np.float32)
    _, o1 = engine.step(kept, state, pcm, np.ones(1, bool))
    _, o2 = engine.step(raw, state, pcm, np.ones(1, bool))
    np.testing.assert_array_equal(np.asarray(o1.codes), np.asarray(o2.codes))


def test_an_int8_engine_state_is_int8_survives_reset_and_pausing():
    mimi_cfg, lm_cfg = preset_configs("tiny")
    greedy = dataclasses.replace(EngineConfig().sampling, use_sampling=False)
    engine = Engine(mimi_cfg, lm_cfg, EngineConfig(sampling=greedy, kv_cache_dtype="int8"))
    params = engine.prepare_params({"mimi": MimiCodec(mimi_cfg).init(jax.random.PRNGKey(1)),
                                    "lm": random_lm_params(lm_cfg, 0)})
    state = engine.init_state(2)
    ring = state.lm.temporal.layers[0]
    assert ring.keys.dtype == jnp.int8 and ring.key_scales is not None
    pcm = (0.1 * np.random.default_rng(0).standard_normal((6, 2, engine.frame_size))).astype(np.float32)
    for i, x in enumerate(pcm):
        state, out = engine.step_donated(params, state, x, np.array([True, i % 2 == 0]))  # item 1 paused half
    ring = state.lm.temporal.layers[0]
    assert ring.keys.dtype == jnp.int8 and float(jnp.abs(ring.key_scales).max()) > 0
    np.testing.assert_array_equal(np.asarray(state.lm.temporal.offset), [6, 3])
    state = engine.reset(state, np.array([True, False]))
    np.testing.assert_array_equal(np.asarray(state.lm.temporal.offset), [0, 3])
    assert state.lm.temporal.layers[0].keys.dtype == jnp.int8


@pytest.mark.parametrize("field,value", [("kv_cache_dtype", "int4"), ("weight_dtype", "bfloat16"),
                                         ("kv_cache_dtype", jnp.int8)])
def test_unknown_int8_option_values_are_refused_with_the_allowed_ones(field, value):
    with pytest.raises(ValueError, match=rf"EngineConfig.{field} must be one of \(None, 'int8'\)"):
        EngineConfig(**{field: value})


def test_chat_cli_serves_with_int8_kv_and_weights(tmp_path):
    import soundfile as sf

    from moshi_jax.audio import save_audio
    from moshi_jax.cli import main
    from moshi_jax.data.speech_synth import builtin_sample

    wav = np.asarray(builtin_sample(), np.float32)[:12_000]  # 0.5 s
    path = save_audio(tmp_path / "user.wav", wav, 24_000)
    out = tmp_path / "moshi.wav"
    assert main(["chat", "-i", str(path), "-o", str(out), "--preset", "tiny", "--int8", "both"]) == 0
    audio, _ = sf.read(out)
    assert audio.size >= wav.size and np.abs(audio[1920:]).max() > 0
    with pytest.raises(SystemExit):
        main(["chat", "-i", str(path), "-o", str(out), "--int8", "int4"])
