"""Streaming generation with the int8 KV cache and int8 weights against the float LM on a tiny model: teacher-forced
to the float run's tokens, the logits stay within a stated bound and the greedy tokens agree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moshi_jax.engine.engine import random_lm_params
from moshi_jax.lm import generate as gen
from moshi_jax.lm.config import LMConfig
from moshi_jax.nn.sampling import SamplingConfig


def test_int8_kv_and_weights_keep_greedy_tokens_and_logits_close_to_the_float_lm_over_streamed_frames():
    cfg = LMConfig.tiny()
    raw = random_lm_params(cfg, 0)
    greedy = SamplingConfig(use_sampling=False)
    B, T = 2, 24
    user = jnp.asarray(np.random.default_rng(0).integers(0, cfg.card, (B, cfg.n_q - cfg.dep_q, T)), jnp.int32)
    _, ref = gen.run(gen.prepare_streaming_params(raw, cfg), gen.init_gen_state(cfg, B), user, None, cfg=cfg,
                     sampling=greedy, return_logits=True)
    params = gen.prepare_streaming_params(raw, cfg, weight_dtype="int8")
    state = gen.init_gen_state(cfg, B, kv_cache_dtype="int8")
    assert state.temporal.layers[0].keys.dtype == jnp.int8
    _, out = gen.run(params, state, user, None, cfg=cfg, sampling=greedy, forced_text=ref.sampled_text,
                     forced_audio=ref.sampled_audio, return_logits=True)
    for name in ("text_logits", "audio_logits"):
        a, b = np.asarray(getattr(ref, name)), np.asarray(getattr(out, name))
        drift = np.abs(a - b)
        assert drift.max() <= 0.15 * a.std() and drift.mean() <= 0.02 * a.std(), (name, drift.max() / a.std())
        assert drift.max() > 0  # quantized: not the float computation
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9, name
    kl = jax.nn.softmax(ref.text_logits) * (jax.nn.log_softmax(ref.text_logits) - jax.nn.log_softmax(out.text_logits))
    assert float(kl.sum(-1).mean()) < 1e-3
