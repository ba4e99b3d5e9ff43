"""AdamW + learning-rate schedules + global-norm clipping, as moshi-finetune (spec 4.2).

moshi-finetune builds `torch.optim.AdamW(model.parameters() if trainable, lr, betas=(0.9, 0.95), eps=1e-8,
weight_decay=0.1)`: weight decay applies to EVERY trainable parameter (norms, embeddings, LoRA factors
alike; no param groups), and we do the same (`decay_mask=None`). Its `OneCycleLR` keeps torch's default
`cycle_momentum=True`, which overrides beta1 (0.95 -> 0.85 -> 0.95 against the LR); we reproduce that.
optax's decoupled decay `p -= lr * (adam + wd * p)` equals torch's `p *= 1 - lr * wd; p -= lr * adam`.
Gradients are clipped to `grad_clip` global norm before the Adam moments (torch `clip_grad_norm_`
before `optimizer.step()`).
Gradient accumulation is done by the train step (an explicit `lax.scan` over microbatches), not here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from moshi_jax.training.config import OptimizerConfig

Schedule = Callable[[jax.Array], jax.Array]


def one_cycle_schedule(max_lr: float, total_steps: int, pct_start: float = 0.05, div_factor: float = 25.0,
                       final_div_factor: float = 1e4) -> Schedule:
    """torch `OneCycleLR(anneal_strategy='cos', three_phase=False)` exactly: cosine from max_lr/div_factor up
    to max_lr over the first `pct_start * total_steps - 1` steps, then cosine down to
    max_lr/div_factor/final_div_factor at step total_steps - 1 (held after that)."""
    initial = max_lr / div_factor
    return _two_phase_cosine(initial, max_lr, initial / final_div_factor, total_steps, pct_start)


def one_cycle_momentum(total_steps: int, pct_start: float = 0.05, base_momentum: float = 0.85,
                       max_momentum: float = 0.95) -> Schedule:
    """torch OneCycleLR's `cycle_momentum`: beta1 goes max -> base -> max along the same two cosine phases."""
    return _two_phase_cosine(max_momentum, base_momentum, max_momentum, total_steps, pct_start)


def _two_phase_cosine(start: float, mid: float, final: float, total_steps: int, pct_start: float) -> Schedule:
    end1 = float(pct_start * total_steps) - 1.0
    end2 = float(total_steps - 1)

    def cos_anneal(start, end, pct):
        # torch: end + (start - end) / 2 * (cos(pi * pct) + 1); the cos^2 form keeps float32 precision near pct=1.
        return end + (start - end) * jnp.square(jnp.cos(0.5 * math.pi * pct))

    def schedule(step):
        step = jnp.minimum(jnp.asarray(step, jnp.float32), end2)
        # torch: phase 1 while step <= end1, else phase 2 (start = end1).
        up = cos_anneal(start, mid, step / end1) if end1 > 0 else jnp.float32(mid)
        down = cos_anneal(mid, final, (step - end1) / max(end2 - end1, 1e-12))
        return jnp.where(step <= end1, up, down)

    return schedule


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> Schedule:
    """The learning rate as a function of the optimizer step (0-based, the step being taken)."""
    if cfg.schedule == "one_cycle":
        return one_cycle_schedule(cfg.lr, total_steps, cfg.pct_start, cfg.div_factor, cfg.final_div_factor)
    if cfg.schedule == "cosine":
        warmup = min(cfg.warmup_steps, total_steps - 1)
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_steps, warmup + 1),
                                                  end_value=cfg.lr * cfg.min_lr_ratio)
    if cfg.schedule == "constant":
        if cfg.warmup_steps <= 0:
            return optax.constant_schedule(cfg.lr)
        return optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def make_optimizer(cfg: OptimizerConfig, total_steps: int, decay_mask=None) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) -> AdamW(schedule). `decay_mask` (pytree of bools or callable) limits weight
    decay; None decays every trainable param, as moshi-finetune."""
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    b1 = cfg.b1
    if cfg.schedule == "one_cycle" and cfg.cycle_momentum:
        b1 = one_cycle_momentum(total_steps, cfg.pct_start, cfg.base_momentum, cfg.max_momentum)
    # inject_hyperparams evaluates the schedules at the optimizer's count, so b1 may vary per step; Adam's bias
    # correction then uses the current beta1 (1 - b1_t ** t), exactly as torch's AdamW does.
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))
    parts.append(adamw(learning_rate=schedule, b1=b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=decay_mask))
    return optax.chain(*parts)
