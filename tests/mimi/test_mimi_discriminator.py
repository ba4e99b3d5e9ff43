"""The multi-scale STFT discriminator and its STFT (moshi_jax.mimi.discriminator)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.mimi.discriminator import MultiScaleSTFTDiscriminator, stft

RNG = np.random.default_rng(0)


def test_stft_matches_torch_stft_centered_reflect_hann():
    torch = pytest.importorskip("torch")
    x = RNG.standard_normal((2, 300)).astype(np.float32)
    ours = np.asarray(stft(jnp.asarray(x), 64, 16))
    theirs = torch.stft(torch.from_numpy(x), 64, 16, window=torch.hann_window(64), center=True, pad_mode="reflect",
                        return_complex=True).numpy().transpose(0, 2, 1)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_multiscale_discriminator_gives_one_logit_map_and_five_feature_maps_per_scale():
    disc = MultiScaleSTFTDiscriminator(scales=(64, 32), filters=4)
    wav = jnp.asarray(RNG.standard_normal((2, 256)).astype(np.float32))
    params = disc.init(jax.random.PRNGKey(0), wav)["params"]
    logits, fmaps = disc.apply({"params": params}, wav)
    assert len(logits) == 2 and [len(f) for f in fmaps] == [5, 5]
    assert logits[0].shape[:2] == (2, 256 // 16 + 1) and fmaps[0][0].shape[-1] == 4


def test_stft_refuses_audio_shorter_than_half_the_window():
    with pytest.raises(ValueError, match="too short"):
        stft(jnp.zeros((1, 10)), 64, 16)
