"""Codec losses (moshi_jax.training.codec_loss) against direct numpy computations on small inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.training import codec_loss as L

RNG = np.random.default_rng(0)


def _np_stft(x, n_fft, hop):
    x = np.pad(x, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    n = 1 + (x.shape[1] - n_fft) // hop
    frames = np.stack([x[:, i * hop:i * hop + n_fft] for i in range(n)], axis=1)
    return np.fft.rfft(frames * win, axis=-1)


def test_adversarial_losses_match_numpy():
    real = [RNG.standard_normal((2, 5, 3)).astype(np.float32), RNG.standard_normal((2, 4)).astype(np.float32)]
    fake = [RNG.standard_normal((2, 5, 3)).astype(np.float32), RNG.standard_normal((2, 4)).astype(np.float32)]
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    np.testing.assert_allclose(float(L.generator_adv_loss(fake, "hinge")),
                               np.mean([relu(1 - f).mean() for f in fake]), rtol=1e-6)
    np.testing.assert_allclose(float(L.generator_adv_loss(fake, "lsgan")),
                               np.mean([((1 - f) ** 2).mean() for f in fake]), rtol=1e-6)
    np.testing.assert_allclose(float(L.discriminator_loss(real, fake, "hinge")),
                               np.mean([relu(1 - r).mean() + relu(1 + f).mean()
                                         for r, f in zip(real, fake, strict=True)]),
                               rtol=1e-6)
    np.testing.assert_allclose(float(L.discriminator_loss(real, fake, "lsgan")),
                               np.mean([((1 - r) ** 2).mean() + (f ** 2).mean()
                                         for r, f in zip(real, fake, strict=True)]),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="unknown adversarial"):
        L.generator_adv_loss(fake, "wgan")


def test_feature_matching_matches_numpy_and_only_moves_the_fake_side():
    real = [[RNG.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(3)] for _ in range(2)]
    fake = [[RNG.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(3)] for _ in range(2)]
    want = np.mean([np.abs(r - f).mean() / np.abs(r).mean() for rs, fs in zip(real, fake, strict=True)
                    for r, f in zip(rs, fs, strict=True)])
    np.testing.assert_allclose(float(L.feature_matching_loss(real, fake)), want, rtol=1e-5)
    g_real = jax.grad(lambda r: L.feature_matching_loss(r, fake))(real)
    assert all(float(jnp.abs(g).sum()) == 0 for gs in g_real for g in gs)


def test_mel_filterbank_is_triangular_with_unit_peaks_inside_the_band():
    fb = L.mel_filterbank(16000, 512, 20)
    assert fb.shape == (257, 20) and fb.min() >= 0 and fb.max() <= 1 + 1e-6
    assert (fb.max(axis=0) > 0.5).all()  # every band has a real peak
    centres = fb.argmax(axis=0)
    assert (np.diff(centres) > 0).all()  # ordered by frequency


def test_multiscale_mel_and_l1_losses_match_numpy():
    x = RNG.standard_normal((2, 400)).astype(np.float32)
    y = RNG.standard_normal((2, 400)).astype(np.float32)
    want = 0.0
    for n in (64, 128):
        fb = L.mel_filterbank(8000, n, 10)
        m, mh = np.abs(_np_stft(x, n, n // 4)) @ fb, np.abs(_np_stft(y, n, n // 4)) @ fb
        want += np.abs(m - mh).mean() + np.abs(np.log(np.maximum(m, 1e-5)) - np.log(np.maximum(mh, 1e-5))).mean()
    got = float(L.multiscale_mel_loss(jnp.asarray(x), jnp.asarray(y), 8000, (64, 128), 10))
    np.testing.assert_allclose(got, want / 2, rtol=1e-4)
    np.testing.assert_allclose(float(L.l1_loss(x, y)), np.abs(x - y).mean(), rtol=1e-6)
    assert float(L.multiscale_mel_loss(jnp.asarray(x), jnp.asarray(x), 8000, (64,), 10)) == 0.0


def test_si_snr_matches_its_definition_and_ignores_scale():
    ref = RNG.standard_normal((3, 500))
    noise = RNG.standard_normal((3, 500))
    est = 2.5 * ref + 0.3 * noise
    r, e = ref - ref.mean(-1, keepdims=True), est - est.mean(-1, keepdims=True)
    t = (e * r).sum(-1, keepdims=True) / (r * r).sum(-1, keepdims=True) * r
    want = 10 * np.log10((t * t).sum(-1) / ((e - t) ** 2).sum(-1))
    np.testing.assert_allclose(np.asarray(L.si_snr(jnp.asarray(ref), jnp.asarray(est))), want, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(L.si_snr(jnp.asarray(ref), jnp.asarray(7 * est))), want, rtol=1e-4)


def test_distillation_loss_is_one_minus_cosine():
    p = RNG.standard_normal((2, 5, 4)).astype(np.float32)
    t = RNG.standard_normal((2, 5, 4)).astype(np.float32)
    cos = (p * t).sum(-1) / np.linalg.norm(p, axis=-1) / np.linalg.norm(t, axis=-1)
    np.testing.assert_allclose(float(L.distillation_loss(p, t)), np.mean(1 - cos), rtol=1e-5)
    assert abs(float(L.distillation_loss(p, 3 * p))) < 1e-6


def test_balancer_gives_each_loss_its_weight_share_of_the_normalised_gradient():
    g = {"a": RNG.standard_normal((2, 10)).astype(np.float32), "b": 100 * RNG.standard_normal((2, 10)).astype(
        np.float32)}
    w = {"a": 1.0, "b": 3.0}
    ema = {"a": np.float32(0.5), "b": np.float32(50.0)}
    out, new_sum, count, norms = L.balance({k: jnp.asarray(v) for k, v in g.items()}, w, ema, jnp.float32(2.0), 0.9)
    want, want_sum = 0.0, {}
    for k in g:
        norm = np.linalg.norm(g[k], axis=1).mean()
        want_sum[k] = 0.9 * ema[k] + norm
        want = want + w[k] / 4 * g[k] / (want_sum[k] / (0.9 * 2 + 1))
        np.testing.assert_allclose(float(norms[k]), norm, rtol=1e-5)
        np.testing.assert_allclose(float(new_sum[k]), want_sum[k], rtol=1e-5)
    np.testing.assert_allclose(float(count), 2.8, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4)
