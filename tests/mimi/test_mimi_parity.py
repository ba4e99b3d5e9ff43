"""Mimi equals the reference PyTorch Mimi (random weights, imported from its state dict), float32 on CPU:
unquantized latent, codes (where the nearest-vs-second gap is clear), decoded audio from the reference's
codes, and streaming equal to the reference's streaming, also past the attention window."""

import numpy as np
import pytest
from mimi_reference import build_reference, clear_code_mask, reference_latent, rel_err, state_dict_numpy

from moshi_jax.mimi import checkpoint as mimi_ckpt
from moshi_jax.mimi.config import MimiConfig
from moshi_jax.mimi.model import MimiCodec

pytestmark = pytest.mark.parity
TOL = 1e-5


def _setup(cfg: MimiConfig, num_codebooks: int | None = None):
    ref = build_reference(cfg, num_codebooks=num_codebooks)
    return ref, MimiCodec(cfg), mimi_ckpt.load_reference(state_dict_numpy(ref), cfg)


@pytest.fixture(scope="module")
def tiny():
    return _setup(MimiConfig.tiny(), num_codebooks=32)


def _wav(frames: int, batch: int = 2, extra: int = 0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal((batch, 1, frames * 1920 + extra))).astype(np.float32)


def _ref_encode(ref, wav, k):
    import torch

    ref.set_num_codebooks(k)
    with torch.no_grad():
        return ref.encode(torch.from_numpy(wav)).numpy()


def _ref_stream(ref, wav, k):
    """Reference streaming, one 80 ms frame per call: (latents, codes, audio decoded from its codes)."""
    import torch

    ref.set_num_codebooks(k)
    B, _, T = wav.shape
    lat, codes, audio = [], [], []
    with torch.no_grad(), ref.streaming(B):
        for i in range(T // 1920):
            frame = torch.from_numpy(wav[..., i * 1920:(i + 1) * 1920])
            lat.append(ref.encode_to_latent(frame, quantize=False).numpy())
    with torch.no_grad(), ref.streaming(B):
        for i in range(T // 1920):
            c = ref.encode(torch.from_numpy(wav[..., i * 1920:(i + 1) * 1920]))
            codes.append(c.numpy())
            audio.append(ref.decode(c).numpy())
    return np.concatenate(lat, -1), np.concatenate(codes, -1), np.concatenate(audio, -1)


def test_small_latent_matches_reference_including_right_padding(tiny):
    import torch

    ref, codec, params = tiny
    wav = _wav(3, extra=700)  # not a whole number of frames: both sides zero-pad to 4 frames
    with torch.no_grad():
        expected = ref.encode_to_latent(torch.from_numpy(wav), quantize=False).numpy()
    got = np.asarray(codec.encode_to_latent(params, wav))
    assert got.shape == expected.shape == (2, 16, 4)
    assert rel_err(got, expected) <= TOL


@pytest.mark.parametrize("k", [1, 2, 8, 32])
def test_small_codes_match_reference_where_the_gap_is_clear(tiny, k):
    ref, codec, params = tiny
    wav = _wav(4, extra=1)
    expected = _ref_encode(ref, wav, k)
    got = np.asarray(codec.encode(params, wav, num_codebooks=k))
    assert got.shape == expected.shape == (2, k, 5) and got.dtype == np.int32
    clear = clear_code_mask(ref, reference_latent(ref, wav), k)
    assert clear.mean() > 0.8  # the comparison below covers most codes
    np.testing.assert_array_equal(got[clear], expected[clear])
    assert len(np.unique(expected[:, -1])) > 1  # codes vary (codebooks sized to the latent)


@pytest.mark.parametrize("k", [1, 8, 32])
def test_small_decode_of_reference_codes_matches_reference(tiny, k):
    import torch

    ref, codec, params = tiny
    codes = np.random.default_rng(k).integers(0, 64, (2, k, 5))
    with torch.no_grad():
        expected = ref.decode(torch.from_numpy(codes)).numpy()
    got = np.asarray(codec.decode(params, codes))
    assert got.shape == expected.shape == (2, 1, 5 * 1920)
    assert rel_err(got, expected) <= TOL


def test_small_streaming_matches_reference_streaming_past_the_attention_window(tiny):
    import torch

    ref, codec, params = tiny
    frames = 7  # 14 transformer steps through a 6-step window
    wav = _wav(frames, seed=3)
    ref_lat, ref_codes, ref_audio = _ref_stream(ref, wav, 8)
    with torch.no_grad():  # past the window, the reference's streaming differs from its one-shot output
        batch_lat = ref.encode_to_latent(torch.from_numpy(wav), quantize=False).numpy()
        batch_audio = ref.decode(torch.from_numpy(ref_codes)).numpy()
    assert rel_err(ref_lat, batch_lat) > 1e-4 and rel_err(ref_audio, batch_audio) > 1e-4

    latent = _our_streaming_latent(codec, params, wav)
    assert rel_err(latent, ref_lat) <= TOL
    state = codec.init_state(2, num_codebooks=8)
    state, codes = codec.encode_chunk(params, state, wav)
    clear = clear_code_mask(ref, ref_lat, 8)
    assert clear.mean() > 0.8
    np.testing.assert_array_equal(np.asarray(codes)[clear], ref_codes[clear])
    state = codec.init_state(2, num_codebooks=8)
    audio = []
    for i in range(frames):  # step by step this time
        state, a = codec.decode_step(params, state, ref_codes[..., i:i + 1])
        audio.append(np.asarray(a))
    assert rel_err(np.concatenate(audio, -1), ref_audio) <= TOL


def _our_streaming_latent(codec, params, wav):
    """Unquantized latent of our streaming encoder, frame by frame ([B, D, F])."""
    import jax

    from moshi_jax.mimi.model import MimiModule

    @jax.jit
    def step(state, frame):
        latent, new = codec.module.apply({"params": params}, frame.transpose(0, 2, 1), state,
                                         method=MimiModule.encode_latent)
        return state.replace(**new), latent

    state, out = codec.init_state(wav.shape[0]), []
    for i in range(wav.shape[-1] // 1920):
        state, latent = step(state, wav[..., i * 1920:(i + 1) * 1920])
        out.append(np.asarray(latent).transpose(0, 2, 1))
    return np.concatenate(out, -1)


# ------------------------------------------------------------------ released configuration (slow)


@pytest.fixture(scope="module")
def released():
    return _setup(MimiConfig())


@pytest.mark.slow
def test_released_config_one_shot_matches_reference(released):
    import torch

    ref, codec, params = released
    wav = _wav(3, batch=1, extra=123)
    ref_lat = reference_latent(ref, wav)
    assert rel_err(codec.encode_to_latent(params, wav), ref_lat) <= TOL
    ref_codes = _ref_encode(ref, wav, 8)
    clear = clear_code_mask(ref, ref_lat, 8)
    assert clear.mean() > 0.8
    np.testing.assert_array_equal(np.asarray(codec.encode(params, wav))[clear], ref_codes[clear])
    with torch.no_grad():
        ref_audio = ref.decode(torch.from_numpy(ref_codes)).numpy()
    assert rel_err(codec.decode(params, ref_codes), ref_audio) <= TOL


@pytest.mark.slow
def test_released_config_streaming_matches_reference_streaming(released):
    ref, codec, params = released
    wav = _wav(3, batch=1, seed=5)
    ref_lat, ref_codes, ref_audio = _ref_stream(ref, wav, 8)
    state = codec.init_state(1)
    state, codes = codec.encode_chunk(params, state, wav)
    clear = clear_code_mask(ref, ref_lat, 8)
    np.testing.assert_array_equal(np.asarray(codes)[clear], ref_codes[clear])
    state = codec.init_state(1)
    state, audio = codec.decode_chunk(params, state, ref_codes)
    assert rel_err(audio, ref_audio) <= TOL
