"""Memory of the compiled engine step (XLA's memory analysis, CPU compile): the donated state is updated in place
(aliased to the outputs) and each extra session costs at most 1.25x its own state; streaming params can be
prepared without keeping the raw transformer stacks alive."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moshi_jax.engine.engine import Engine, EngineConfig, preset_configs, random_lm_params
from moshi_jax.lm import model as lm_model
from moshi_jax.lm.config import TINY_KWARGS, LMConfig
from moshi_jax.mimi.config import MimiConfig
from moshi_jax.mimi.model import MimiCodec


def _mid_engine() -> Engine:
    """bf16 LM whose KV rings dominate the state: 12 layers, dim 64, a 1024-frame context (3 MiB per session)."""
    mimi = MimiConfig.tiny()
    lm = LMConfig.from_reference_kwargs({**TINY_KWARGS, "dim": 64, "num_heads": 4, "num_layers": 12,
                                         "context": 1024, "depformer_num_layers": 1, "card": mimi.bins})
    return Engine(mimi, lm.with_dtypes("bfloat16", "bfloat16"), EngineConfig())


def _compiled(engine: Engine, B: int):
    import flax.linen as nn

    cfg = engine.lm_cfg
    raw = jax.eval_shape(lambda k: nn.unbox(lm_model.init_params(cfg, k)), jax.random.PRNGKey(0))
    params = {"mimi": jax.eval_shape(lambda k: MimiCodec(engine.mimi_cfg).init(k), jax.random.PRNGKey(1)),
              "lm": jax.eval_shape(lambda p: lm_model.prepare_streaming_params(p, cfg), raw)}
    state = jax.eval_shape(lambda: engine.init_state(B))
    pcm = jax.ShapeDtypeStruct((B, engine.frame_size), jnp.float32)
    active = jax.ShapeDtypeStruct((B,), jnp.bool_)
    compiled = engine.step_donated.lower(params, state, pcm, active).compile()
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    return compiled, state_bytes


def _footprint(m) -> int:
    """Bytes the step needs: arguments + outputs not aliased to an argument + temporaries."""
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def test_each_extra_session_costs_at_most_1_25x_its_state_and_the_state_is_aliased():
    engine = _mid_engine()
    (c2, s2), (c4, s4) = _compiled(engine, 2), _compiled(engine, 4)
    m2, m4 = c2.memory_analysis(), c4.memory_analysis()
    for m, s in ((m2, s2), (m4, s4)):
        # every donated state buffer is reused for the new state: the aliased bytes are the whole state
        assert m.alias_size_in_bytes >= s, (m.alias_size_in_bytes, s)
    per_session_state = (s4 - s2) / 2
    per_session_cost = (_footprint(m4) - _footprint(m2)) / 2
    assert per_session_state > 2.5 * 2**20  # the KV rings dominate
    assert per_session_cost <= 1.25 * per_session_state, (per_session_cost / per_session_state, m2, m4)
    # XLA records the aliasing in the executable's HLO too
    assert "input_output_alias" in c4.as_text()


def test_the_whole_ring_scatter_path_would_copy_the_state_on_cpu():
    """Why the CPU path writes the ring by update slices: with the portable choices XLA:CPU's temporaries grow by
    about twice the state per session (float32 copies of every ring), which is what the test above rules out."""
    from moshi_jax.nn import backend

    mimi = MimiConfig.tiny()
    lm = LMConfig.from_reference_kwargs({**TINY_KWARGS, "num_layers": 2, "context": 512, "card": mimi.bins})
    lm = lm.with_dtypes("bfloat16", "bfloat16")
    temps = {}
    for which in ("cpu", "portable"):
        with backend.override(which):
            engine = Engine(mimi, lm, EngineConfig())  # fresh jitted functions: traced with these choices
            (c2, s2), (c4, s4) = _compiled(engine, 2), _compiled(engine, 4)
        temps[which] = (c4.memory_analysis().temp_size_in_bytes - c2.memory_analysis().temp_size_in_bytes) / (s4 - s2)
    assert temps["portable"] > 1.5 and temps["cpu"] < 1.2, temps


def test_prepare_params_consume_frees_the_raw_stacks_and_gives_the_same_params():
    mimi_cfg, lm_cfg = preset_configs("tiny")
    engine = Engine(mimi_cfg, lm_cfg, EngineConfig())
    raw = {"mimi": MimiCodec(mimi_cfg).init(jax.random.PRNGKey(1)), "lm": random_lm_params(lm_cfg, 0)}
    kept = engine.prepare_params(raw)
    stacked = jax.tree.leaves(raw["lm"]["transformer"]) + jax.tree.leaves(raw["lm"]["depformer"])
    consumed = engine.prepare_params(raw, consume=True)
    assert all(a.is_deleted() for a in stacked)
    assert not raw["lm"]["emb"].is_deleted()  # top-level leaves are shared with the prepared params
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(consumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state = engine.init_state(1)
    pcm = np.zeros((1, engine.frame_size), np.float32)
    _, o1 = engine.step(kept, state, pcm, np.ones(1, bool))
    _, o2 = engine.step(consumed, state, pcm, np.ones(1, bool))
    np.testing.assert_array_equal(np.asarray(o1.codes), np.asarray(o2.codes))


def test_streaming_outputs_do_not_depend_on_the_kernel_choices():
    """The engine's frames (tokens and audio) with the CPU tricks equal the portable path's, bit for bit over a
    run that fills past the first ring prefixes (greedy sampling, float32)."""
    from moshi_jax.nn import backend

    mimi_cfg, lm_cfg = preset_configs("tiny")
    lm_cfg = dataclasses.replace(lm_cfg, temporal=dataclasses.replace(lm_cfg.temporal, context=96))
    cfg = EngineConfig(sampling=dataclasses.replace(EngineConfig().sampling, use_sampling=False))
    params = {"mimi": MimiCodec(mimi_cfg).init(jax.random.PRNGKey(1)), "lm": random_lm_params(lm_cfg, 0)}
    pcm = (0.1 * np.random.default_rng(0).standard_normal((70, 2, mimi_cfg.frame_size))).astype(np.float32)
    outs = {}
    for which in ("cpu", "portable"):
        with backend.override(which):
            engine = Engine(mimi_cfg, lm_cfg, cfg)
            p = engine.prepare_params(params)
            state, frames = engine.init_state(2), []
            for x in pcm:
                state, o = engine.step_donated(p, state, x, np.ones(2, bool))
                frames.append((np.asarray(o.text_token), np.asarray(o.codes), np.asarray(o.pcm)))
        outs[which] = frames
    for (ta, ca, pa), (tb, cb, pb) in zip(outs["cpu"], outs["portable"], strict=True):
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_array_equal(ca, cb)
        np.testing.assert_allclose(pa, pb, rtol=1e-5, atol=1e-6)
