"""MimiCodec contract: shapes, any number of codebooks, streaming (step / chunk / one-shot agree, state of
fixed shape, one compilation), batch independence, per-item reset, causality, init, input errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.mimi.config import MimiConfig
from moshi_jax.mimi.model import MimiCodec

CFG = MimiConfig.tiny()  # attention window: 6 steps = 3 frames
FS = CFG.frame_size


@pytest.fixture(scope="module")
def codec_params():
    codec = MimiCodec(CFG)
    params = codec.init(jax.random.PRNGKey(0))
    # Codebooks sized to the latent, so that codes actually vary with the input.
    wav = _wav(4, batch=1, seed=9)
    latent = np.asarray(codec.encode_to_latent(params, wav))[0].T  # [F, D]
    for name in ("semantic", "acoustic"):
        q = params["quantizer"][name]
        std = float((latent @ np.asarray(q["input_proj"])).std())
        for key in q:
            if key.startswith("codebook_"):
                q[key] = q[key] * std
    return codec, params


def _wav(frames: int, batch: int = 2, seed: int = 0, extra: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal((batch, 1, frames * FS + extra))).astype(np.float32)


def _stream_encode(codec, params, wav, k=None):
    state, out = codec.init_state(wav.shape[0], k), []
    for i in range(wav.shape[-1] // FS):
        state, c = codec.encode_step(params, state, wav[..., i * FS:(i + 1) * FS])
        out.append(np.asarray(c))
    return np.concatenate(out, -1), state


def _stream_decode(codec, params, codes):
    state, out = codec.init_state(codes.shape[0], codes.shape[1]), []
    for i in range(codes.shape[-1]):
        state, a = codec.decode_step(params, state, codes[..., i:i + 1])
        out.append(np.asarray(a))
    return np.concatenate(out, -1), state


def test_one_shot_shapes_dtypes_and_zero_right_padding(codec_params):
    codec, params = codec_params
    wav = _wav(3, extra=5)  # (most tests use [2, 1, 4 frames]: shapes shared, fewer compilations)
    codes = codec.encode(params, wav)
    assert codes.shape == (2, CFG.num_codebooks, 4) and codes.dtype == jnp.int32
    assert int(codes.min()) >= 0 and int(codes.max()) < CFG.bins
    padded = np.pad(wav, ((0, 0), (0, 0), (0, FS - 5)))
    np.testing.assert_array_equal(codes, codec.encode(params, padded))
    audio = codec.decode(params, codes)
    assert audio.shape == (2, 1, 4 * FS) and audio.dtype == jnp.float32 and bool(jnp.isfinite(audio).all())
    assert codec.encode_to_latent(params, wav).shape == (2, CFG.dimension, 4)
    assert codec.decode_latent(params, codes).shape == (2, CFG.dimension, 4)
    assert len(np.unique(np.asarray(codes))) > 3  # the codes depend on the input


@pytest.mark.parametrize("k", [1, 2, 9, 32])
def test_any_number_of_codebooks_is_a_prefix_of_all_32(codec_params, k):
    codec, params = codec_params
    wav = _wav(4, seed=1)
    all_codes = np.asarray(codec.encode(params, wav, num_codebooks=32))
    codes = np.asarray(codec.encode(params, wav, num_codebooks=k))
    np.testing.assert_array_equal(codes, all_codes[:, :k])  # residual VQ: levels do not depend on later ones
    assert codec.decode(params, codes).shape == (2, 1, 4 * FS)
    if k == 9:  # (one K is enough for the streaming path: each K is a separate compilation)
        stream_codes, state = _stream_encode(codec, params, wav, k)
        np.testing.assert_array_equal(stream_codes[..., :3], codes[..., :3])  # (before the window fills)
        assert state.num_codebooks == k


def test_step_chunk_and_one_shot_agree_before_the_window_fills(codec_params):
    codec, params = codec_params
    wav = _wav(3, seed=2)  # 3 frames = 6 transformer steps = the window
    codes = np.asarray(codec.encode(params, wav))
    step_codes, _ = _stream_encode(codec, params, wav)
    _, chunk_codes = codec.encode_chunk(params, codec.init_state(2), wav)
    np.testing.assert_array_equal(step_codes, codes)
    np.testing.assert_array_equal(np.asarray(chunk_codes), codes)
    audio = np.asarray(codec.decode(params, codes))
    step_audio, _ = _stream_decode(codec, params, codes)
    _, chunk_audio = codec.decode_chunk(params, codec.init_state(2), codes)
    np.testing.assert_allclose(step_audio, audio, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunk_audio, audio, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(codec.encode_stream(params, wav), codes)
    np.testing.assert_allclose(codec.decode_stream(params, codes), audio, rtol=1e-5, atol=1e-6)


def test_chunks_continue_each_other_like_single_steps_past_the_window(codec_params):
    codec, params = codec_params
    wav = _wav(4, seed=3)  # 8 transformer steps through a 6-step window
    step_codes, _ = _stream_encode(codec, params, wav)
    state = codec.init_state(2)
    state, a = codec.encode_chunk(params, state, wav[..., :2 * FS])
    state, b = codec.encode_chunk(params, state, wav[..., 2 * FS:])
    np.testing.assert_array_equal(np.concatenate([a, b], -1), step_codes)
    step_audio, _ = _stream_decode(codec, params, step_codes)
    state = codec.init_state(2)
    state, a = codec.decode_chunk(params, state, step_codes[..., :2])
    state, b = codec.decode_chunk(params, state, step_codes[..., 2:])
    np.testing.assert_allclose(np.concatenate([a, b], -1), step_audio, rtol=1e-5, atol=1e-6)


def test_appending_audio_or_codes_never_changes_earlier_outputs(codec_params):
    codec, params = codec_params
    wav = _wav(4, seed=4)
    codes = np.asarray(codec.encode(params, wav))
    np.testing.assert_array_equal(codec.encode(params, wav[..., :2 * FS]), codes[..., :2])
    audio = np.asarray(codec.decode(params, codes))
    np.testing.assert_allclose(codec.decode(params, codes[..., :2]), audio[..., :2 * FS], rtol=1e-5, atol=1e-6)


def test_batch_items_are_independent_one_shot_and_streaming(codec_params):
    codec, params = codec_params
    wav = _wav(4, seed=5)
    codes = np.asarray(codec.encode(params, wav))
    np.testing.assert_array_equal(codec.encode(params, wav[1:]), codes[1:])
    stream, _ = _stream_encode(codec, params, wav)
    alone, _ = _stream_encode(codec, params, wav[1:])
    np.testing.assert_array_equal(stream[1:], alone)
    audio, _ = _stream_decode(codec, params, stream)
    audio_alone, _ = _stream_decode(codec, params, alone)
    np.testing.assert_allclose(audio[1:], audio_alone, rtol=1e-5, atol=1e-6)


def test_streaming_steps_compile_once_and_keep_the_state_shape(codec_params):
    codec, params = codec_params
    codec = MimiCodec(CFG)  # a new instance shares the per-config compilation cache
    fresh = codec.init_state(2)
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), fresh)
    codes, state = _stream_encode(codec, params, _wav(1, seed=6))  # compiles (if no earlier test did)
    _, state = _stream_decode(codec, params, codes)
    compiled = codec._k.encode_step._cache_size(), codec._k.decode_step._cache_size()
    codes, state = _stream_encode(codec, params, _wav(4, seed=7))  # more frames, a new stream
    assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == shapes
    _, state = _stream_decode(codec, params, codes)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == shapes
    assert (codec._k.encode_step._cache_size(), codec._k.decode_step._cache_size()) == compiled


def test_streaming_consumes_the_given_state(codec_params):
    codec, params = codec_params
    state = codec.init_state(1)
    new, _ = codec.encode_step(params, state, _wav(1, batch=1))
    assert state.encoder["conv_in"].previous.is_deleted()  # donated: updated in place
    assert not new.encoder["conv_in"].previous.is_deleted()


def test_reset_restarts_only_the_masked_streams(codec_params):
    codec, params = codec_params
    wav = _wav(4, seed=8)
    state = codec.init_state(2)
    state, _ = codec.encode_chunk(params, state, wav[..., :2 * FS])
    state, _ = codec.decode_chunk(params, state, np.zeros((2, 8, 2), np.int32))
    state = codec.reset(state, np.array([True, False]))
    state, codes = codec.encode_chunk(params, state, wav[..., 2 * FS:])
    fresh_0 = codec.encode_stream(params, wav[:1, :, 2 * FS:])  # item 0 starts over
    np.testing.assert_array_equal(codes[:1], fresh_0)
    continued, _ = _stream_encode(codec, params, wav[1:])  # item 1 just continues
    np.testing.assert_array_equal(codes[1:], continued[:, :, 2:])
    state, audio = codec.decode_chunk(params, state, np.asarray(codes))
    # Decoder of item 0 was reset too: same audio as a fresh decoder on the same codes.
    np.testing.assert_allclose(audio[:1], codec.decode_stream(params, np.asarray(codes[:1])), rtol=1e-5, atol=1e-6)


def test_host_init_is_deterministic_and_shaped_like_the_modules_params():
    codec = MimiCodec(CFG)
    a, b, c = codec.init(jax.random.PRNGKey(3)), codec.init(jax.random.key(3)), codec.init(jax.random.PRNGKey(4))
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), a, b))
    assert not bool((a["encoder"]["conv_in"]["kernel"] == c["encoder"]["conv_in"]["kernel"]).all())
    traced = jax.eval_shape(codec.init, jax.random.PRNGKey(0))  # under a trace: the modules' own init
    assert jax.tree.map(lambda x: x.shape, traced) == jax.tree.map(lambda x: x.shape, a)
    layer = a["encoder_transformer"]["layer_0"]
    np.testing.assert_array_equal(layer["norm1"]["scale"], 1.0)
    np.testing.assert_array_equal(layer["layer_scale_1"], np.float32(CFG.layer_scale))
    k = a["encoder"]["down_1"]["kernel"]  # [K, C_in, C_out]: |w| <= 1/sqrt(K * C_in)
    assert float(jnp.abs(k).max()) <= 1 / np.sqrt(k.shape[0] * k.shape[1])


def test_every_parameter_has_logical_axis_names():
    axes = MimiCodec(CFG).param_axes()
    leaves = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == len(x.value.shape) for x in leaves)
    assert len(leaves) == len(jax.tree.leaves(nn.unbox(axes)))


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 1920), np.float32), r"shape \[B, 1, T\]"),
    (np.zeros((1, 2, 1920), np.float32), r"shape \[B, 1, T\]"),
    (np.zeros((1, 1, 0), np.float32), "empty"),
    (np.zeros((1, 1, 1920), np.int16), "floating point"),
])
def test_encode_rejects_bad_audio_with_a_clear_error(codec_params, bad, match):
    codec, params = codec_params
    with pytest.raises(ValueError, match=match):
        codec.encode(params, bad)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((1, 8, 2), np.float32), "integers"),
    (np.zeros((8, 2), np.int32), r"\[B, K, F\]"),
    (np.zeros((1, 33, 2), np.int32), "num_codebooks must be in 1..32"),
    (np.full((1, 8, 2), CFG.bins, np.int32), r"code values must be in \[0, 63\]"),
    (np.full((1, 8, 2), -1, np.int32), r"found range \[-1, -1\]"),
    (np.zeros((1, 8, 0), np.int32), "no frames"),
])
def test_decode_rejects_bad_codes_with_a_clear_error(codec_params, bad, match):
    codec, params = codec_params
    with pytest.raises(ValueError, match=match):
        codec.decode(params, bad)


def test_streaming_rejects_partial_frames_batch_mismatch_and_bad_k(codec_params):
    codec, params = codec_params
    state = codec.init_state(2)
    with pytest.raises(ValueError, match="multiple of the frame size 1920"):
        codec.encode_chunk(params, state, np.zeros((2, 1, 1000), np.float32))
    with pytest.raises(ValueError, match="batch 1 does not match"):
        codec.encode_step(params, state, np.zeros((1, 1, FS), np.float32))
    with pytest.raises(ValueError, match="expected 1 frame"):
        codec.encode_step(params, state, np.zeros((2, 1, 2 * FS), np.float32))
    with pytest.raises(ValueError, match="num_codebooks must be in 1..32"):
        codec.init_state(1, num_codebooks=0)
    with pytest.raises(ValueError, match="reset mask must have shape"):
        codec.reset(state, np.array([True]))
