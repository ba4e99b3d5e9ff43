"""Delay / undelay of the multi-stream token grid (reference `lm_utils._delay_sequence` / `_undelay_sequence`
and the input rule of `LMModel.forward`).

Stream k with delay d is shifted right by d along time; its first d positions hold the stream's initial
token. The model input then prepends one column of initial tokens, so input position t holds stream k at
time t - 1 - d_k. Predictions are rolled back by -d_k; the last d_k positions have no prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


def initial_tokens(text_initial: int, audio_initial: int, n_q: int) -> Array:
    """`[1 + n_q]` int32: the text initial token, then the audio initial token for every audio stream."""
    return jnp.asarray([text_initial] + [audio_initial] * n_q, jnp.int32)


def _check(delays: Sequence[int], K: int, initial: Array | None = None) -> None:
    """One delay (and one initial token) per stream, never fewer or more: an index past the end of `initial`
    would be clamped by jax, i.e. silently give the wrong token."""
    if len(delays) != K:
        raise ValueError(f"{len(delays)} delays for {K} streams")
    if initial is not None and initial.shape != (K,):
        raise ValueError(f"initial tokens have shape {tuple(initial.shape)}; want one per stream, ({K},)")


def delay(codes: Array, delays: Sequence[int], initial: Array) -> Array:
    """codes `[B, K, T]`, one delay per stream, initial `[K]` -> delayed `[B, K, T]`:
    out[:, k, t] = codes[:, k, t - d_k] for t >= d_k, else initial[k]."""
    B, K, T = codes.shape
    _check(delays, K, initial)
    rows = []
    for k, d in enumerate(delays):
        fill = jnp.full((B, min(d, T)), initial[k], codes.dtype)
        rows.append(jnp.concatenate([fill, codes[:, k, : T - min(d, T)]], axis=1))
    return jnp.stack(rows, axis=1)


def model_input(codes: Array, delays: Sequence[int], initial: Array) -> Array:
    """codes `[B, K, T]` -> `[B, K, T + 1]`: a column of initial tokens, then the delayed codes. The
    temporal transformer reads `[..., :-1]` (position t sees times <= t - 1 - d_k); the depth transformer is
    teacher-forced with `[..., 1:]` (the tokens being predicted at each position)."""
    B, K, _ = codes.shape
    _check(delays, K, initial)
    first = jnp.broadcast_to(initial.astype(codes.dtype)[None, :, None], (B, K, 1))
    return jnp.concatenate([first, delay(codes, delays, initial)], axis=2)


def undelay(x: Array, delays: Sequence[int], fill_value: float = 0.0) -> tuple[Array, Array]:
    """x `[B, K, T, ...]` in the delayed domain -> (x aligned with the codes, mask `[B, K, T]` bool): stream k
    is moved back by d_k; its last d_k positions get `fill_value` and mask False."""
    B, K, T = x.shape[:3]
    _check(delays, K)
    if K == 0:
        return x, jnp.ones((B, 0, T), bool)
    rows, masks = [], []
    for k, d in enumerate(delays):
        d = min(d, T)
        tail = jnp.full((B, d) + x.shape[3:], fill_value, x.dtype)
        rows.append(jnp.concatenate([x[:, k, d:], tail], axis=1))
        masks.append(jnp.arange(T) < T - d)
    mask = jnp.broadcast_to(jnp.stack(masks)[None], (B, K, T))
    return jnp.stack(rows, axis=1), mask
