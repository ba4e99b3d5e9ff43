"""Mimi neural audio codec: config, SEANet, split RVQ, model (one-shot + streaming), checkpoint import/export."""

from moshi_jax.mimi.config import MimiConfig
from moshi_jax.mimi.model import MimiCodec, MimiState

__all__ = ["MimiCodec", "MimiConfig", "MimiState"]
