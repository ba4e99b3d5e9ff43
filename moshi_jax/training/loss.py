"""The Moshi LM training loss, as moshi-finetune (`finetune/loss.py compute_loss_with_mask` + `train.py`).

    loss, metrics = lm_loss(outputs, codes, lm_cfg, text_padding_weight=0.5, first_codebook_weight_multiplier=100.)

total = text_loss + audio_loss, each a weighted mean of per-position cross-entropies (float32 logits):
- text_loss: targets = codes[:, 0] (the text stream), weights = text_mask, times `text_padding_weight` where the
  target is PAD (`existing_text_padding_id`) or EPAD (`existing_text_end_padding_id`); sum(w * ce) / sum(w).
- audio_loss: targets = codes[:, 1:1 + dep_q] (the model's own codebooks; the user streams are input only),
  weights = audio_mask, times `first_codebook_weight_multiplier` on codebook 0 (semantic); sum(w * ce) / sum(w).
Targets equal to -1 (no token) never count, whatever the model's mask says (the reference ANDs its masks with
`codes != -1`). One deviation: when a stream has no valid target at all (e.g. a batch without text alignments),
its loss is 0 instead of the reference's 0/0 = NaN, so such batches still train the other stream.

Metrics (all float32 scalars, masked means): text_loss, audio_loss (the two weighted terms above),
semantic_loss and acoustic_loss (plain mean CE of codebook 0 and of codebooks 1.., unweighted), and
text_accuracy / audio_accuracy (top-1, unweighted over valid positions; a tie for the top logit counts as a hit).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def _ce_and_hits(logits: Array, targets: Array, mask: Array) -> tuple[Array, Array]:
    """(per-position CE, top-1 hit) in one pass over the logits: the max that stabilises the logsumexp also
    decides the hit (target logit == max; an argmax would be a second, index-tracking reduction over V)."""
    if logits.shape[:-1] != targets.shape or targets.shape != mask.shape:
        raise ValueError(f"cross_entropy: logits {logits.shape}, targets {targets.shape} and mask {mask.shape} "
                         f"do not line up (want [..., V], [...], [...])")
    logits = logits.astype(jnp.float32)
    safe = jnp.where(mask, targets, 0).astype(jnp.int32)
    top = jnp.max(logits, axis=-1)
    shift = jax.lax.stop_gradient(top)  # the usual logsumexp stabiliser (its gradient cancels exactly)
    log_z = shift + jnp.log(jnp.sum(jnp.exp(logits - shift[..., None]), axis=-1))
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return jnp.where(mask, log_z - picked, 0.0), mask & (picked >= top)


def cross_entropy(logits: Array, targets: Array, mask: Array) -> Array:
    """Per-position CE `[...]` in float32: logits `[..., V]`, int targets `[...]`, bool mask `[...]`; 0 where
    masked (the targets there may be anything, e.g. -1; masked logits may be any finite values)."""
    return _ce_and_hits(logits, targets, mask)[0]


def _weighted_mean(values: Array, weights: Array) -> Array:
    total = jnp.sum(values * weights)
    norm = jnp.sum(weights)
    # 0 (not NaN) for a stream with no valid target; the inner where keeps the gradient finite too.
    return jnp.where(norm > 0, total / jnp.where(norm > 0, norm, 1.0), 0.0)


def _accuracy(hits: Array, mask: Array) -> Array:
    return _weighted_mean(hits.astype(jnp.float32), mask.astype(jnp.float32))


def lm_loss(outputs: Any, codes: Array, lm_cfg: Any, text_padding_weight: float = 0.5,
            first_codebook_weight_multiplier: float = 1.0) -> tuple[Array, dict[str, Array]]:
    """moshi-finetune's loss of one batch.

    outputs: an `LMOutput` (text_logits [B, 1, T, text_card], text_mask [B, 1, T], audio_logits
      [B, dep_q, T, card], audio_mask [B, dep_q, T]), aligned with `codes` (no shift needed).
    codes: int [B, 1 + n_q, T], text first, -1 = no token.
    lm_cfg: needs `dep_q`, `existing_text_padding_id`, `existing_text_end_padding_id`.
    Returns (scalar float32 loss, metrics dict of float32 scalars).
    """
    dep_q = lm_cfg.dep_q
    B, K, T = codes.shape
    if K < 1 + dep_q:
        raise ValueError(f"codes have {K} streams; the loss needs the text stream and dep_q={dep_q} audio streams")
    want = {"text_logits": (B, 1, T), "text_mask": (B, 1, T), "audio_logits": (B, dep_q, T),
            "audio_mask": (B, dep_q, T)}
    for name, shape in want.items():
        got = tuple(getattr(outputs, name).shape)
        # masks exactly [B, K, T], logits [B, K, T, card]: a shape that merely broadcasts is a caller's bug
        if got[:3] != shape or len(got) != (4 if name.endswith("logits") else 3):
            raise ValueError(f"lm_loss: outputs.{name} has shape {got}; with codes {codes.shape} and dep_q={dep_q} "
                             f"it should be {shape} (+ the vocabulary for logits): logits, masks and codes do not "
                             "line up")
    text_t = codes[:, :1]
    text_mask = outputs.text_mask & (text_t >= 0)
    text_ce, text_hits = _ce_and_hits(outputs.text_logits, text_t, text_mask)
    pad_ids = (lm_cfg.existing_text_padding_id, lm_cfg.existing_text_end_padding_id)
    is_pad = (text_t == pad_ids[0]) | (text_t == pad_ids[1])
    text_w = text_mask.astype(jnp.float32) * jnp.where(is_pad, text_padding_weight, 1.0)
    text_loss = _weighted_mean(text_ce, text_w)
    metrics = {"text_loss": text_loss, "text_accuracy": _accuracy(text_hits, text_mask)}
    loss = text_loss

    if dep_q:
        audio_t = codes[:, 1:1 + dep_q]
        audio_mask = outputs.audio_mask & (audio_t >= 0)
        audio_ce, audio_hits = _ce_and_hits(outputs.audio_logits, audio_t, audio_mask)
        mask_f = audio_mask.astype(jnp.float32)
        cb_mult = jnp.ones((dep_q,), jnp.float32).at[0].set(first_codebook_weight_multiplier)
        audio_loss = _weighted_mean(audio_ce, mask_f * cb_mult[None, :, None])
        loss = loss + audio_loss
        metrics.update(
            audio_loss=audio_loss,
            semantic_loss=_weighted_mean(audio_ce[:, 0], mask_f[:, 0]),
            acoustic_loss=_weighted_mean(audio_ce[:, 1:], mask_f[:, 1:]),
            audio_accuracy=_accuracy(audio_hits, audio_mask),
        )
    return loss, metrics
