"""Every streaming conv layer Mimi uses is causal (appending input never changes earlier outputs) and
streaming it in chunks equals one-shot; same for the SEANet residual block, encoder and decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mimi_helpers import random_params

from moshi_jax.mimi.config import MimiConfig
from moshi_jax.mimi.seanet import ResBlock, SEANetDecoder, SEANetEncoder, init_decoder_state, init_encoder_state
from moshi_jax.nn.conv import (
    StreamingConv1d,
    StreamingConvTranspose1d,
    init_conv_state,
    init_conv_transpose_state,
)

CFG = MimiConfig.tiny()

# name -> (module, fresh-state function of batch, input channels, input frames per output step, outputs per step)
LAYERS = {
    "conv k7": (StreamingConv1d(3, 5, 7), lambda b: init_conv_state(b, 3, 7), 3, 1, 1),
    "conv k3 dilation 2": (StreamingConv1d(3, 5, 3, dilation=2), lambda b: init_conv_state(b, 3, 3, 1, 2), 3, 1, 1),
    "conv k8 stride 4": (StreamingConv1d(3, 5, 8, stride=4), lambda b: init_conv_state(b, 3, 8, 4), 3, 4, 1),
    "conv k1": (StreamingConv1d(3, 5, 1), lambda b: init_conv_state(b, 3, 1), 3, 1, 1),
    "downsample (replicate pad)": (StreamingConv1d(4, 4, 4, stride=2, use_bias=False, pad_mode="replicate"),
                                   lambda b: init_conv_state(b, 4, 4, 2), 4, 2, 1),
    "convtr k16 stride 8": (StreamingConvTranspose1d(6, 3, 16, 8), lambda b: init_conv_transpose_state(b, 3, 16, 8),
                            6, 1, 8),
    "convtr depthwise (upsample)": (StreamingConvTranspose1d(4, 4, 4, 2, groups=4, use_bias=False),
                                    lambda b: init_conv_transpose_state(b, 4, 4, 2), 4, 1, 2),
    "convtr grouped": (StreamingConvTranspose1d(4, 6, 6, 3, groups=2), lambda b: init_conv_transpose_state(b, 6, 6, 3),
                       4, 1, 3),
    "resblock": (ResBlock(6, 3, 1, 2), lambda b: {"conv1": init_conv_state(b, 6, 3), "conv2": init_conv_state(b, 3, 1)},
                 6, 1, 1),
    "seanet encoder": (SEANetEncoder(CFG), lambda b: init_encoder_state(CFG, b), 1, CFG.hop_length, 1),
    "seanet decoder": (SEANetDecoder(CFG), lambda b: init_decoder_state(CFG, b), CFG.dimension, 1, CFG.hop_length),
}


def _setup(name, steps=6, batch=2):
    module, fresh, cin, step_in, _ = LAYERS[name]
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, steps * step_in, cin))
    params = random_params(module, x[:, :step_in], fresh(batch))
    return module, fresh, params, x, step_in


def _one_shot(module):
    return jax.jit(lambda p, x: module.apply(p, x)[0])


@pytest.mark.parametrize("name", list(LAYERS))
def test_appending_input_never_changes_earlier_outputs(name):
    module, _, params, x, step_in = _setup(name)
    per_step_out = LAYERS[name][4]
    one_shot = _one_shot(module)
    full = one_shot(params, x)
    for steps in (1, 4):
        prefix = one_shot(params, x[:, : steps * step_in])
        np.testing.assert_allclose(prefix, full[:, : steps * per_step_out], rtol=1e-5, atol=1e-6)
    # A change at the end cannot reach back either.
    x2 = x.at[:, -step_in:].add(10.0)
    full2 = one_shot(params, x2)
    np.testing.assert_allclose(full2[:, : 5 * per_step_out], full[:, : 5 * per_step_out], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(full2 - full).max()) > 1e-3  # ... while the end itself does change


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("chunk_steps", [1, 2])
def test_streaming_in_chunks_equals_one_shot(name, chunk_steps):
    module, fresh, params, x, step_in = _setup(name)
    full = _one_shot(module)(params, x)
    state, outs = fresh(x.shape[0]), []
    step = jax.jit(lambda p, s, xc: module.apply(p, xc, s))
    for t in range(0, x.shape[1], chunk_steps * step_in):
        y, state = step(params, state, x[:, t: t + chunk_steps * step_in])
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-6)
    # The state keeps its shapes, so one compilation serves every step.
    assert jax.tree.map(jnp.shape, state) == jax.tree.map(jnp.shape, fresh(x.shape[0]))
    assert step._cache_size() == 1


def test_replicate_padding_copies_the_first_frame_only_on_the_first_call():
    module, fresh, params, x, _ = _setup("downsample (replicate pad)")
    kernel = params["params"]["kernel"]  # [4, C_in, C_out]
    y, state = module.apply(params, x[:, :2], fresh(2))
    # First output sees [x0, x0, x0, x1]: the two padding frames are copies of x0.
    window = jnp.stack([x[:, 0], x[:, 0], x[:, 0], x[:, 1]], axis=1)
    np.testing.assert_allclose(y[:, 0], jnp.einsum("bki,kio->bo", window, kernel), rtol=1e-5, atol=1e-6)
    assert not bool(state.first.any())
    y2, _ = module.apply(params, x[:, 2:4], state)  # later calls use the real history
    window = x[:, 0:4]
    np.testing.assert_allclose(y2[:, 0], jnp.einsum("bki,kio->bo", window, kernel), rtol=1e-5, atol=1e-6)


def test_transposed_conv_equals_the_textbook_definition():
    # y[t*S + k] += x[t] @ W[:, k] (full output), then the causal trim of the last K - S samples.
    module, _, params, x, _ = _setup("convtr k16 stride 8")
    K, S = 16, 8
    w = np.asarray(params["params"]["kernel"])  # [C_in, K, C_out]
    b = np.asarray(params["params"]["bias"])
    xn = np.asarray(x, np.float64)
    B, T, _ = xn.shape
    full = np.zeros((B, (T - 1) * S + K, w.shape[2]))
    for t in range(T):
        full[:, t * S: t * S + K] += np.einsum("bi,iko->bko", xn[:, t], w)
    expected = full[:, : T * S] + b
    np.testing.assert_allclose(_one_shot(module)(params, x), expected, rtol=1e-5, atol=1e-5)
