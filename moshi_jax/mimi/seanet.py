"""SEANet encoder / decoder (reference `moshi.modules.seanet`), causal and streaming, channels-last.

Every module is `__call__(x, state) -> (y, state)`: `state=None` runs one-shot (fresh padding, no
state returned); otherwise `state` is the dict built by `init_encoder_state` / `init_decoder_state`
(same nesting as the modules) and the returned dict continues the stream.

Encoder: conv_in -> [res_i (ResBlock) -> ELU -> down_i (strided conv)] for the reversed ratios -> ELU ->
conv_out. Decoder: conv_in -> [ELU -> up_i (transposed conv) -> res_i] for the ratios -> ELU -> conv_out.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from moshi_jax.mimi.config import MimiConfig
from moshi_jax.nn.conv import (
    StreamingConv1d,
    StreamingConvTranspose1d,
    init_conv_state,
    init_conv_transpose_state,
)

Array = jax.Array
State = dict[str, Any] | None


def elu(x: Array) -> Array:
    return jax.nn.elu(x, alpha=1.0)


def _sub(state: State, name: str):
    return None if state is None else state[name]


def _res_name(stage: int, j: int) -> str:
    return f"res_{stage}_{j}"


class ResBlock(nn.Module):
    """x + conv2(ELU(conv1(ELU(x)))): conv1 kernel `kernel_size` (dilated) C -> C/compress, conv2 kernel 1
    back to C. Identity shortcut (`true_skip`)."""

    dim: int
    kernel_size: int
    dilation: int
    compress: int

    @nn.compact
    def __call__(self, x: Array, state: State = None) -> tuple[Array, State]:
        hidden = self.dim // self.compress
        h, s1 = StreamingConv1d(self.dim, hidden, self.kernel_size, dilation=self.dilation, name="conv1")(
            elu(x), _sub(state, "conv1"))
        h, s2 = StreamingConv1d(hidden, self.dim, 1, name="conv2")(elu(h), _sub(state, "conv2"))
        return x + h, (None if state is None else {"conv1": s1, "conv2": s2})


def _res_state(cfg: MimiConfig, batch: int, dim: int, j: int) -> dict:
    return {
        "conv1": init_conv_state(batch, dim, cfg.residual_kernel_size, 1, cfg.dilation_base ** j),
        "conv2": init_conv_state(batch, dim // cfg.compress, 1),
    }


class SEANetEncoder(nn.Module):
    """wav `[B, T, 1]` (T a multiple of hop_length) -> latent `[B, T / hop_length, dimension]`."""

    cfg: MimiConfig

    @nn.compact
    def __call__(self, x: Array, state: State = None) -> tuple[Array, State]:
        cfg = self.cfg
        new: dict[str, Any] = {}
        x, new["conv_in"] = StreamingConv1d(cfg.channels, cfg.n_filters, cfg.kernel_size, name="conv_in")(
            x, _sub(state, "conv_in"))
        ch = cfg.n_filters
        for i, ratio in enumerate(reversed(cfg.ratios)):
            for j in range(cfg.n_residual_layers):
                name = _res_name(i, j)
                x, new[name] = ResBlock(ch, cfg.residual_kernel_size, cfg.dilation_base ** j, cfg.compress,
                                        name=name)(x, _sub(state, name))
            x, new[f"down_{i}"] = StreamingConv1d(ch, 2 * ch, 2 * ratio, stride=ratio, name=f"down_{i}")(
                elu(x), _sub(state, f"down_{i}"))
            ch *= 2
        x, new["conv_out"] = StreamingConv1d(ch, cfg.dimension, cfg.last_kernel_size, name="conv_out")(
            elu(x), _sub(state, "conv_out"))
        return x, (None if state is None else new)


def init_encoder_state(cfg: MimiConfig, batch: int) -> dict:
    state: dict[str, Any] = {"conv_in": init_conv_state(batch, cfg.channels, cfg.kernel_size)}
    ch = cfg.n_filters
    for i, ratio in enumerate(reversed(cfg.ratios)):
        for j in range(cfg.n_residual_layers):
            state[_res_name(i, j)] = _res_state(cfg, batch, ch, j)
        state[f"down_{i}"] = init_conv_state(batch, ch, 2 * ratio, ratio)
        ch *= 2
    state["conv_out"] = init_conv_state(batch, ch, cfg.last_kernel_size)
    return state


class SEANetDecoder(nn.Module):
    """latent `[B, F, dimension]` -> wav `[B, F * hop_length, 1]`."""

    cfg: MimiConfig

    @nn.compact
    def __call__(self, x: Array, state: State = None) -> tuple[Array, State]:
        cfg = self.cfg
        new: dict[str, Any] = {}
        ch = cfg.n_filters * 2 ** len(cfg.ratios)
        x, new["conv_in"] = StreamingConv1d(cfg.dimension, ch, cfg.kernel_size, name="conv_in")(
            x, _sub(state, "conv_in"))
        for i, ratio in enumerate(cfg.ratios):
            x, new[f"up_{i}"] = StreamingConvTranspose1d(ch, ch // 2, 2 * ratio, ratio, name=f"up_{i}")(
                elu(x), _sub(state, f"up_{i}"))
            ch //= 2
            for j in range(cfg.n_residual_layers):
                name = _res_name(i, j)
                x, new[name] = ResBlock(ch, cfg.residual_kernel_size, cfg.dilation_base ** j, cfg.compress,
                                        name=name)(x, _sub(state, name))
        x, new["conv_out"] = StreamingConv1d(ch, cfg.channels, cfg.last_kernel_size, name="conv_out")(
            elu(x), _sub(state, "conv_out"))
        return x, (None if state is None else new)


def init_decoder_state(cfg: MimiConfig, batch: int) -> dict:
    ch = cfg.n_filters * 2 ** len(cfg.ratios)
    state: dict[str, Any] = {"conv_in": init_conv_state(batch, cfg.dimension, cfg.kernel_size)}
    for i, ratio in enumerate(cfg.ratios):
        state[f"up_{i}"] = init_conv_transpose_state(batch, ch // 2, 2 * ratio, ratio)
        ch //= 2
        for j in range(cfg.n_residual_layers):
            state[_res_name(i, j)] = _res_state(cfg, batch, ch, j)
    state["conv_out"] = init_conv_state(batch, ch, cfg.last_kernel_size)
    return state
