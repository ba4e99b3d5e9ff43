"""The Moshi LM forward equals the reference `moshi.models.lm.LMModel` (float32, random weights), and the
pieces generation uses (`temporal` with a KV state, `depth_step` with a traced k) equal the one-shot forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.lm import checkpoint as ck
from moshi_jax.lm import delays as dl
from moshi_jax.lm.config import LMConfig
from moshi_jax.lm.model import LMModel, forward, init_depth_state, init_temporal_state, logits_drift

# The reference's own test model (moshi/tests/test_lm.py): layer_norm, plain gelu MLP, sin positions, low-rank
# depformer embeddings, weights_per_step_schedule [0, 1, 1], delays [0, 1, 2, 4], context 4.
TEST_LM_KWARGS = dict(delays=[0, 1, 2, 4], n_q=3, dep_q=3, card=32, text_card=48, dim=16, num_layers=2, num_heads=1,
                      hidden_scale=1, depformer_dim=16, depformer_multi_linear=True, depformer_weights_per_step=True,
                      depformer_weights_per_step_schedule=[0, 1, 1], depformer_low_rank_embeddings=8,
                      depformer_num_heads=1, depformer_gating="silu", context=4)
# Moshi's structure (rms_norm_f32, SiLU gating, RoPE, multi-linear, 8 per-step weight sets, 17 streams), shrunk.
MOSHI_SMALL_KWARGS = {**LMConfig.tiny().to_reference_kwargs(), "text_card": 96, "card": 64, "dim": 32,
                      "num_heads": 2, "context": 5, "depformer_dim": 16, "depformer_dim_feedforward": 66}
CONFIGS = {"moshi_small": MOSHI_SMALL_KWARGS, "test_lm": TEST_LM_KWARGS}
jit_forward = jax.jit(forward, static_argnums=2)


def build_reference(kwargs: dict, seed: int = 0):
    import torch
    from moshi.models import loaders

    torch.manual_seed(seed)
    return loaders.get_moshi_lm(None, lm_kwargs=dict(kwargs), dtype=torch.float32)


def random_codes(cfg: LMConfig, B: int, T: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = np.concatenate([rng.integers(0, cfg.text_card, (B, 1, T)), rng.integers(0, cfg.card, (B, cfg.n_q, T))], 1)
    codes[0, 2, 1] = -1  # a "no token" input (zero embedding, masked target)
    codes[-1, 0, T - 2] = -1
    return codes.astype(np.int64)


def reference_outputs(ref, codes: np.ndarray):
    import torch

    with torch.no_grad():
        out = ref(torch.from_numpy(codes))
    return (out.text_logits.numpy(), out.text_mask.numpy(), out.logits.numpy(), out.mask.numpy())


def assert_outputs_match(ref_out, out, rtol: float = 1e-5) -> None:
    text, text_mask, audio, audio_mask = ref_out
    np.testing.assert_array_equal(np.asarray(out.text_mask), text_mask)
    np.testing.assert_array_equal(np.asarray(out.audio_mask), audio_mask)
    for r, j, m in ((text, out.text_logits, text_mask), (audio, out.audio_logits, audio_mask)):
        r, j = r[m], np.asarray(j)[m]
        rel = np.abs(r - j).max() / np.abs(r).max()
        assert rel <= rtol, f"relative error {rel:.2e}"


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    kwargs = CONFIGS[request.param]
    cfg = LMConfig.from_reference_kwargs(kwargs)
    ref = build_reference(kwargs)
    params = ck.load_reference(ref.state_dict(), cfg)
    return cfg, ref, params


@pytest.mark.parity
def test_forward_logits_and_masks_equal_reference(case):
    cfg, ref, params = case
    codes = random_codes(cfg, B=2, T=9)
    out = jit_forward(params, jnp.asarray(codes, jnp.int32), cfg)
    assert out.text_logits.shape == (2, 1, 9, cfg.text_card) and out.audio_logits.shape == (2, cfg.dep_q, 9, cfg.card)
    assert out.text_logits.dtype == jnp.float32 and out.audio_logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(out.audio_logits)).all()  # masked positions hold finite values, not NaN
    assert_outputs_match(reference_outputs(ref, codes), out)


@pytest.mark.parity
def test_forward_longer_than_context_equals_reference():
    # 20 steps with a 5-step attention window: the sliding-window mask of the training forward.
    cfg = LMConfig.from_reference_kwargs(MOSHI_SMALL_KWARGS)
    ref = build_reference(MOSHI_SMALL_KWARGS, seed=1)
    params = ck.load_reference(ref.state_dict(), cfg)
    codes = random_codes(cfg, B=1, T=20, seed=3)
    assert_outputs_match(reference_outputs(ref, codes), jit_forward(params, jnp.asarray(codes, jnp.int32), cfg))


def test_temporal_streaming_one_step_at_a_time_equals_one_shot(case):
    cfg, _, params = case
    model = LMModel(cfg)
    codes = jnp.asarray(random_codes(cfg, B=2, T=8), jnp.int32)
    initial = dl.initial_tokens(cfg.text_initial_token_id, cfg.initial_token_id, cfg.n_q)
    tokens = dl.model_input(codes, cfg.delays, initial)[:, :, :-1]
    hidden, text, _ = model.apply({"params": params}, tokens, None, method="temporal")
    step = jax.jit(lambda p, tok, s: model.apply({"params": p}, tok, s, method="temporal"))
    state = init_temporal_state(cfg, 2)
    hs, ts = [], []
    for t in range(tokens.shape[2]):
        h, tl, state = step(params, tokens[:, :, t:t + 1], state)
        hs.append(h)
        ts.append(tl)
    np.testing.assert_allclose(jnp.concatenate(hs, 1), hidden, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.concatenate(ts, 1), text, rtol=1e-5, atol=1e-5)
    assert hidden.shape == (2, 8, cfg.dim) and text.shape == (2, 8, cfg.text_card)


def test_depth_step_in_a_scan_with_traced_k_equals_teacher_forced_depth(case):
    cfg, _, params = case
    model = LMModel(cfg)
    B = 3
    key = jax.random.PRNGKey(0)
    hidden = jax.random.normal(key, (B, 1, cfg.dim))
    rng = np.random.default_rng(1)
    tokens = np.concatenate([rng.integers(0, cfg.text_card, (B, 1, 1)),
                             rng.integers(0, cfg.card, (B, cfg.dep_q - 1, 1))], 1)
    tokens[1, 1, 0] = -1
    tokens = jnp.asarray(tokens, jnp.int32)
    want = model.apply({"params": params}, hidden, tokens, method="depth")[:, :, 0]  # [B, dep_q, card]

    @jax.jit
    def run(p, h, toks):
        def body(state, k):
            logits, state = model.apply({"params": p}, h, toks[:, k], k, state, method="depth_step")
            return state, logits

        _, logits = jax.lax.scan(body, init_depth_state(cfg, B), jnp.arange(cfg.dep_q, dtype=jnp.int32))
        return logits.transpose(1, 0, 2)

    got = run(params, hidden[:, 0], tokens[:, :, 0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_logits_stay_close_to_float32(case):
    cfg, _, params = case
    codes = jnp.asarray(random_codes(cfg, B=2, T=9), jnp.int32)
    drift = logits_drift(params, codes, cfg, "bfloat16")
    print(f"bf16 vs f32 relative logit drift: {drift}")
    # bf16 has an 8-bit mantissa (rel. rounding 4e-3 per op); a few layers stay within a few percent.
    assert drift["text"] < 0.05 and drift["audio"] < 0.05, drift
    assert drift["text"] > 0 and drift["audio"] > 0  # really ran in bf16


def test_bf16_config_keeps_both_stacks_in_bf16_and_params_have_logical_axes():
    cfg = LMConfig.tiny().with_dtypes("bfloat16", "bfloat16")
    assert cfg.temporal.dtype == cfg.depth.dtype == "bfloat16"
    boxed = jax.eval_shape(lambda k: LMModel(cfg).init(k, jnp.zeros((1, cfg.num_streams, 2), jnp.int32)),
                           jax.random.PRNGKey(0))["params"]
    import flax.linen as nn
    from flax import traverse_util

    specs = traverse_util.flatten_dict(nn.get_partition_spec(boxed))
    shapes = traverse_util.flatten_dict(nn.unbox(boxed))
    assert set(specs) == set(shapes)
    for path, spec in specs.items():
        assert spec is not None and len(spec) == len(shapes[path].shape) and all(spec), path
        assert shapes[path].dtype == jnp.bfloat16, path
    assert specs[("transformer", "layers", "self_attn", "in_proj")][0] == "layers"
    for name in ("depformer_in", "depformer_emb", "linears"):
        assert specs[(name,)][0] == "steps"
    assert specs[("depformer", "layers", "mlp", "linear_in")][:2] == ("layers", "steps")


def test_codes_with_wrong_stream_count_are_rejected():
    cfg = LMConfig.from_reference_kwargs(TEST_LM_KWARGS)
    params = jax.eval_shape(LMModel(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"codes must be \[B, 4, T\]"):
        jax.eval_shape(LMModel(cfg).apply, params, jnp.zeros((1, 5, 3), jnp.int32))


def test_temporal_step_input_with_wrong_stream_count_is_rejected():
    # the streaming path calls `temporal` directly (no `codes` check before it): a frame of another layout is
    # refused by name instead of silently embedding the wrong streams
    cfg = LMConfig.from_reference_kwargs(TEST_LM_KWARGS)
    params = jax.eval_shape(LMModel(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 3), jnp.int32))
    for shape in ((1, 5, 1), (1, 3, 1), (4, 1)):
        with pytest.raises(ValueError, match=r"tokens must be \[B, 4, T\]"):
            jax.eval_shape(lambda p, t: LMModel(cfg).apply(p, t, method=LMModel.temporal), params,
                           jnp.zeros(shape, jnp.int32))


def test_text_only_model_without_depformer_runs():
    cfg = LMConfig.from_reference_kwargs({**TEST_LM_KWARGS, "dep_q": 0, "depformer_weights_per_step_schedule": None})
    assert cfg.depth is None
    codes = jnp.zeros((1, cfg.num_streams, 4), jnp.int32)
    params = jax.jit(LMModel(cfg).init)(jax.random.PRNGKey(0), codes)["params"]
    out = jit_forward(params, codes, cfg)
    assert out.audio_logits.shape == (1, 0, 4, cfg.card) and out.text_logits.shape == (1, 1, 4, cfg.text_card)


def test_the_depth_pieces_of_a_text_only_model_are_refused_by_name():
    cfg = LMConfig.from_reference_kwargs({**TEST_LM_KWARGS, "dep_q": 0, "depformer_weights_per_step_schedule": None})
    params = jax.eval_shape(LMModel(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, cfg.num_streams, 2), jnp.int32))
    hidden, tokens = jnp.zeros((1, 2, cfg.dim)), jnp.zeros((1, 0, 2), jnp.int32)
    with pytest.raises(ValueError, match="no depth transformer"):
        jax.eval_shape(lambda p: LMModel(cfg).apply(p, hidden, tokens, method="depth"), params)
    with pytest.raises(ValueError, match="no depth transformer"):
        jax.eval_shape(lambda p: LMModel(cfg).apply(p, hidden[:, 0], jnp.zeros((1,), jnp.int32), 0, None,
                                                    method="depth_step"), params)
    with pytest.raises(ValueError, match="no depth transformer"):
        init_depth_state(cfg, 1)


def test_depformer_embedding_tables_name_their_width_axis_low_rank_only_when_it_is_the_rank():
    # the rank (e.g. 8) is left whole by the sharding rules (`low_rank`), the model width is `embed`
    import flax.linen as nn

    for kwargs, width in ((TEST_LM_KWARGS, "low_rank"), (MOSHI_SMALL_KWARGS, "embed")):
        cfg = LMConfig.from_reference_kwargs(kwargs)
        boxed = jax.eval_shape(lambda k, c=cfg: LMModel(c).init(k, jnp.zeros((1, c.num_streams, 2), jnp.int32)),
                               jax.random.PRNGKey(0))["params"]
        specs = nn.get_partition_spec(boxed)
        assert tuple(specs["depformer_text_emb"]) == ("vocab", width)
        assert tuple(specs["depformer_emb"]) == ("steps", "vocab", width)


def test_depth_tokens_of_another_length_than_hidden_are_refused_not_broadcast():
    # one column of tokens against three hidden positions would broadcast silently into the depformer input
    cfg = LMConfig.from_reference_kwargs(TEST_LM_KWARGS)
    params = jax.eval_shape(LMModel(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 3), jnp.int32))
    hidden = jnp.zeros((2, 3, cfg.dim))
    for shape in ((2, cfg.dep_q, 1), (2, cfg.dep_q + 1, 3), (1, cfg.dep_q, 3)):
        with pytest.raises(ValueError, match=r"tokens must be \[B, dep_q, T\] = \(2, 3, 3\)"):
            jax.eval_shape(lambda p, t: LMModel(cfg).apply(p, hidden, t, method="depth"), params,
                           jnp.zeros(shape, jnp.int32))
