"""StreamingConv1d: the few-outputs matmul form (a streamed frame) equals XLA's convolution."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.nn import backend
from moshi_jax.nn.conv import _FEW, _few_outputs_conv, conv_nd


@pytest.mark.parametrize("K,S,n_out", [(4, 2, 1), (16, 8, 2), (3, 1, 2), (7, 1, _FEW)])
def test_few_outputs_matmul_equals_convolution(K, S, n_out):
    rng = np.random.default_rng(K)
    T = (n_out - 1) * S + K
    xp = jnp.asarray(rng.standard_normal((2, T, 5)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((K, 5, 6)), jnp.float32)
    want = jax.lax.conv_general_dilated(xp, kernel, (S,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
    got = _few_outputs_conv(xp, kernel, S, n_out)
    assert got.shape == want.shape == (2, n_out, 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --- against the reference's streaming convs (moshi.modules.conv), one shot and streamed in chunks ---------

CONVS = {  # K, S, dilation, groups, pad_mode
    "strided": (4, 2, 1, 1, "constant"),
    "replicate_long_kernel": (7, 1, 1, 1, "replicate"),
    "dilated": (3, 1, 2, 1, "constant"),
    "grouped_replicate": (3, 1, 1, 2, "replicate"),
    "pointwise": (1, 1, 1, 1, "constant"),
}
TRANSPOSED = {  # K, S, groups, out_channels (in_channels 4): every pairing of group widths 1 and > 1
    "overlapping": (4, 2, 1, 6), "kernel_equals_stride": (3, 3, 1, 6), "grouped": (5, 2, 2, 6),
    "depthwise": (4, 2, 4, 4), "one_input_per_group": (4, 2, 4, 8), "one_output_per_group": (3, 2, 2, 2),
}


def _torch_conv(name):
    import torch
    from moshi.modules.conv import StreamingConv1d as RefConv

    K, S, d, G, pad = CONVS[name]
    torch.manual_seed(0)
    ref = RefConv(4, 6, K, S, d, G, True, True, "none", {}, pad).eval()
    sd = ref.state_dict()
    params = {"kernel": jnp.asarray(sd["conv.conv.weight"].numpy().transpose(2, 1, 0)),
              "bias": jnp.asarray(sd["conv.conv.bias"].numpy())}
    from moshi_jax.nn.conv import StreamingConv1d

    if (S, d, G, pad) == (1, 1, 1, "constant"):  # every default, as in the reference
        return ref, StreamingConv1d(4, 6, K), {"params": params}
    if (d, G, pad) == (1, 1, "constant"):
        return ref, StreamingConv1d(4, 6, K, S), {"params": params}
    return ref, StreamingConv1d(4, 6, K, S, d, G, pad_mode=pad), {"params": params}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_equals_the_reference_one_shot_and_streamed(name):
    import torch

    from moshi_jax.nn.conv import init_conv_state

    ref, mod, params = _torch_conv(name)
    K, S, d, _, _ = CONVS[name]
    x = np.random.default_rng(1).standard_normal((2, 12 * S, 4)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 2, 1))).numpy().transpose(0, 2, 1)
    got, none = mod.apply(params, jnp.asarray(x))
    assert none is None
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # streamed: chunks of 1, 2 and 5 frames (the few-outputs matmul and the XLA conv path), the state carries
    # the left context (and the replicate padding happens on the first call only)
    state, outs, t = init_conv_state(2, 4, K, S, d), [], 0
    replicate = CONVS[name][4] == "replicate"  # every call needs the left context's length (checked statically)
    for n in ((K - 1, K - 1, 5, 12) if replicate else (S, 2 * S, 5 * S, 12 * S)):
        n = min(n, x.shape[1] - t)
        if n <= 0:
            break
        y, state = mod.apply(params, jnp.asarray(x[:, t:t + n]), state)
        outs.append(y)
        t += n
    np.testing.assert_allclose(jnp.concatenate(outs, 1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TRANSPOSED))
def test_transposed_conv_equals_the_reference_one_shot_and_streamed(name):
    import torch
    from moshi.modules.conv import StreamingConvTranspose1d as RefConvTr

    from moshi_jax.nn.conv import StreamingConvTranspose1d, init_conv_transpose_state

    K, S, G, C_out = TRANSPOSED[name]
    torch.manual_seed(0)
    ref = RefConvTr(4, C_out, K, S, G, True, True, "none").eval()
    sd = ref.state_dict()
    params = {"params": {"kernel": jnp.asarray(sd["convtr.convtr.weight"].numpy().transpose(0, 2, 1)),
                         "bias": jnp.asarray(sd["convtr.convtr.bias"].numpy())}}
    out = sd["convtr.convtr.bias"].shape[0]  # (groups 1: the default, as in the reference)
    mod = StreamingConvTranspose1d(4, out, K, S, G) if G > 1 else StreamingConvTranspose1d(4, out, K, S)
    x = np.random.default_rng(1).standard_normal((2, 9, 4)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 2, 1))).numpy().transpose(0, 2, 1)
        with ref.streaming(2):
            want_stream = np.concatenate([ref(torch.from_numpy(x[:, t:t + n].transpose(0, 2, 1))).numpy()
                                          for t, n in ((0, 1), (1, 3), (4, 5))], axis=2).transpose(0, 2, 1)
    got, none = mod.apply(params, jnp.asarray(x))
    assert none is None and got.shape == (2, 9 * S, mod.out_channels)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    state, outs = init_conv_transpose_state(2, mod.out_channels, K, S), []
    for t, n in ((0, 1), (1, 3), (4, 5)):
        y, state = mod.apply(params, jnp.asarray(x[:, t:t + n]), state)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), want_stream, rtol=1e-5, atol=1e-5)


def test_fresh_conv_weights_use_pytorchs_default_init_range():
    from moshi_jax.nn.conv import StreamingConv1d, StreamingConvTranspose1d

    x = jnp.zeros((1, 4, 8))
    p = StreamingConv1d(8, 64, 4, 2, groups=2).init(jax.random.PRNGKey(0), x)["params"]
    bound = 1 / np.sqrt(8 // 2 * 4)  # fan_in = in_channels / groups * kernel
    for w in (p["kernel"].unbox(), p["bias"].unbox()):
        assert bound * 0.8 < float(jnp.abs(w).max()) <= bound
        assert float(w.min()) < -0.5 * bound and float(w.max()) > 0.5 * bound  # U(-bound, bound): both signs
    p = StreamingConvTranspose1d(8, 64, 4, 2, groups=2).init(jax.random.PRNGKey(0), x)["params"]
    bound = 1 / np.sqrt(64 // 2 * 4)  # PyTorch takes a transposed conv's fan_in from out_channels / groups
    for w in (p["kernel"].unbox(), p["bias"].unbox()):
        assert bound * 0.8 < float(jnp.abs(w).max()) <= bound
        assert float(w.min()) < -0.5 * bound and float(w.max()) > 0.5 * bound  # U(-bound, bound): both signs


def test_bad_conv_inputs_are_clear_errors():
    from moshi_jax.nn.conv import StreamingConv1d, StreamingConvTranspose1d, conv_context, init_conv_state

    conv = StreamingConv1d(4, 6, 5, 2, pad_mode="replicate")
    params = conv.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="expected 4 channels, got 3"):
        conv.apply(params, jnp.zeros((1, 4, 3)))
    with pytest.raises(ValueError, match="length 5 is not a positive multiple of stride 2"):
        conv.apply(params, jnp.zeros((1, 5, 4)))
    with pytest.raises(ValueError, match="replicate padding needs >= 3 samples"):
        conv.apply(params, jnp.zeros((1, 2, 4)), init_conv_state(1, 4, 5, 2))
    assert conv_context(5, 2) == 3 and conv_context(3, 1, dilation=2) == 4 and conv_context(2, 2) == 0
    with pytest.raises(ValueError, match="kernel 2 .*shorter than stride 3"):
        conv_context(2, 3)
    tr = StreamingConvTranspose1d(4, 6, 2, 3)
    with pytest.raises(ValueError, match="kernel 2 shorter than stride 3"):
        tr.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 4)))
    tr = StreamingConvTranspose1d(4, 6, 4, 2)
    with pytest.raises(ValueError, match="expected 4 channels, got 5"):
        tr.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 5)))


@pytest.mark.parametrize("cls", ["StreamingConv1d", "StreamingConvTranspose1d"])
@pytest.mark.parametrize("c_in,c_out,groups", [(6, 4, 4), (4, 6, 4), (4, 4, 0)])
def test_channels_that_groups_do_not_divide_are_a_clear_error(cls, c_in, c_out, groups):
    # A group width that rounded down would silently drop channels from the kernel.
    from moshi_jax.nn import conv

    mod = getattr(conv, cls)(c_in, c_out, 4, 2, groups=groups)
    with pytest.raises(ValueError, match=f"not both divisible by groups={groups}"):
        mod.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, c_in)))


def test_a_fresh_conv_state_holds_the_convs_left_context_in_zeros_with_the_first_flag_set():
    from moshi_jax.nn.conv import init_conv_state

    state = init_conv_state(3, 4, 5)  # stride and dilation default to 1: k - 1 samples of context
    assert state.previous.shape == (3, 4, 4) and state.previous.dtype == jnp.float32
    assert not np.asarray(state.previous).any() and np.asarray(state.first).all()
    strided = init_conv_state(1, 2, 7, 2, 3, jnp.bfloat16).previous
    assert strided.shape == (1, 17, 2) and strided.dtype == jnp.bfloat16  # (7 - 1) * 3 + 1 - 2 samples


def test_a_bfloat16_stream_with_a_default_float32_state_computes_in_bfloat16():
    from moshi_jax.nn.conv import StreamingConv1d, init_conv_state

    conv = StreamingConv1d(4, 6, 5, 1, dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 4)), jnp.bfloat16)
    params = conv.init(jax.random.PRNGKey(0), x)
    y32, _ = conv.apply(params, x, init_conv_state(2, 4, 5))  # the state's default dtype: float32
    y16, _ = conv.apply(params, x, init_conv_state(2, 4, 5, dtype=jnp.bfloat16))
    assert y32.dtype == y16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y32, np.float32), np.asarray(y16, np.float32))
    # A streamed frame (few outputs: the matmul path) computes in bfloat16 too, with the float32 params.
    y1, _ = conv.apply(params, x[:, :1], init_conv_state(2, 4, 5))
    assert y1.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y16[:, :1], np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("state", [False, True])
def test_a_bfloat16_transposed_conv_returns_bfloat16_with_its_float32_bias(state):
    # The bias is stored in float32 (param_dtype); adding it uncast would promote the decoder's output.
    from moshi_jax.nn.conv import StreamingConvTranspose1d, init_conv_transpose_state

    tr = StreamingConvTranspose1d(4, 6, 4, 2, dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4)), jnp.bfloat16)
    params = tr.init(jax.random.PRNGKey(0), x)
    assert params["params"]["bias"].unbox().dtype == jnp.float32
    with warnings.catch_warnings():  # the float32 state is cast, not left to jax's scatter (a FutureWarning)
        warnings.simplefilter("error")
        y, _ = tr.apply(params, x, init_conv_transpose_state(2, 6, 4, 2) if state else None)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 6, 6)


@pytest.mark.parametrize("shape,kernel,strides,padding,dilation", [
    ((2, 9, 33, 3), (3, 9), (1, 2), ((1, 1), (4, 4)), (1, 1)),  # the discriminator's layers, odd frequency count
    ((2, 9, 32, 3), (3, 9), (1, 2), ((4, 4), (4, 4)), (4, 1)),  # time dilation, even frequency count
    ((2, 11, 20, 2), (3, 4), (2, 3), ((0, 1), (2, 0)), (1, 1)),  # both axes strided, kernel not a multiple
    ((3, 50, 4), (7,), (5,), ((0, 0),), (1,)),  # 1-D, stride 5, windows that leave a remainder
    ((2, 30, 3), (3,), (2,), ((2, 2),), (2,)),  # strided AND dilated axis: left to the direct conv
    ((2, 30, 3), (4,), (3,), ((1, 0),), None),  # dilation not given: 1
    ((1, 6, 7, 9, 2), (2, 3, 4), (1, 2, 3), ((0, 1), (1, 1), (2, 0)), (1, 1, 1)),  # 3-D, the most axes it takes
])
def test_polyphase_strided_conv_equals_the_direct_conv_in_value_and_gradient(shape, kernel, strides, padding,
                                                                             dilation):
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=shape), jnp.float32)
    w = jnp.asarray(r.normal(size=(*kernel, shape[-1], 5)), jnp.float32)

    def loss(x, w):  # a cotangent that differs per output element
        y = conv_nd(x, w, strides, padding, dilation)
        return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) / y.size), y

    expected = jax.lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation or (1,) * len(kernel),
                                            dimension_numbers={1: ("NWC", "WIO", "NWC"),
                                                               2: ("NHWC", "HWIO", "NHWC"),
                                                               3: ("NDHWC", "DHWIO", "NDHWC")}[len(kernel)])
    results = {}
    for which in ("cpu", "portable"):
        with backend.override(which):  # a fresh function per trace
            results[which] = jax.jit(jax.value_and_grad(lambda *a: loss(*a), argnums=(0, 1), has_aux=True))(x, w)
    for which, ((_, y), _) in results.items():
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4, err_msg=which)
    (_, _), (gx_poly, gw_poly) = results["cpu"]
    (_, _), (gx_direct, gw_direct) = results["portable"]
    np.testing.assert_allclose(gx_poly, gx_direct, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw_poly, gw_direct, rtol=1e-5, atol=1e-4)
    assert float(jnp.abs(gx_direct).max()) > 0 and float(jnp.abs(gw_direct).max()) > 0


@pytest.mark.parametrize("spatial", [0, 4])
def test_a_conv_over_no_or_more_than_three_spatial_axes_is_a_clear_error(spatial):
    x = jnp.zeros((1, *(4,) * spatial, 2))
    w = jnp.zeros((*(2,) * spatial, 2, 3))
    with pytest.raises(ValueError, match=f"conv_nd: {spatial} spatial axes"):
        conv_nd(x, w, (1,) * spatial, ((0, 0),) * spatial)


def test_on_cpu_the_strided_convs_input_gradient_has_no_zero_stuffed_convolution():
    # What the polyphase choice is for: XLA:CPU runs an lhs-dilated (zero-stuffed) convolution on a slow path.
    x = jnp.zeros((2, 9, 33, 3), jnp.float32)
    w = jnp.zeros((3, 9, 3, 4), jnp.float32)

    def hlo(which):
        with backend.override(which):
            grad = jax.jit(jax.grad(lambda x, w: jnp.sum(conv_nd(x, w, (1, 2), ((1, 1), (4, 4)), (1, 1)) ** 2)))
            return grad.lower(x, w).compile().as_text()

    assert "lhs_dilate" not in hlo("cpu")
    assert "lhs_dilate" in hlo("portable")  # the direct strided conv's input gradient (what the CPU choice avoids)
