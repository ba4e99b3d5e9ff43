"""Streaming params (`prepare_streaming_params`: per-layer and per-depth-step buffers, optionally int8 kernels or
freeing the raw stacks as they are copied) compute what the stacked `LMModel` computes, and a bf16 model computes
in bf16 whatever dtype its params or inputs are stored in (float32 master params give exactly the logits of the
bf16 checkpoint; every public entry point returns float32 logits)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.lm.config import LMConfig
from moshi_jax.lm.model import (
    LMModel,
    depth_step_prepared,
    forward,
    init_depth_state,
    init_temporal_state,
    logits_drift,
    prepare_streaming_params,
)
from moshi_jax.nn.quant import CONTRACTED_AXES, QuantizedWeight
from tests.lm.test_generate import random_params
from tests.lm.test_model_parity import TEST_LM_KWARGS

# The reference's test model: low-rank depformer embeddings, per-step weights with the schedule [0, 1, 1].
CFG = LMConfig.from_reference_kwargs(TEST_LM_KWARGS)
B = 2


def _frame(cfg: LMConfig, seed: int = 0):
    """One temporal input frame `[B, 1 + n_q, 1]` and the depth tokens `[B, dep_q]` fed at each step."""
    r = np.random.default_rng(seed)
    tokens = np.concatenate([r.integers(0, cfg.text_card, (B, 1, 1)), r.integers(0, cfg.card, (B, cfg.n_q, 1))], 1)
    dtokens = np.concatenate([r.integers(0, cfg.text_card, (B, 1)), r.integers(0, cfg.card, (B, cfg.dep_q - 1))], 1)
    tokens[1, 2, 0] = -1  # a zero-embedding input
    dtokens[0, -1] = -1
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(dtokens, jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _stacked_outputs(cfg, params, tokens, dtokens, hidden=None):
    """(hidden [B, dim], text logits [B, V], audio logits [B, dep_q, card]) of the stacked model, one frame."""
    model, v = LMModel(cfg), {"params": params}
    h, text, _ = model.apply(v, tokens, init_temporal_state(cfg, B), method="temporal")
    hidden = h[:, 0] if hidden is None else hidden
    state, logits = init_depth_state(cfg, B), []
    for k in range(cfg.dep_q):
        lg, state = model.apply(v, hidden, dtokens[:, k], k, state, method="depth_step")
        logits.append(lg)
    return h[:, 0], text[:, 0], jnp.stack(logits, 1)


@functools.partial(jax.jit, static_argnums=0)
def _prepared_outputs(cfg, sp, tokens, dtokens, hidden=None):
    """The same frame through `StreamingParams` (per-layer temporal params, `depth_step_prepared`)."""
    h, text, _ = LMModel(cfg).apply({"params": sp.base}, tokens, init_temporal_state(cfg, B, per_layer=True),
                                    sp.temporal_layers, method="temporal")
    hidden = h[:, 0] if hidden is None else hidden
    state, logits = init_depth_state(cfg, B, per_layer=True), []
    for k in range(cfg.dep_q):
        lg, state = depth_step_prepared(cfg, sp.depth_steps[k], hidden, dtokens[:, k], state)
        logits.append(lg)
    return h[:, 0], text[:, 0], jnp.stack(logits, 1)


def _device_params(cfg):
    return jax.tree.map(jnp.asarray, random_params(cfg))  # device arrays (consume deletes them)


def _stacks(params):
    return jax.tree.leaves({k: params[k] for k in ("transformer", "depformer")})


@pytest.mark.parametrize("consume", [False, True], ids=["copy", "consume"])
def test_prepared_params_give_the_stacked_models_hidden_state_and_logits(consume):
    cfg = CFG
    tokens, dtokens = _frame(cfg)
    params = _device_params(cfg)
    want = _stacked_outputs(cfg, params, tokens, dtokens)
    sp = prepare_streaming_params(params, cfg, consume=consume)
    for _ in range(2):  # the prepared params are reusable (every frame reads them again)
        got = _prepared_outputs(cfg, sp, tokens, dtokens)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_consuming_preparation_frees_the_transformer_stacks_and_keeps_everything_it_returns():
    cfg = CFG
    params = _device_params(cfg)
    top = [x for k, v in params.items() if k not in ("transformer", "depformer") for x in jax.tree.leaves(v)]
    sp = prepare_streaming_params(params, cfg, consume=True)
    assert _stacks(params) and all(x.is_deleted() for x in _stacks(params))
    assert not any(x.is_deleted() for x in top)  # the embeddings and heads are shared with the result
    assert not any(x.is_deleted() for x in jax.tree.leaves(sp))
    kept = prepare_streaming_params(_device_params(cfg), cfg)  # same values, nothing deleted
    assert not any(x.is_deleted() for x in jax.tree.leaves(kept))
    jax.tree.map(np.testing.assert_array_equal, sp, kept)


def test_consuming_preparation_under_a_trace_leaves_the_traced_params_alone():
    # abstract evaluation (AOT compiles, memory estimates) passes tracers: there is nothing to free
    cfg = CFG
    params = _device_params(cfg)
    shapes = jax.eval_shape(lambda p: prepare_streaming_params(p, cfg, consume=True), params)
    assert jax.tree.structure(shapes) == jax.tree.structure(prepare_streaming_params(params, cfg))
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))


def _kernels(tree):
    """(name, leaf) of the transformer kernels that int8 serving quantizes."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda n: isinstance(n, QuantizedWeight))[0]
    return [(p[-1].key, x) for p, x in flat if getattr(p[-1], "key", None) in CONTRACTED_AXES]


def test_int8_preparation_quantizes_every_layer_and_depth_step_alike_with_or_without_consume():
    cfg = CFG
    tokens, dtokens = _frame(cfg, seed=1)
    params = _device_params(cfg)
    full = _stacked_outputs(cfg, params, tokens, dtokens)
    copied = prepare_streaming_params(params, cfg, weight_dtype="int8")
    consumed = prepare_streaming_params(params, cfg, consume=True, weight_dtype="int8")
    for sp in (copied, consumed):
        for layers in (sp.temporal_layers, *(s["layers"] for s in sp.depth_steps)):
            kernels = _kernels(layers)
            assert kernels and all(isinstance(x, QuantizedWeight) and x.q.dtype == jnp.int8 for _, x in kernels)
        for s in sp.depth_steps:  # the heads, embeddings and input projections keep their dtype
            assert s["linear"].dtype == s["in"].dtype == s["emb"].dtype == jnp.float32
    jax.tree.map(np.testing.assert_array_equal, copied, consumed)
    got = _prepared_outputs(cfg, copied, tokens, dtokens)
    for g, w in zip(got[1:], full[1:], strict=True):  # int8 kernels: close to the float model, not equal
        rel = float(jnp.abs(g - w).max() / jnp.abs(w).max())
        assert 0 < rel < 0.05, rel


def _bf16_norms(params):
    """The norms' params rounded to bf16 values (norms compute in float32 with their params as stored); every
    other weight keeps its float32 digits, which the compute dtype must round away where it is used."""
    def leaf(path, x):
        return x.astype(jnp.bfloat16).astype(jnp.float32) if "norm" in jax.tree_util.keystr(path) else x

    return jax.tree_util.tree_map_with_path(leaf, params)


def test_bf16_compute_with_float32_params_gives_exactly_the_bf16_checkpoints_logits():
    # Mixed precision (float32 master params, bf16 compute): every weight is rounded to bf16 where it is used,
    # so the model computes bit for bit what the checkpoint rounded to bf16 computes.
    cfg = CFG
    p32 = _bf16_norms(_device_params(cfg))
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
    mixed, bf16 = cfg.with_dtypes("bfloat16"), cfg.with_dtypes("bfloat16", "bfloat16")
    assert mixed.temporal.param_dtype == "float32"
    r = np.random.default_rng(2)
    codes = np.concatenate([r.integers(0, cfg.text_card, (B, 1, 6)), r.integers(0, cfg.card, (B, cfg.n_q, 6))], 1)
    codes = jnp.asarray(codes, jnp.int32)
    fwd = jax.jit(forward, static_argnums=2)
    a, b = fwd(p32, codes, mixed), fwd(p16, codes, bf16)
    for x, y in ((a.text_logits, b.text_logits), (a.audio_logits, b.audio_logits)):
        assert x.dtype == y.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    tokens, dtokens = _frame(cfg, seed=3)
    for prepare in (False, True):
        run = _prepared_outputs if prepare else _stacked_outputs
        got, want = (run(c, prepare_streaming_params(p, c) if prepare else p, tokens, dtokens)
                     for c, p in ((mixed, p32), (bf16, p16)))
        assert got[0].dtype == jnp.bfloat16 and got[1].dtype == got[2].dtype == jnp.float32
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(w.astype(jnp.float32)))


def test_a_bf16_depth_transformer_rounds_a_float32_hidden_state_to_bf16_first():
    # The depformer computes in its own dtype: a float32 temporal output (e.g. a float32 temporal stack before
    # a bf16 depth stack) is rounded to bf16 on the way in, on every path.
    cfg = CFG.with_dtypes("bfloat16", "bfloat16")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _device_params(cfg))
    tokens, dtokens = _frame(cfg, seed=4)
    h32 = jax.random.normal(jax.random.PRNGKey(0), (B, cfg.dim), jnp.float32)
    h16 = h32.astype(jnp.bfloat16)
    sp = prepare_streaming_params(params, cfg)
    for run in (_stacked_outputs, _prepared_outputs):
        p = params if run is _stacked_outputs else sp
        got, want = run(cfg, p, tokens, dtokens, h32)[2], run(cfg, p, tokens, dtokens, h16)[2]
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # the teacher-forced depth of the training forward
    depth = [jax.jit(lambda p, h: LMModel(cfg).apply({"params": p}, h[:, None], dtokens[:, :, None], method="depth"))(
        params, h) for h in (h32, h16)]
    assert depth[0].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(depth[0]), np.asarray(depth[1]))


@pytest.mark.parametrize("dep_q", [1, 2])
def test_teacher_forced_depth_equals_the_depth_steps_with_one_or_two_codebooks(dep_q):
    # few predicted codebooks: the audio-token embeddings of the teacher-forced depth exist from dep_q = 2 on
    cfg = LMConfig.from_reference_kwargs({**TEST_LM_KWARGS, "dep_q": dep_q,
                                          "depformer_weights_per_step_schedule": list(range(dep_q))})
    params = _device_params(cfg)
    tokens, dtokens = _frame(cfg, seed=5)
    hidden, _, want = _stacked_outputs(cfg, params, tokens, dtokens)
    got = jax.jit(lambda p, h, t: LMModel(cfg).apply({"params": p}, h[:, None], t[:, :, None], method="depth"))(
        params, hidden, dtokens)[:, :, 0]
    assert got.shape == want.shape == (B, dep_q, cfg.card)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_an_audio_id_past_its_table_reads_that_tables_last_row_not_the_next_codebooks_table():
    # the codebooks' tables are looked up as one flattened table: an out-of-range id stays in its own stream
    cfg = CFG
    params = _device_params(cfg)
    tokens, _ = _frame(cfg, seed=6)
    temporal = jax.jit(lambda p, t: LMModel(cfg).apply({"params": p}, t, method="temporal")[1])
    past, last = tokens.at[:, 1].set(cfg.card + 3), tokens.at[:, 1].set(cfg.card)  # table rows: card + 1
    np.testing.assert_array_equal(np.asarray(temporal(params, past)), np.asarray(temporal(params, last)))


def test_logits_drift_is_the_largest_absolute_change_of_a_valid_logit_relative_to_the_largest_logit():
    cfg = CFG
    params = _device_params(cfg)
    r = np.random.default_rng(7)
    codes = np.concatenate([r.integers(0, cfg.text_card, (B, 1, 6)), r.integers(0, cfg.card, (B, cfg.n_q, 6))], 1)
    codes[0, 1, 2] = -1  # a masked position
    codes = jnp.asarray(codes, jnp.int32)
    drift = logits_drift(params, codes, cfg, "bfloat16")
    fwd = jax.jit(forward, static_argnums=2)
    ref = fwd(params, codes, cfg)
    low = fwd(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), codes, cfg.with_dtypes("bfloat16", "bfloat16"))
    for name in ("text", "audio"):
        mask = np.asarray(getattr(ref, f"{name}_mask"))
        a, b = np.asarray(getattr(ref, f"{name}_logits"))[mask], np.asarray(getattr(low, f"{name}_logits"))[mask]
        assert isinstance(drift[name], float)  # a plain number to print or log
        assert drift[name] == pytest.approx(np.abs(a - b).max() / np.abs(a).max(), rel=1e-6), name


def test_per_layer_params_without_a_streaming_state_are_a_clear_error():
    sp = prepare_streaming_params(random_params(CFG), CFG)
    tokens, _ = _frame(CFG)
    with pytest.raises(ValueError, match="per-layer params .* are for streaming: pass a TransformerState"):
        LMModel(CFG).apply({"params": sp.base}, tokens, None, sp.temporal_layers, method="temporal")
