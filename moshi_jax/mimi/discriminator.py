"""Multi-scale STFT discriminator (EnCodec's MS-STFTD, which Mimi's paper uses) and the STFT it reads.

    disc = MultiScaleSTFTDiscriminator(scales=(2048, 1024, 512), filters=32)
    params = disc.init(key, wav)["params"]                 # wav [B, T] float
    logits, fmaps = disc.apply({"params": params}, wav)    # one logit map and one feature-map list per scale

Each scale is a 2-D conv net over the complex STFT (real and imaginary parts as 2 channels, time x frequency,
Hann window of n_fft, hop n_fft / 4, centred with reflect padding, magnitude-normalised by the window's L2
norm as torchaudio's `normalized=True`): conv (3, 9) -> 3 convs (3, 9) with frequency stride 2 and time
dilations 1, 2, 4 -> conv (3, 3) -> a 1-channel (3, 3) output conv; LeakyReLU(0.2) after every conv but the
last, whose activations are the feature maps for feature matching. EnCodec wraps the convs in weight norm;
we do not (a reparametrisation, same function class). The convs are `Conv2d` below (flax `nn.Conv`'s params
and init, computed by `nn.conv.conv_nd`, which folds the frequency stride into the channels on CPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moshi_jax.nn.conv import conv_nd

Array = jax.Array


class Conv2d(nn.Module):
    """flax `nn.Conv` for 2-D channels-last inputs (same param names, shapes and init), no groups:
    x [B, H, W, C_in] -> [B, H', W', features]."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    kernel_dilation: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        y = conv_nd(x, kernel.astype(x.dtype), self.strides, self.padding, self.kernel_dilation)
        return y + bias.astype(y.dtype)


def hann_window(n: int) -> np.ndarray:
    """Periodic Hann window (torch.hann_window's default), float32 [n]."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


def stft(wav: Array, n_fft: int, hop: int, normalized: bool = False) -> Array:
    """Centred STFT with reflect padding and a periodic Hann window of length n_fft (torch.stft with
    center=True, pad_mode='reflect', onesided): wav [B, T] -> complex [B, frames, n_fft // 2 + 1],
    frames = T // hop + 1. `normalized` divides by the window's L2 norm."""
    if wav.shape[-1] <= n_fft // 2:
        raise ValueError(f"audio of {wav.shape[-1]} samples is too short for an STFT of size {n_fft}")
    x = jnp.pad(wav, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    n_frames = 1 + (x.shape[-1] - n_fft) // hop
    idx = np.arange(n_frames)[:, None] * hop + np.arange(n_fft)[None, :]
    win = hann_window(n_fft)
    spec = jnp.fft.rfft(x[:, idx] * win, axis=-1)
    if normalized:
        spec = spec / np.sqrt(np.sum(win * win))
    return spec


class STFTDiscriminator(nn.Module):
    """One scale: wav [B, T] -> (logits [B, frames, freq'], feature maps [B, frames, freq_i, C_i] list)."""

    n_fft: int
    filters: int = 32
    kernel: tuple[int, int] = (3, 9)
    dilations: Sequence[int] = (1, 2, 4)

    @nn.compact
    def __call__(self, wav: Array) -> tuple[Array, list[Array]]:
        spec = stft(wav.astype(jnp.float32), self.n_fft, self.n_fft // 4, normalized=True)
        z = jnp.stack([spec.real, spec.imag], axis=-1)  # [B, time, freq, 2]
        kt, kf = self.kernel

        def conv(x, k, stride=(1, 1), dilation=(1, 1), features=None, name=None):
            pads = tuple(((kk - 1) * d // 2, (kk - 1) * d // 2) for kk, d in zip(k, dilation, strict=True))
            return Conv2d(features or self.filters, k, strides=stride, padding=pads, kernel_dilation=dilation,
                          name=name)(x)

        fmaps = []
        z = nn.leaky_relu(conv(z, (kt, kf), name="conv_in"), 0.2)
        fmaps.append(z)
        for i, d in enumerate(self.dilations):
            z = nn.leaky_relu(conv(z, (kt, kf), stride=(1, 2), dilation=(d, 1), name=f"conv_{i}"), 0.2)
            fmaps.append(z)
        z = nn.leaky_relu(conv(z, (kt, kt), name="conv_last"), 0.2)
        fmaps.append(z)
        logits = conv(z, (kt, kt), features=1, name="conv_post")[..., 0]
        return logits, fmaps


class MultiScaleSTFTDiscriminator(nn.Module):
    """One `STFTDiscriminator` per FFT size: wav [B, T] -> ([logits per scale], [feature maps per scale])."""

    scales: Sequence[int] = (2048, 1024, 512, 256, 128)
    filters: int = 32

    @nn.compact
    def __call__(self, wav: Array) -> tuple[list[Array], list[list[Array]]]:
        logits, fmaps = [], []
        for n_fft in self.scales:
            lg, fm = STFTDiscriminator(n_fft, self.filters, name=f"stft_{n_fft}")(wav)
            logits.append(lg)
            fmaps.append(fm)
        return logits, fmaps
