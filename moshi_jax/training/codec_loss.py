"""Codec training losses: adversarial (hinge / least squares), feature matching, multi-scale mel and L1
reconstruction, semantic distillation, SI-SNR, and EnCodec's gradient balancer.

Shapes: audio is [B, T] float32; discriminator outputs are lists (one per scale) of logit maps and of
feature-map lists. Every loss is a scalar mean; multi-scale losses are averaged over their scales.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moshi_jax.mimi.discriminator import stft

Array = jax.Array


# ----------------------------------------------------------------------------------------------- adversarial


def generator_adv_loss(fake_logits: list[Array], kind: str = "hinge") -> Array:
    """hinge: mean(relu(1 - D(G(x)))); lsgan: mean((1 - D(G(x)))^2); averaged over the discriminators."""
    if kind == "hinge":
        per = [jnp.mean(jax.nn.relu(1.0 - f)) for f in fake_logits]
    elif kind == "lsgan":
        per = [jnp.mean(jnp.square(1.0 - f)) for f in fake_logits]
    else:
        raise ValueError(f"unknown adversarial loss {kind!r} (hinge | lsgan)")
    return sum(per) / len(per)


def discriminator_loss(real_logits: list[Array], fake_logits: list[Array], kind: str = "hinge") -> Array:
    """hinge: mean(relu(1 - D(x))) + mean(relu(1 + D(G(x)))); lsgan: mean((1 - D(x))^2) + mean(D(G(x))^2);
    averaged over the discriminators."""
    per = []
    for r, f in zip(real_logits, fake_logits, strict=True):
        if kind == "hinge":
            per.append(jnp.mean(jax.nn.relu(1.0 - r)) + jnp.mean(jax.nn.relu(1.0 + f)))
        elif kind == "lsgan":
            per.append(jnp.mean(jnp.square(1.0 - r)) + jnp.mean(jnp.square(f)))
        else:
            raise ValueError(f"unknown adversarial loss {kind!r} (hinge | lsgan)")
    return sum(per) / len(per)


def feature_matching_loss(real_fmaps: list[list[Array]], fake_fmaps: list[list[Array]]) -> Array:
    """Mean over every discriminator layer of mean|real - fake| / mean|real| (EnCodec's normalised feature
    matching); the real activations are constants (stop_gradient)."""
    terms = []
    for rs, fs in zip(real_fmaps, fake_fmaps, strict=True):
        for r, f in zip(rs, fs, strict=True):
            r = jax.lax.stop_gradient(r)
            terms.append(jnp.mean(jnp.abs(r - f)) / (jnp.mean(jnp.abs(r)) + 1e-8))
    return sum(terms) / len(terms)


# ----------------------------------------------------------------------------------------------- reconstruction


def hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=32)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
                   ) -> np.ndarray:
    """Triangular HTK-mel filters, float32 [n_fft // 2 + 1, n_mels] (unnormalised peaks of 1)."""
    fmax = sample_rate / 2 if fmax is None else fmax
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    up = (freqs[:, None] - lo) / np.maximum(mid - lo, 1e-9)
    down = (hi - freqs[:, None]) / np.maximum(hi - mid, 1e-9)
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


def mel_spectrogram(wav: Array, sample_rate: int, n_fft: int, n_mels: int) -> Array:
    """Magnitude mel spectrogram [B, frames, n_mels] (STFT hop n_fft / 4)."""
    mag = jnp.abs(stft(wav, n_fft, n_fft // 4))
    return mag @ mel_filterbank(sample_rate, n_fft, n_mels)


def multiscale_mel_loss(wav: Array, wav_hat: Array, sample_rate: int, scales=(512, 1024, 2048), n_mels: int = 64,
                        floor: float = 1e-5) -> Array:
    """Mean over the FFT sizes of mean|mel - mel_hat| + mean|log(max(mel, floor)) - log(max(mel_hat, floor))|."""
    terms = []
    for n_fft in scales:
        m = mel_spectrogram(wav, sample_rate, n_fft, n_mels)
        mh = mel_spectrogram(wav_hat, sample_rate, n_fft, n_mels)
        terms.append(jnp.mean(jnp.abs(m - mh))
                     + jnp.mean(jnp.abs(jnp.log(jnp.maximum(m, floor)) - jnp.log(jnp.maximum(mh, floor)))))
    return sum(terms) / len(terms)


def l1_loss(wav: Array, wav_hat: Array) -> Array:
    return jnp.mean(jnp.abs(wav - wav_hat))


def mel_distance(wav: Array, wav_hat: Array, sample_rate: int, n_fft: int = 1024, n_mels: int = 64,
                 floor: float = 1e-5) -> Array:
    """Evaluation metric: mean |log10 mel - log10 mel_hat| (one FFT size), per example [B]."""
    m = jnp.log10(jnp.maximum(mel_spectrogram(wav, sample_rate, n_fft, n_mels), floor))
    mh = jnp.log10(jnp.maximum(mel_spectrogram(wav_hat, sample_rate, n_fft, n_mels), floor))
    return jnp.mean(jnp.abs(m - mh), axis=(1, 2))


def si_snr(ref: Array, est: Array, eps: float = 1e-8) -> Array:
    """Scale-invariant SNR in dB per example [B] (both signals made zero-mean)."""
    ref = ref - jnp.mean(ref, axis=-1, keepdims=True)
    est = est - jnp.mean(est, axis=-1, keepdims=True)
    target = jnp.sum(est * ref, -1, keepdims=True) / (jnp.sum(ref * ref, -1, keepdims=True) + eps) * ref
    noise = est - target
    return 10.0 * jnp.log10((jnp.sum(target * target, -1) + eps) / (jnp.sum(noise * noise, -1) + eps))


# ----------------------------------------------------------------------------------------------- distillation


def distillation_loss(pred: Array, teacher: Array, eps: float = 1e-8) -> Array:
    """Mean over frames of 1 - cos(pred, teacher); pred and teacher [B, F, D]."""
    num = jnp.sum(pred * teacher, axis=-1)
    den = jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(teacher, axis=-1) + eps
    return jnp.mean(1.0 - num / den)


# ----------------------------------------------------------------------------------------------- balancer


def balance(grads: dict[str, Array], weights: dict[str, float], ema_sum: dict[str, Array], ema_count: Array,
            decay: float, total_norm: float = 1.0, eps: float = 1e-12) -> tuple[Array, dict, Array, dict]:
    """EnCodec's gradient balancer on the gradients of several losses w.r.t. the same output (the audio).

    Each loss's gradient norm (per example, averaged over the batch) is tracked by a bias-corrected EMA
    (ema_sum_t = decay * ema_sum + norm, count_t = decay * count + 1, avg = ema_sum / count); the combined
    gradient is sum_i (w_i / sum w) * total_norm * g_i / (avg_i + eps), so each loss contributes its weight's
    share of the gradient whatever its scale. Returns (combined grad, new ema_sum, new count, norms)."""
    count = decay * ema_count + 1.0
    total_w = sum(weights[k] for k in grads)
    out, new_sum, norms = 0.0, {}, {}
    for k, g in grads.items():
        norm = jnp.mean(jnp.sqrt(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=-1)))
        new_sum[k] = decay * ema_sum[k] + norm
        avg = new_sum[k] / count
        out = out + (weights[k] / total_w) * total_norm * g / (avg + eps)
        norms[k] = norm
    return out, new_sum, count, norms
