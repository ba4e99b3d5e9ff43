"""The shared transformer stack: streaming over an explicit KV ring equals one-shot attention."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.nn.transformer import (
    Transformer,
    TransformerConfig,
    init_state,
    select_step_weights,
    stream_layers,
    unstack_layers,
)
from moshi_jax.training.mesh import LOGICAL_AXIS_RULES, make_mesh


def _setup(cfg: TransformerConfig, B=2, T=12, seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), (B, T, cfg.d_model))
    model = Transformer(cfg)
    params = model.init(jax.random.PRNGKey(seed + 1), x)
    return model, params, x


@pytest.mark.parametrize("context", [3, 5, 100])
def test_step_by_step_streaming_equals_one_shot_past_the_window(context):
    cfg = TransformerConfig(d_model=32, num_heads=4, num_layers=3, dim_feedforward=64, context=context,
                            layer_scale=0.01)
    model, params, x = _setup(cfg)
    full, _ = model.apply(params, x)
    state = init_state(cfg, x.shape[0])
    step = jax.jit(lambda p, s, xt: model.apply(p, xt, s))
    outs = []
    for t in range(x.shape[1]):
        y, state = step(params, state, x[:, t:t + 1])
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
    # The ring never grows: capacity is the context.
    assert state.layers.keys.shape == (cfg.num_layers, x.shape[0], cfg.num_heads, cfg.head_dim, context)
    assert step._cache_size() == 1


def test_chunked_streaming_loses_oldest_key_like_the_reference_when_ring_is_full():
    # Two steps per call into a 4-slot ring: the first query of each chunk loses its oldest key once the
    # ring is full (the reference writes both keys before attending), so outputs differ from one-shot.
    cfg = TransformerConfig(d_model=16, num_heads=2, num_layers=1, dim_feedforward=32, context=4)
    model, params, x = _setup(cfg, T=10)
    full, _ = model.apply(params, x)
    state = init_state(cfg, x.shape[0])
    outs = []
    for t in range(0, 10, 2):
        y, state = model.apply(params, x[:, t:t + 2], state)
        outs.append(y)
    stream = jnp.concatenate(outs, 1)
    # Before the window fills, chunked streaming is exact; afterwards the even positions differ.
    np.testing.assert_allclose(stream[:, :4], full[:, :4], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(stream[:, 4::2] - full[:, 4::2]).max()) > 1e-4
    np.testing.assert_allclose(stream[:, 5::2], full[:, 5::2], rtol=1e-5, atol=1e-6)


def test_batch_items_are_independent():
    cfg = TransformerConfig(d_model=16, num_heads=2, num_layers=2, dim_feedforward=32, context=8,
                            norm="rms_norm_f32", gating="silu")
    model, params, x = _setup(cfg, B=2, T=6)
    both, _ = model.apply(params, x)
    alone, _ = model.apply(params, x[1:])
    np.testing.assert_allclose(both[1:], alone, rtol=1e-6, atol=1e-6)


def test_stacked_layer_params_carry_logical_axes():
    cfg = TransformerConfig(d_model=16, num_heads=2, num_layers=2, dim_feedforward=32, context=8, gating="silu",
                            norm="rms_norm_f32")
    model, params, _ = _setup(cfg)
    names = jax.tree.map(lambda b: b.names, params["params"]["layers"],
                         is_leaf=lambda b: hasattr(b, "names"))
    assert names["self_attn"]["in_proj"] == ("layers", "embed", "qkv", "heads", "head_dim")
    assert names["mlp"]["linear_in"] == ("layers", "embed", "gate", "mlp")
    assert names["norm1"]["alpha"] == ("layers", "norm")


def test_unrolled_stack_equals_scanned_stack_in_value_and_gradient():
    # scan_layers=False (the train step's unrolled stack) is the same function of the same stacked params.
    cfg = TransformerConfig(d_model=16, num_heads=2, num_layers=3, dim_feedforward=32, context=8, gating="silu",
                            norm="rms_norm_f32", weights_per_step=6)
    model, params, x = _setup(cfg, T=6)
    unrolled = Transformer(dataclasses.replace(cfg, scan_layers=False))

    def loss(m):
        return lambda p: (m.apply(p, x)[0] ** 2).sum()

    v1, g1 = jax.value_and_grad(loss(model))(params)
    v2, g2 = jax.value_and_grad(loss(unrolled))(params)
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g2, g1)


def test_stream_layers_over_per_layer_rings_equals_the_scanned_stack_and_refuses_the_other_layout():
    cfg = TransformerConfig(d_model=16, num_heads=2, num_layers=2, dim_feedforward=32, context=4, gating="silu",
                            norm="rms_norm_f32")
    model, params, x = _setup(cfg, T=7)
    layers = unstack_layers(nn.unbox(params["params"]["layers"]), cfg.num_layers)
    stacked, per_layer = init_state(cfg, x.shape[0]), init_state(cfg, x.shape[0], per_layer=True)
    for t in range(x.shape[1]):  # past the 4-slot window
        want, stacked = model.apply(params, x[:, t:t + 1], stacked)
        got, per_layer = stream_layers(cfg, layers, x[:, t:t + 1], per_layer)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="per-layer KV caches"):
        stream_layers(cfg, layers, x[:, :1], stacked)
    with pytest.raises(ValueError, match="per-layer KV caches"):
        model.apply(params, x[:, :1], per_layer)
    with pytest.raises(ValueError, match="expected 2 per-layer param trees, got 1"):
        stream_layers(cfg, layers[:1], x[:, :1], per_layer)


def test_a_per_step_stack_without_context_streams_its_steps_in_one_call_several_or_each_from_its_weight_cut():
    # The reference's depth transformer: no context (its ring holds the weights_per_step positions), and each
    # position of a multi-position call uses its own step's weights (the offset plus its index, scheduled).
    cfg = TransformerConfig(d_model=16, num_heads=2, num_layers=2, dim_feedforward=32, context=None, gating="silu",
                            norm="rms_norm", positional_embedding="sin", weights_per_step=4,
                            weights_per_step_schedule=(0, 1, 1, 2))
    assert cfg.cache_capacity == 4
    model, params, x = _setup(cfg, T=4)
    full, _ = model.apply(params, x)
    layers = unstack_layers(nn.unbox(params["params"]["layers"]), cfg.num_layers)
    B = x.shape[0]
    for cuts in ((0, 4), (0, 1, 4)):  # all steps in one call; one step, then the three others
        stacked, per_layer, ys, zs = init_state(cfg, B), init_state(cfg, B, per_layer=True), [], []
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            y, stacked = model.apply(params, x[:, a:b], stacked)
            z, per_layer = stream_layers(cfg, layers, x[:, a:b], per_layer)
            ys.append(y)
            zs.append(z)
        np.testing.assert_allclose(jnp.concatenate(ys, 1), full, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(jnp.concatenate(zs, 1), full, rtol=1e-5, atol=1e-6)
    # each step alone with its own cut of the per-step weights (what the LM's prepared depth steps hold)
    state = init_state(cfg, B, per_layer=True)
    for t, s in enumerate(cfg.weights_per_step_schedule):
        cut = tuple(select_step_weights(p, s) for p in layers)
        y, state = stream_layers(cfg, cut, x[:, t:t + 1], state, step_index=0)
        np.testing.assert_allclose(y, full[:, t:t + 1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs `context`"):
        init_state(dataclasses.replace(cfg, weights_per_step=0, weights_per_step_schedule=None), B)


def test_a_schedule_whose_length_is_not_the_number_of_steps_is_refused():
    with pytest.raises(ValueError, match="weights_per_step_schedule must have weights_per_step entries"):
        TransformerConfig(d_model=16, num_heads=2, num_layers=1, dim_feedforward=32, gating="silu",
                          weights_per_step=4, weights_per_step_schedule=(0, 1, 1))


@pytest.mark.parametrize("through", ["one_shot", "streaming"])
def test_a_stack_initialised_through_either_call_gets_distinct_layers_that_stream_like_one_shot(through):
    cfg = TransformerConfig(d_model=16, num_heads=2, num_layers=3, dim_feedforward=32, context=8,
                            norm="rms_norm_f32", gating="silu")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 16))
    model = Transformer(cfg)
    params = model.init(jax.random.PRNGKey(1), x, *([init_state(cfg, 2)] if through == "streaming" else []))
    w = np.asarray(nn.unbox(params["params"]["layers"]["self_attn"]["in_proj"]))
    assert w.shape[0] == 3 and all(not np.allclose(w[i], w[j]) for i in range(3) for j in range(i + 1, 3))
    one_shot, _ = model.apply(params, x)
    streamed, _ = model.apply(params, x, init_state(cfg, 2))
    np.testing.assert_allclose(streamed, one_shot, rtol=1e-5, atol=1e-5)


def test_config_is_immutable_hashable_and_refuses_heads_that_do_not_divide_the_width():
    cfg = TransformerConfig(d_model=16, num_heads=2, num_layers=1, dim_feedforward=32, context=8)
    assert hash(cfg) == hash(dataclasses.replace(cfg))  # a static jit argument: hashed by value
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_layers = 2
    with pytest.raises(ValueError, match="d_model 16 not divisible by num_heads 3"):
        TransformerConfig(d_model=16, num_heads=3, num_layers=1, dim_feedforward=32, context=8)


def test_streaming_state_takes_the_cache_dtype_asked_for_else_the_compute_dtype():
    cfg = TransformerConfig(d_model=16, num_heads=2, num_layers=2, dim_feedforward=32, context=8, dtype="bfloat16")
    for state, want in [(init_state(cfg, 1), jnp.bfloat16), (init_state(cfg, 1, jnp.float32), jnp.float32),
                        (init_state(cfg, 1, jnp.float32, per_layer=True), jnp.float32)]:
        leaves = [a for a in jax.tree.leaves(state) if jnp.issubdtype(a.dtype, jnp.floating)]
        assert leaves and all(a.dtype == want for a in leaves)


def test_the_one_shot_stack_is_a_rolled_loop_by_default_and_unrolled_on_request():
    # A rolled loop keeps compile time independent of depth (the default); scan_layers=False unrolls it.
    cfg = TransformerConfig(d_model=16, num_heads=2, num_layers=3, dim_feedforward=32, context=8)
    model, params, x = _setup(cfg, T=4)

    def whiles(c):
        return jax.jit(Transformer(c).apply).lower(params, x).as_text().count("stablehlo.while")

    assert whiles(cfg) == 1 and whiles(dataclasses.replace(cfg, scan_layers=False)) == 0


@pytest.mark.parametrize("streaming", [False, True])
def test_under_logical_axis_rules_the_one_shot_residual_is_constrained_and_the_streaming_one_is_not(streaming):
    # The sharded train step pins the residual stream to RESIDUAL_AXES at each layer's input and after attention
    # (else GSPMD follows the fsdp-sharded weights); the streaming path leaves its small residual alone.
    cfg = TransformerConfig(d_model=16, num_heads=2, num_layers=2, dim_feedforward=32, context=8)
    model, params, x = _setup(cfg, T=4)
    args = (params, x, init_state(cfg, 2)) if streaming else (params, x)
    with jax.set_mesh(make_mesh((2, 1, 1))), nn.logical_axis_rules(LOGICAL_AXIS_RULES):  # the train step's rules
        text = jax.jit(model.apply).lower(*args).as_text()
    constrained = [line for line in text.splitlines() if "sharding_constraint" in line and "tensor<2x4x16xf32>" in line]
    assert len(constrained) == (0 if streaming else 2), constrained
