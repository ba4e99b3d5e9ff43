"""The engine's streaming parameter layout (`Engine.prepare_params`, used by the CLI, the server and the
benchmarks) changes speed, not results: frames are identical to those from the raw parameter tree."""

from __future__ import annotations

import jax
import numpy as np

from moshi_jax.engine.engine import Engine, EngineConfig, preset_configs, random_lm_params
from moshi_jax.lm.model import StreamingParams

B, FS, FRAMES = 2, 1920, 6


def test_prepared_params_give_the_same_frames_as_raw_params():
    mimi_cfg, lm_cfg = preset_configs("tiny")
    engine = Engine(mimi_cfg, lm_cfg, EngineConfig(mode="dialogue"))  # sampling on: same keys, same draws
    raw = {"mimi": engine.codec.init(jax.random.PRNGKey(1)), "lm": random_lm_params(lm_cfg, 2)}
    prepared = engine.prepare_params(raw)
    assert isinstance(prepared["lm"], StreamingParams)
    pcm = (0.1 * np.random.default_rng(0).standard_normal((FRAMES, B, FS))).astype(np.float32)
    active = np.ones(B, bool)
    outs = {}
    for name, params in (("raw", raw), ("prepared", prepared)):
        state, frames = engine.init_state(B), []
        for t in range(FRAMES):
            state, out = engine.step(params, state, pcm[t], active)
            frames.append(jax.device_get(out))
        outs[name] = frames
    assert any(bool(o.valid.any()) for o in outs["raw"])  # the comparison covers emitted frames
    for a, b in zip(outs["raw"], outs["prepared"], strict=True):
        np.testing.assert_array_equal(a.valid, b.valid)
        np.testing.assert_array_equal(a.text_token, b.text_token)
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_allclose(a.pcm, b.pcm, rtol=1e-5, atol=1e-6)
