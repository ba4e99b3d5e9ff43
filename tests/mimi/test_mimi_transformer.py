"""Mimi's transformer: causal; streaming one step at a time equals one-shot (sliding window); two steps
per call reproduce the reference's chunked-ring behaviour; params carry logical axes; batch items are
independent. (Equality with the reference itself: test_mimi_parity.py.)"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mimi_helpers import random_params

from moshi_jax.mimi.config import MimiConfig
from moshi_jax.mimi.transformer import MimiTransformer, init_stack_state

CFG = MimiConfig.tiny().transformer  # d 16, 2 heads, 2 layers, context 6


@pytest.fixture(scope="module")
def setup():
    model = MimiTransformer(CFG)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, CFG.d_model))
    params = random_params(model, x[:, :2])
    return model, params, x, jax.jit(lambda p, x: model.apply(p, x)[0])


def test_appending_steps_never_changes_earlier_outputs(setup):
    model, params, x, one_shot = setup
    full = one_shot(params, x)
    for t in (1, 11):
        prefix = one_shot(params, x[:, :t])
        np.testing.assert_allclose(prefix, full[:, :t], rtol=1e-5, atol=1e-6)


def _stream(model, params, x, chunk):
    state, outs = init_stack_state(CFG, x.shape[0]), []
    step = jax.jit(lambda p, s, xc: model.apply(p, xc, s))
    for t in range(0, x.shape[1], chunk):
        y, state = step(params, state, x[:, t:t + chunk])
        outs.append(y)
    return jnp.concatenate(outs, 1), state, step


def test_one_step_at_a_time_streaming_equals_one_shot_past_the_window(setup):
    model, params, x, one_shot = setup
    full = one_shot(params, x)
    stream, state, step = _stream(model, params, x, 1)
    np.testing.assert_allclose(stream, full, rtol=1e-5, atol=1e-6)
    assert state.layers[0].keys.shape == (2, CFG.num_heads, CFG.head_dim, CFG.context)  # the ring never grows
    assert step._cache_size() == 1


def test_two_steps_per_call_lose_the_oldest_key_once_the_ring_is_full(setup):
    # As the reference: both keys of a chunk are written before attending, so with a full ring the first
    # query of each chunk no longer sees the key `context - 1` steps back.
    model, params, x, one_shot = setup
    full = one_shot(params, x)
    stream, _, _ = _stream(model, params, x, 2)
    C = CFG.context
    np.testing.assert_allclose(stream[:, :C], full[:, :C], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(stream[:, C::2] - full[:, C::2]).max()) > 1e-4


def test_batch_items_are_independent(setup):
    model, params, x, _ = setup
    both = _stream(model, params, x, 2)[0]
    alone = _stream(model, params, x[1:], 2)[0]
    np.testing.assert_allclose(both[1:], alone, rtol=1e-6, atol=1e-6)


def test_every_parameter_has_logical_axis_names(setup):
    model, _, x, _ = setup
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), x[:, :2])["params"]
    names = jax.tree.leaves(jax.tree.map(lambda b: b.names, boxed, is_leaf=lambda b: hasattr(b, "names")),
                            is_leaf=lambda n: isinstance(n, tuple))
    assert len(names) == len(jax.tree.leaves(nn.unbox(boxed)))
    assert boxed["layer_0"]["self_attn"]["in_proj"].names == ("embed", "qkv", "heads", "head_dim")
