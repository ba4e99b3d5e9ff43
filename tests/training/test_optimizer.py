"""Optimizer: schedules and AdamW + clipping match moshi-finetune's torch setup step for step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moshi_jax.training.config import OptimizerConfig
from moshi_jax.training.optimizer import make_optimizer, make_schedule


@pytest.mark.parity
@pytest.mark.parametrize("total,pct", [(100, 0.05), (37, 0.3), (2000, 0.05)])
def test_one_cycle_schedule_equals_torch_onecyclelr(total, pct):
    import torch

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2e-6)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-6, total_steps=total, pct_start=pct)
    ref = []
    for _ in range(total):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = make_schedule(OptimizerConfig(lr=2e-6, schedule="one_cycle", pct_start=pct), total)
    got = np.asarray(jax.vmap(ours)(jnp.arange(total)))
    # float32 step arithmetic (torch uses float64): relative error ~2e-5 at the far tail.
    np.testing.assert_allclose(got, np.asarray(ref), rtol=1e-4, atol=0)


def test_cosine_schedule_warms_up_then_decays_to_min_ratio():
    cfg = OptimizerConfig(lr=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    s = make_schedule(cfg, 100)
    assert float(s(0)) == 0.0
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(5)) == pytest.approx(0.5)
    assert float(s(100)) == pytest.approx(0.1)
    values = np.asarray(jax.vmap(s)(jnp.arange(10, 101)))
    assert np.all(np.diff(values) <= 1e-7)


@pytest.mark.parity
def test_adamw_with_clipping_matches_torch_for_five_steps():
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    shapes = {"w": (6, 5), "b": (5,), "n": (3,)}
    init = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: (rng.normal(size=s) * 3).astype(np.float32) for k, s in shapes.items()} for _ in range(5)]
    total = 10
    cfg = OptimizerConfig(lr=1e-2, schedule="one_cycle", pct_start=0.3)

    tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
    topt = torch.optim.AdamW(list(tparams.values()), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    tsched = torch.optim.lr_scheduler.OneCycleLR(topt, max_lr=cfg.lr, total_steps=total, pct_start=0.3)
    tx = make_optimizer(cfg, total)
    params = jax.tree.map(jnp.asarray, init)
    state = tx.init(params)
    for g in grads:
        for k, p in tparams.items():
            p.grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(list(tparams.values()), 1.0)
        topt.step()
        tsched.step()
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
    for k in shapes:
        np.testing.assert_allclose(np.asarray(params[k]), tparams[k].detach().numpy(), rtol=1e-5, atol=1e-6)


def test_grad_clip_zero_disables_clipping_and_positive_clips_to_max_norm():
    p = {"w": jnp.zeros(3)}
    big = {"w": jnp.array([100.0, 0.0, 0.0])}
    first_moment = {}
    for clip in (0.0, 1.0):
        tx = make_optimizer(OptimizerConfig(lr=1.0, schedule="constant", grad_clip=clip, weight_decay=0.0), 10)
        _, state = tx.update(big, tx.init(p), p)
        first_moment[clip] = float(optax.tree_utils.tree_get(state, "mu")["w"][0])
    # mu = (1 - b1) * g with b1 = 0.9: unclipped g = 100, clipped to global norm 1.
    assert first_moment[0.0] == pytest.approx(0.1 * 100.0)
    assert first_moment[1.0] == pytest.approx(0.1 * 1.0)
