"""Greedy streaming generation equals the reference `LMGen(lm, use_sampling=False)` built from the same
random weights: identical emitted frames, text and audio logits within 1e-5 (relative), past the attention
window, with a per-item reset in the middle. CPU, float32."""

from __future__ import annotations

import numpy as np
import pytest

from moshi_jax.lm import checkpoint as ck
from moshi_jax.lm import generate as G
from moshi_jax.lm.config import LMConfig
from moshi_jax.nn.sampling import SamplingConfig

# Moshi's structure (17 streams, delays [0, 0, 1 x7, 0, 1 x7], rms_norm_f32, SiLU gating, RoPE, multi-linear
# per-step depformer), shrunk; a 6-step attention window so 24 steps run well past it.
MOSHI_SMALL_KWARGS = {**LMConfig.tiny().to_reference_kwargs(), "text_card": 96, "card": 64, "dim": 32,
                      "num_heads": 2, "context": 6, "depformer_dim": 16, "depformer_dim_feedforward": 66}
# The reference's own test model: delays [0, 1, 2, 4] (max_delay 4), no user streams (n_q == dep_q), layer_norm,
# sin positions, low-rank depformer embeddings, weights_per_step_schedule [0, 1, 1], context 4.
TEST_LM_KWARGS = dict(delays=[0, 1, 2, 4], n_q=3, dep_q=3, card=32, text_card=48, dim=16, num_layers=2, num_heads=1,
                      hidden_scale=1, depformer_dim=16, depformer_multi_linear=True, depformer_weights_per_step=True,
                      depformer_weights_per_step_schedule=[0, 1, 1], depformer_low_rank_embeddings=8,
                      depformer_num_heads=1, depformer_gating="silu", context=4)
# (kwargs, batch, steps, reset item 0 after this many steps or None)
CASES = {"moshi_small": (MOSHI_SMALL_KWARGS, 2, 24, 13), "test_lm": (TEST_LM_KWARGS, 2, 20, None)}


def _reference_generation(kwargs: dict, user: np.ndarray, reset_at: int | None, seed: int = 0):
    """Run the reference LMGen greedily; returns per call (frame [B, 1+dep_q] or None, text logits [B, V],
    audio logits [B, dep_q, card])."""
    import torch
    from moshi.models import loaders
    from moshi.models.lm import LMGen

    torch.manual_seed(seed)
    lm = loaders.get_moshi_lm(None, lm_kwargs=dict(kwargs), dtype=torch.float32)
    lm.eval()
    text_logits, audio_logits = [], []
    forward_depformer = lm.forward_depformer

    def recording_forward_depformer(*args, **kw):  # capture each depth step's logits [B, 1, 1, card]
        out = forward_depformer(*args, **kw)
        audio_logits.append(out[:, 0, 0].float().numpy().copy())
        return out

    lm.forward_depformer = recording_forward_depformer
    gen = LMGen(lm, use_sampling=False, on_text_logits_hook=lambda t: text_logits.append(t[:, 0, 0].numpy().copy()))
    B, _, T = user.shape
    frames = []
    with torch.no_grad(), gen.streaming(B):
        for t in range(T):
            if t == reset_at:
                gen.reset_streaming(torch.tensor([True] + [False] * (B - 1)))
            out = gen.step(torch.from_numpy(user[:, :, t: t + 1].astype(np.int64)))
            frames.append(None if out is None else out[:, :, 0].numpy())
    dep_q = lm.dep_q
    audio = np.stack(audio_logits).reshape(T, dep_q, B, -1).transpose(0, 2, 1, 3)
    return lm.state_dict(), frames, np.stack(text_logits), audio


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_streaming_generation_equals_reference_lmgen(name):
    kwargs, B, T, reset_at = CASES[name]
    cfg = LMConfig.from_reference_kwargs(kwargs)
    user = np.random.default_rng(0).integers(0, cfg.card, (B, cfg.n_q - cfg.dep_q, T)).astype(np.int32)
    sd, ref_frames, ref_text, ref_audio = _reference_generation(kwargs, user, reset_at)
    params = ck.load_reference(sd, cfg)

    greedy = SamplingConfig.greedy()
    state = G.init_gen_state(cfg, B)
    compared = 0
    for t in range(T):
        if t == reset_at:
            state = G.reset(state, np.array([True] + [False] * (B - 1)))
        state, out = G.step(params, state, user[:, :, t], None, cfg=cfg, sampling=greedy, return_logits=True)
        assert _rel(out.text_logits, ref_text[t]) < 1e-5, (t, _rel(out.text_logits, ref_text[t]))
        assert _rel(out.audio_logits, ref_audio[t]) < 1e-5, (t, _rel(out.audio_logits, ref_audio[t]))
        valid, frame = np.asarray(out.valid), np.asarray(out.frame)
        ref = ref_frames[t]
        if ref is None:  # the reference returns nothing for the whole batch for max_delay calls after a reset
            assert reset_at is not None or not valid.any()
            if reset_at is not None and t >= reset_at:
                assert not valid[0]
            continue
        ref_valid = (ref != -2).all(axis=1)
        np.testing.assert_array_equal(valid, ref_valid)
        np.testing.assert_array_equal(frame[valid], ref[ref_valid], err_msg=f"call {t}")
        compared += int(valid.sum())
    # the frames of every call after warm-up were compared (not a vacuous pass)
    warm = cfg.max_delay
    expected = B * (T - warm) - (0 if reset_at is None else B * warm)
    assert compared == expected, (compared, expected)
