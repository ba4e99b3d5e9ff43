"""Mimi hyperparameters: one frozen dataclass, the released configuration by default.

Every shape in `moshi_jax.mimi` is derived from a `MimiConfig`; nothing else hard-codes Mimi sizes.
Field names follow the reference's `_seanet_kwargs` / `_quantizer_kwargs` / `_transformer_kwargs`
(`moshi/models/loaders.py`) so the mapping is checkable by eye.
"""

from __future__ import annotations

import dataclasses
import math

from moshi_jax.nn.transformer import TransformerConfig


@dataclasses.dataclass(frozen=True)
class MimiConfig:
    # --- audio / frame rates
    sample_rate: int = 24_000
    channels: int = 1
    frame_rate: float = 12.5  # code frames per second (after the learnt 2x downsampling)

    # --- SEANet encoder / decoder
    dimension: int = 512  # latent width (SEANet output, transformer d_model, quantizer input/output)
    n_filters: int = 64
    n_residual_layers: int = 1
    ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder order; the encoder strides through them reversed
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2

    # --- encoder / decoder transformers (same architecture, separate weights)
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = 250  # sliding attention window in 25 Hz steps (10 s)
    layer_scale: float = 0.01
    max_period: float = 10_000.0

    # --- split residual vector quantizer
    codebook_dim: int = 256
    n_q: int = 32  # total levels: n_q_semantic semantic + the rest acoustic
    n_q_semantic: int = 1
    bins: int = 2048
    num_codebooks: int = 8  # levels used by default (what Moshi uses)
    codebook_epsilon: float = 1e-5  # centroid = embedding_sum / clamp(cluster_usage, epsilon)

    def __post_init__(self):
        if self.channels != 1:
            raise ValueError(f"only mono Mimi is supported, got channels={self.channels}")
        if not 0 < self.n_q_semantic < self.n_q:
            raise ValueError(f"need 0 < n_q_semantic ({self.n_q_semantic}) < n_q ({self.n_q})")
        if not self.n_q_semantic <= self.num_codebooks <= self.n_q:
            raise ValueError(f"num_codebooks {self.num_codebooks} must be in {self.n_q_semantic}..{self.n_q}")
        if self.sample_rate % self.hop_length:
            raise ValueError(f"sample_rate {self.sample_rate} is not a multiple of the SEANet hop {self.hop_length}")
        ratio = self.encoder_frame_rate / self.frame_rate
        if ratio != int(ratio) or ratio < 1:
            raise ValueError(f"encoder frame rate {self.encoder_frame_rate} Hz is not an integer multiple of "
                             f"frame_rate {self.frame_rate} Hz")
        if self.sample_rate / self.frame_rate != self.frame_size:
            raise ValueError(f"sample_rate / frame_rate = {self.sample_rate / self.frame_rate} is not an integer")
        if self.dimension % self.num_heads:
            raise ValueError(f"dimension {self.dimension} not divisible by num_heads {self.num_heads}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def hop_length(self) -> int:
        """Samples per SEANet latent frame (product of the ratios: 960 -> 25 Hz)."""
        return math.prod(self.ratios)

    @property
    def encoder_frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def resample_stride(self) -> int:
        """Latent frames per code frame (25 Hz -> 12.5 Hz: 2)."""
        return int(self.encoder_frame_rate / self.frame_rate)

    @property
    def frame_size(self) -> int:
        """Samples per code frame (1920 = 80 ms at 24 kHz)."""
        return int(self.sample_rate / self.frame_rate)

    @property
    def n_q_acoustic(self) -> int:
        return self.n_q - self.n_q_semantic

    @property
    def transformer(self) -> TransformerConfig:
        """Config of the encoder and of the decoder transformer (`ProjectedTransformer` with d_model =
        dimension, so without input/output projections)."""
        return TransformerConfig(
            d_model=self.dimension,
            num_heads=self.num_heads,
            num_layers=self.num_layers,
            dim_feedforward=self.dim_feedforward,
            causal=True,
            context=self.context,
            norm="layer_norm",
            gating="none",
            activation="gelu",
            layer_scale=self.layer_scale,
            positional_embedding="rope",
            max_period=self.max_period,
        )

    def check_num_codebooks(self, k: int | None) -> int:
        """`k` (None: the default) validated against 1..n_q."""
        k = self.num_codebooks if k is None else int(k)
        if not self.n_q_semantic <= k <= self.n_q:
            raise ValueError(f"num_codebooks must be in {self.n_q_semantic}..{self.n_q}, got {k}")
        return k

    @classmethod
    def tiny(cls, **overrides) -> MimiConfig:
        """A small Mimi for tests and smoke runs: same rates, strides and frame size (1920 samples),
        narrow layers, a 6-step attention window (so streaming passes the window after 3 frames)."""
        kw = dict(
            dimension=16, n_filters=4, num_heads=2, num_layers=2, dim_feedforward=32, context=6,
            codebook_dim=8, bins=64,
        )
        kw.update(overrides)
        return cls(**kw)
