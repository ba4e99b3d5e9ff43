"""One transformer stack (`nn.transformer.Transformer`) equals the reference `StreamingTransformer` for each of
its options: every norm, plain and gated MLPs with each activation, every positional embedding, LayerScale,
per-step weights with a schedule, causal / non-causal, windows shorter than the sequence, and streaming.

Both are built from one random torch state dict (converted by the LM checkpoint's own stack layout). Tiny
stacks, eager torch, so every case runs in about a second."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.lm import checkpoint as ck
from moshi_jax.nn.norms import NORMS, Norm
from moshi_jax.nn.transformer import Transformer, TransformerConfig, init_state, stream_layers, unstack_layers

torch = pytest.importorskip("torch")
ref_tr = pytest.importorskip("moshi.modules.transformer")

_TORCH_ACT = {"gelu": "gelu", "relu": "relu", "silu": "silu", "elu": "elu", "tanh": "tanh", "sigmoid": "sigmoid"}

CASES = {
    # Mimi's layout: LayerNorm, plain GELU MLP, interleaved RoPE, LayerScale, a window shorter than T.
    "mimi": TransformerConfig(d_model=16, num_heads=2, num_layers=2, dim_feedforward=24, context=3,
                              norm="layer_norm", layer_scale=0.3, positional_embedding="rope"),
    # Helium's layout: RMSNorm in float32, SiLU gating (dim_feedforward = 4 * d: the 21/8 hidden width).
    # (d = 32: there 21 d / 8 = 84 differs from the generic 2 * 4d / 3 = 85.)
    "helium": TransformerConfig(d_model=32, num_heads=4, num_layers=2, dim_feedforward=128, context=5,
                                norm="rms_norm_f32", gating="silu", positional_embedding="rope_concat",
                                max_period=100.0),
    # The depth transformer's layout: per-step weights with a schedule, sinusoidal positions, gelu gating.
    "depth": TransformerConfig(d_model=16, num_heads=2, num_layers=2, dim_feedforward=40, context=4,
                               norm="rms_norm", gating="gelu", positional_embedding="sin", positional_scale=0.5,
                               weights_per_step=4, weights_per_step_schedule=(0, 1, 1, 2)),
    "sin_rope": TransformerConfig(d_model=16, num_heads=2, num_layers=1, dim_feedforward=32, context=None,
                                  norm="layer_norm_f32", activation="relu", positional_embedding="sin_rope",
                                  max_period=50.0, layer_scale=2.0),
    "non_causal": TransformerConfig(d_model=16, num_heads=2, num_layers=1, dim_feedforward=32, causal=False,
                                    norm="rms_norm", gating="sigmoid", positional_embedding="none"),
}


def _reference(cfg: TransformerConfig, seed: int = 0):
    import torch.nn.functional as F

    torch.manual_seed(seed)
    kw = dict(norm=cfg.norm, gating=cfg.gating, layer_scale=cfg.layer_scale, weights_per_step=cfg.weights_per_step,
              weights_per_step_schedule=list(cfg.weights_per_step_schedule or []) or None,
              activation=getattr(F, _TORCH_ACT[cfg.activation]))
    ref = ref_tr.StreamingTransformer(cfg.d_model, cfg.num_heads, cfg.num_layers, cfg.dim_feedforward,
                                      causal=cfg.causal, context=cfg.context,
                                      positional_embedding=cfg.positional_embedding, max_period=cfg.max_period,
                                      positional_scale=cfg.positional_scale, **kw)
    with torch.no_grad():  # LayerScale / norm parameters away from their init values, so they matter
        for name, p in ref.named_parameters():
            if p.dim() == 1 or "alpha" in name:
                p.add_(0.3 * torch.randn_like(p))
    return ref.eval()


def _params(ref, cfg: TransformerConfig) -> dict:
    """The reference's state dict in this stack's param tree (the LM checkpoint's layout of one stack)."""
    src = ck._Source({"stack." + k: v for k, v in ref.state_dict().items()})  # per-step names normalised
    entries = ck._stack_entries("stack", (), cfg, cfg.num_layers)
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 2, cfg.d_model), cfg.dtype))
    flat = {path: np.zeros(leaf.unbox().shape if hasattr(leaf, "unbox") else leaf.shape, np.float32)
            for path, leaf in _flatten(shapes["params"], is_boxed=True).items()}
    for e in entries:
        flat[e.path][e.index] = e.to_jax(src.get(e.key))
    assert sorted(src.keys()) == sorted(e.key for e in entries)  # every reference tensor used
    return {"params": _unflatten(flat)}


def _flatten(tree, prefix=(), is_boxed=False):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,), is_boxed))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat):
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = jnp.asarray(v)
    return out


def _x(cfg: TransformerConfig, B: int = 2, T: int = 7, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, T, cfg.d_model)).astype(np.float32)


def _assert_close(got, want, tol=2e-5):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_shot_output_equals_the_reference_stack(name):
    cfg = CASES[name]
    if cfg.weights_per_step:  # the reference runs per-step weights only from position 0, one set per step
        T = cfg.weights_per_step
    else:
        T = 7
    ref = _reference(cfg)
    x = _x(cfg, T=T)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    got, _ = Transformer(cfg).apply(_params(ref, cfg), jnp.asarray(x))
    _assert_close(got, want)


@pytest.mark.parametrize("name", ["mimi", "helium"])
def test_one_shot_arithmetic_follows_the_compute_dtype_not_the_param_dtype(name):
    # bf16 compute with float32 master params (training) computes exactly what bf16 params compute: every
    # weight is cast to the compute dtype where it is used. (Values representable in bf16: norms compute in
    # float32 with the params as stored, which is then the same too.)
    cfg = dataclasses.replace(CASES[name], dtype="bfloat16")
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), _params(_reference(cfg), cfg))
    x = jnp.asarray(_x(cfg)).astype(jnp.bfloat16)
    f32_params, _ = Transformer(cfg).apply(params, x)
    bf16_params, _ = Transformer(dataclasses.replace(cfg, param_dtype="bfloat16")).apply(
        jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), x)
    assert f32_params.dtype == bf16_params.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(f32_params, np.float32), np.asarray(bf16_params, np.float32))


@pytest.mark.parametrize("name", ["mimi", "helium", "depth"])
def test_streaming_one_step_at_a_time_equals_the_reference_streaming(name):
    cfg = CASES[name]
    T = cfg.weights_per_step or 7
    ref = _reference(cfg)
    x = _x(cfg, T=T, seed=2)
    params = _params(ref, cfg)
    model = Transformer(cfg)
    state = init_state(cfg, x.shape[0])
    step = jax.jit(lambda p, s, xt: model.apply(p, xt, s))
    outs, want = [], []
    with torch.no_grad(), ref.streaming(x.shape[0]):
        for t in range(T):
            want.append(ref(torch.from_numpy(x[:, t:t + 1])).numpy())
            y, state = step(params, state, jnp.asarray(x[:, t:t + 1]))
            outs.append(np.asarray(y))
    _assert_close(np.concatenate(outs, 1), np.concatenate(want, 1))
    assert np.asarray(state.offset).tolist() == [T] * x.shape[0]


@pytest.mark.parametrize("kind", sorted(NORMS))
@pytest.mark.parametrize("scale", [1e-3, 10.0])
def test_each_norm_equals_the_reference_norm_including_its_epsilon(kind, scale):
    # A small input scale makes the epsilon visible (var ~ 1e-6 against eps 1e-5); a mean far from 0 makes
    # the layer norm's centring visible.
    rng = np.random.default_rng(0)
    x = (scale * rng.standard_normal((2, 3, 8)) + scale * 2.0).astype(np.float32)
    ref = ref_tr.create_norm_fn(kind, 8)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape)).astype(np.float32)))
        want = ref(torch.from_numpy(x)).numpy()
    params = {n: jnp.asarray(p.detach().numpy().reshape(-1)) for n, p in ref.named_parameters()}
    names = {"weight": "scale", "bias": "bias", "alpha": "alpha"}
    got = Norm(kind, 8).apply({"params": {names[n]: v for n, v in params.items()}}, jnp.asarray(x))
    _assert_close(got, want, tol=1e-5)


@pytest.mark.parametrize("kind", sorted(NORMS))
def test_each_norm_of_bfloat16_input_equals_the_reference_bit_for_bit(kind):
    # The reference's plain norms run in the params' dtype (bf16 here), the "_f32" ones in float32 params; both
    # give the float32 result rounded once. A large offset with small variations makes bf16 rounding visible.
    rng = np.random.default_rng(0)
    x = (3.0 * rng.standard_normal((2, 16, 64)) + 5.0).astype(np.float32)
    ref = ref_tr.create_norm_fn(kind, 64)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape)).astype(np.float32)))
        if not kind.endswith("_f32"):
            ref = ref.to(torch.bfloat16)
        want = ref(torch.from_numpy(x).to(torch.bfloat16)).float().numpy()
    names = {"weight": "scale", "bias": "bias", "alpha": "alpha"}
    pdtype = jnp.float32 if kind.endswith("_f32") else jnp.bfloat16
    params = {names[n]: jnp.asarray(p.detach().float().numpy().reshape(-1)).astype(pdtype)
              for n, p in ref.named_parameters()}
    got = Norm(kind, 64, param_dtype=pdtype).apply({"params": params}, jnp.asarray(x).astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), want)


def test_unknown_norm_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown norm 'batch_norm'"):
        Norm("batch_norm", 4).init(jax.random.PRNGKey(0), jnp.zeros((1, 1, 4)))


def test_a_bfloat16_stack_returns_the_input_dtype_and_stays_close_to_float32():
    cfg = dataclasses.replace(CASES["helium"], dtype="bfloat16")
    ref = _reference(cfg)
    params = _params(ref, cfg)
    x = jnp.asarray(_x(cfg)).astype(jnp.bfloat16)
    got, _ = Transformer(cfg).apply(params, x)
    want, _ = Transformer(dataclasses.replace(cfg, dtype="float32")).apply(params, x.astype(jnp.float32))
    assert got.dtype == jnp.bfloat16
    _assert_close(got, want, tol=5e-2)


@pytest.mark.parametrize("name", ["mimi", "helium", "depth"])
def test_a_bfloat16_stack_computes_the_same_on_bfloat16_input_and_on_its_float32_copy(name):
    # The compute dtype alone sets the arithmetic: the residual stream is kept in bf16 even when the input
    # arrives in float32 (the output comes back in the input's dtype).
    cfg = dataclasses.replace(CASES[name], dtype="bfloat16")
    params = _params(_reference(cfg), cfg)
    x = jnp.asarray(_x(cfg)).astype(jnp.bfloat16)
    y16, _ = Transformer(cfg).apply(params, x)
    y32, _ = Transformer(cfg).apply(params, x.astype(jnp.float32))
    assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y32), np.asarray(y16, np.float32))
    layers = unstack_layers(params["params"]["layers"], cfg.num_layers)  # the per-layer streaming path
    s16, s32 = (stream_layers(cfg, layers, x[:, :3].astype(dt), init_state(cfg, x.shape[0], per_layer=True))[0]
                for dt in (jnp.bfloat16, jnp.float32))
    assert s16.dtype == jnp.bfloat16 and s32.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(s32), np.asarray(s16, np.float32))


def test_unset_positional_settings_are_the_reference_stacks_defaults():
    import inspect

    ref = inspect.signature(ref_tr.StreamingTransformer).parameters
    cfg = TransformerConfig(d_model=16, num_heads=2, num_layers=1, dim_feedforward=32)
    assert (cfg.max_period, cfg.positional_scale) == (ref["max_period"].default, ref["positional_scale"].default)


def test_a_plain_mlp_with_per_step_weights_is_refused_as_in_the_reference():
    from moshi_jax.nn.mlp import MLP

    with pytest.raises(ValueError, match="weights_per_step needs a gated MLP"):
        MLP(16, 32, "none", "gelu", 2, jnp.float32, jnp.float32).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 16)))


@pytest.mark.parametrize("interleave", [True, False])
def test_one_shot_rope_rotates_q_and_k_exactly_like_the_reference_function(interleave):
    # Within attention only q.k matters (any shared permutation of the head dim would pass the stack tests);
    # the function itself returns the rotated q and k in the reference's layout.
    from moshi.modules.rope import apply_rope as ref_rope

    from moshi_jax.nn.rope import apply_rope

    rng = np.random.default_rng(0)
    q, k = (rng.standard_normal((2, 5, 3, 8)).astype(np.float32) for _ in range(2))
    offset = np.array([0, 7])
    want = ref_rope(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(offset), 100.0, interleave, True)
    positions = jnp.asarray(offset[:, None] + np.arange(5)[None])
    got = apply_rope(jnp.asarray(q), jnp.asarray(k), positions, 100.0, interleave)
    if interleave:  # the default, as in the reference
        np.testing.assert_array_equal(np.asarray(apply_rope(jnp.asarray(q), jnp.asarray(k), positions, 100.0)[0]),
                                      np.asarray(got[0]))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w.numpy(), rtol=1e-5, atol=1e-5)
    # bf16 q, k: rotated in float32 (the angles too), returned in bf16
    low = apply_rope(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16), positions, 100.0, interleave)
    for g, w in zip(low, want, strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), w.numpy(), rtol=2 ** -7, atol=2e-2)


def test_one_shot_sin_embedding_equals_the_reference_function_with_its_default_period():
    from moshi_jax.nn.rope import sin_embedding

    positions = np.array([[0, 1, 5, 900], [3, 4, 2000, 7]])
    want = ref_tr.create_sin_embedding(torch.from_numpy(positions)[:, :, None], 16).numpy()
    got = sin_embedding(jnp.asarray(positions), 16)
    assert got.shape == (2, 4, 16)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
