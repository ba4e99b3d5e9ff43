"""Causal streaming 1D convolutions (channels-last), and `conv_nd`, a strided N-D conv chosen per backend.

One code path serves one-shot and streaming use: one-shot is a single streaming call from the
initial state, exactly as in the reference (`moshi.modules.conv`). Shapes are channels-last:
inputs `[B, T, C]`, kernels `[K, C_in / groups, C_out]` (Flax/XLA `WIO` layout).
"""

from __future__ import annotations

import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moshi_jax.nn import backend

Array = jax.Array
PadMode = Literal["constant", "replicate"]


@struct.dataclass
class ConvState:
    """Left context of a causal conv: the last `effective_kernel - stride` input samples."""

    previous: Array  # [B, K_eff - S, C_in]
    first: Array  # [B] bool: next call is the first since init/reset (replicate padding only)


@struct.dataclass
class ConvTransposeState:
    """Overlap-add tail of a transposed conv: the last `K - S` output samples, bias excluded."""

    partial: Array  # [B, K - S, C_out]


def conv_context(kernel_size: int, stride: int, dilation: int = 1) -> int:
    """Samples of left context a causal conv keeps: (k - 1) * dilation + 1 - stride."""
    ctx = (kernel_size - 1) * dilation + 1 - stride
    if ctx < 0:
        raise ValueError(f"kernel {kernel_size} (dilation {dilation}) shorter than stride {stride}")
    return ctx


def init_conv_state(
    batch_size: int, in_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1,
    dtype: jnp.dtype = jnp.float32,
) -> ConvState:
    ctx = conv_context(kernel_size, stride, dilation)
    return ConvState(
        previous=jnp.zeros((batch_size, ctx, in_channels), dtype),
        first=jnp.ones((batch_size,), jnp.bool_),
    )


def init_conv_transpose_state(
    batch_size: int, out_channels: int, kernel_size: int, stride: int, dtype: jnp.dtype = jnp.float32
) -> ConvTransposeState:
    return ConvTransposeState(partial=jnp.zeros((batch_size, kernel_size - stride, out_channels), dtype))


def conv_nd(x: Array, kernel: Array, strides: tuple[int, ...], padding: tuple[tuple[int, int], ...],
            dilation: tuple[int, ...] | None = None) -> Array:
    """Channels-last conv, no groups: x `[B, *spatial, C_in]`, kernel `[*k, C_in, C_out]` -> `[B, *out, C_out]`,
    as `lax.conv_general_dilated` with these window strides, explicit padding and kernel dilation.

    With `backend.choices().strided_conv == "polyphase"` (CPU) every strided axis (dilation 1 there) is folded
    into the channels: input position `s * j + r` becomes position j, channel block r, and the kernel tap
    `s * m + r` becomes tap m of block r (zero taps fill the last block), so one stride-1 conv computes the same
    sums. Its input gradient is then a plain conv instead of a zero-stuffed one.
    """
    n = x.ndim - 2
    if not 1 <= n <= 3:
        raise ValueError(f"conv_nd: {n} spatial axes (1 to 3)")
    spatial = "DHW"[-n:]
    dilation = tuple(dilation or (1,) * n)
    fold = [a for a in range(n) if strides[a] > 1 and dilation[a] == 1]
    if backend.choices().strided_conv == "polyphase" and fold:
        x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
        padding = ((0, 0),) * n
        for a in fold:
            s, k, length = strides[a], kernel.shape[a], x.shape[1 + a]
            n_out, taps = (length - k) // s + 1, -(-k // s)
            keep = s * (n_out + taps - 1)  # whole phase groups covering every window
            if keep > length:
                x = jnp.pad(x, [(0, 0)] * (1 + a) + [(0, keep - length)] + [(0, 0)] * (n - a))
            x = jax.lax.slice_in_dim(x, 0, keep, axis=1 + a)
            x = x.reshape(*x.shape[:1 + a], keep // s, s, *x.shape[2 + a:])  # [..., j, r, ..., C]
            x = jnp.moveaxis(x, 2 + a, -2)
            x = x.reshape(*x.shape[:-2], s * x.shape[-1])  # channel r * C + c
            kernel = jnp.pad(kernel, [(0, 0)] * a + [(0, taps * s - k)] + [(0, 0)] * (n + 1 - a))
            kernel = kernel.reshape(*kernel.shape[:a], taps, s, *kernel.shape[a + 1:])  # [..., m, r, ..., Ci, O]
            kernel = jnp.moveaxis(kernel, a + 1, -3)
            kernel = kernel.reshape(*kernel.shape[:-3], s * kernel.shape[-2], kernel.shape[-1])
        strides = tuple(1 if a in fold else st for a, st in enumerate(strides))
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=padding, rhs_dilation=dilation,
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))


_FEW = 4  # a streaming call with at most this many output steps computes the conv as one matmul


def _few_outputs_conv(xp: Array, kernel: Array, stride: int, n_out: int) -> Array:
    """VALID conv of xp `[B, T, C]` with kernel `[K, C, O]` for `n_out` (few) outputs as one matmul over the
    stacked windows `[B, n_out, K * C]`: the kernel is read in place as `[K * C, O]` (a streamed frame is
    bound by reading weights; XLA's conv path reads them slower for one or two outputs)."""
    K, C, n_o = kernel.shape
    windows = jnp.stack([xp[:, i * stride: i * stride + K] for i in range(n_out)], axis=1)
    return jnp.einsum("bnx,xo->bno", windows.reshape(xp.shape[0], n_out, K * C), kernel.reshape(K * C, n_o))


class StreamingConv1d(nn.Module):
    """Causal Conv1d: left pad (zeros, or copies of the first frame for `replicate`), no right pad.

    `__call__(x [B, T, C_in], state) -> (y [B, T / stride, C_out], state)`; `T` must be a multiple of
    the stride. With `state=None` the call is one-shot (fresh state) and returns `(y, None)`.
    """

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    use_bias: bool = True
    pad_mode: PadMode = "constant"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, state: ConvState | None = None) -> tuple[Array, ConvState | None]:
        B, T, C = x.shape
        if C != self.in_channels:
            raise ValueError(f"{self.name}: expected {self.in_channels} channels, got {C}")
        if T == 0 or T % self.stride:
            raise ValueError(f"{self.name}: length {T} is not a positive multiple of stride {self.stride}")
        _check_groups(self.name, self.in_channels, self.out_channels, self.groups)
        fan_in = self.in_channels // self.groups * self.kernel_size
        bound = 1.0 / math.sqrt(fan_in)  # PyTorch's default conv init, so from-scratch runs match it
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_uniform(bound), ("conv_kernel", "conv_in", "conv_out")),
            (self.kernel_size, self.in_channels // self.groups, self.out_channels),
            self.param_dtype,
        )
        one_shot = state is None
        if one_shot:
            state = init_conv_state(B, C, self.kernel_size, self.stride, self.dilation, x.dtype)
        ctx = state.previous.shape[1]
        previous = state.previous.astype(x.dtype)
        if ctx and self.pad_mode == "replicate":
            if T < ctx:
                # (checked on every call: whether this is the first one is only known at run time)
                raise ValueError(f"{self.name}: replicate padding needs >= {ctx} samples per call")
            previous = jnp.where(state.first[:, None, None], jnp.broadcast_to(x[:, :1], previous.shape),
                                 previous)
        xp = jnp.concatenate([previous, x], axis=1) if ctx else x
        n_out = (xp.shape[1] - (self.kernel_size - 1) * self.dilation - 1) // self.stride + 1
        if self.groups == 1 and self.dilation == 1 and n_out <= _FEW:
            y = _few_outputs_conv(xp, kernel.astype(self.dtype), self.stride, n_out)
        else:
            y = jax.lax.conv_general_dilated(
                xp, kernel.astype(self.dtype), window_strides=(self.stride,), padding="VALID",
                rhs_dilation=(self.dilation,), dimension_numbers=("NWC", "WIO", "NWC"),
                feature_group_count=self.groups,
            )
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(_uniform(bound), ("conv_out",)),
                              (self.out_channels,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        if one_shot:
            return y, None
        new_state = ConvState(previous=xp[:, xp.shape[1] - ctx:], first=jnp.zeros_like(state.first))
        return y, new_state


class StreamingConvTranspose1d(nn.Module):
    """Causal ConvTranspose1d: output length `T * stride`; the `K - S` overhang is kept as an
    overlap-add tail for the next call (streaming) or dropped (one-shot), as in the reference.

    Computed as one matmul (per group) plus a shifted sum over `ceil(K / S)` frames, which avoids the
    zero-stuffed (lhs-dilated) convolution XLA would otherwise run. The kernel is stored
    `[C_in, K, C_out / G]` (the reference's `[C_in, C_out / G, K]` with the last two axes swapped) so
    that for G = 1 the matmul reads it in place as `[C_in, K * C_out]`: with few input frames (streaming)
    the layer is bound by reading its weights, and any per-call re-layout of a large kernel dominated.
    """

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    groups: int = 1
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, state: ConvTransposeState | None = None
    ) -> tuple[Array, ConvTransposeState | None]:
        B, T, C = x.shape
        K, S, G = self.kernel_size, self.stride, self.groups
        if C != self.in_channels:
            raise ValueError(f"{self.name}: expected {self.in_channels} channels, got {C}")
        if K < S:
            raise ValueError(f"{self.name}: kernel {K} shorter than stride {S}")
        _check_groups(self.name, self.in_channels, self.out_channels, G)
        fan_in = self.out_channels // G * K  # PyTorch computes ConvTranspose fan-in from weight dim 1
        bound = 1.0 / math.sqrt(fan_in)
        # [C_in, K, C_out / G]: the group of an input channel is c // (C_in / G).
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_uniform(bound), ("conv_in", "conv_kernel", "conv_out")),
            (self.in_channels, K, self.out_channels // G),
            self.param_dtype,
        ).astype(self.dtype)
        cin_g, cout_g = self.in_channels // G, self.out_channels // G
        if G == 1:
            z = (x.reshape(B * T, C) @ kernel.reshape(C, K * cout_g)).reshape(B, T, K, self.out_channels)
        elif cin_g == 1 and cout_g == 1:  # depthwise: a broadcast product, no contraction
            z = x[:, :, None, :] * kernel[:, :, 0].T
        else:
            kg = kernel.reshape(G, cin_g, K, cout_g)
            z = jnp.einsum("btgi,giko->btkgo", x.reshape(B, T, G, cin_g), kg).reshape(B, T, K, self.out_channels)
        # Overlap-add: output frame (t + j) of length S receives z[:, t, j*S:(j+1)*S].
        n = -(-K // S)
        z = jnp.pad(z, ((0, 0), (0, 0), (0, n * S - K), (0, 0))).reshape(B, T, n, S, self.out_channels)
        y = sum(
            jnp.pad(z[:, :, j], ((0, 0), (j, n - 1 - j), (0, 0), (0, 0))) for j in range(n)
        ).reshape(B, (T + n - 1) * S, self.out_channels)
        y = y[:, : (T - 1) * S + K]  # full transposed-conv output, bias excluded
        tail = K - S
        if state is not None and tail:
            y = y.at[:, :tail].add(state.partial.astype(y.dtype))
        out = y[:, : T * S]
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(_uniform(bound), ("conv_out",)),
                              (self.out_channels,), self.param_dtype)
            out = out + bias.astype(self.dtype)
        if state is None:
            return out, None
        return out, ConvTransposeState(partial=y[:, T * S:])


def _check_groups(name: str | None, in_channels: int, out_channels: int, groups: int) -> None:
    # PyTorch refuses these too; here a group width would silently round down and drop channels.
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(f"{name}: {in_channels} input and {out_channels} output channels "
                         f"are not both divisible by groups={groups}")


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init
