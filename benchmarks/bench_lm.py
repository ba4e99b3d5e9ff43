"""LM streaming generation speed: moshi-jax vs the reference PyTorch `LMGen`, same weights, same run.

One greedy generation step = one 80 ms frame: delay cache, temporal transformer (one position, KV ring
of `context` slots), text head, and the dep_q depth-transformer steps. The reference is
`moshi.models.lm.LMGen(lm, use_sampling=False)` built from random weights; moshi-jax imports the very
same weights and runs `moshi_jax.lm.generate.step` (jitted, state donated). Both in float32.

    python -m benchmarks.bench_lm                        # bench_111m (dim 512 x 6, depformer 256 x 4), B=1 and 8
    python -m benchmarks.bench_lm --config tiny --batch 1 --no-reference

Reports the steady-state step median after warm-up, the ratio, and JAX compile time apart (first call
minus steady state). Before timing, both generate the same greedy tokens for a few steps (checked).
"""

from __future__ import annotations

import argparse
import os
import sys


def _full_ring_state(state, cfg):
    """`state` as if `context + 7` frames had been generated: every ring slot holds a valid past key."""
    import jax.numpy as jnp

    n = cfg.temporal.context + 7
    C = cfg.temporal.context
    slots = jnp.arange(C)
    pos = (n - 1) - ((n - 1 - slots) % C)  # the latest position p <= n - 1 with p % C == slot
    layers = tuple(c.replace(positions=jnp.broadcast_to(pos, c.positions.shape)) for c in state.temporal.layers)
    # two distinct buffers: the step donates its state, and a buffer cannot be donated twice
    temporal = state.temporal.replace(offset=jnp.full_like(state.offsets, n), layers=layers)
    return state.replace(temporal=temporal, offsets=jnp.full_like(state.offsets, n),
                         cache=jnp.zeros_like(state.cache))


def _bench_batch(B: int, cfg, params, ref_lm, args) -> list:
    """Rows for one batch size: ours vs the reference, then ours with a full KV ring."""
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.common import Row, time_fn
    from moshi_jax.lm import generate as G
    from moshi_jax.lm import model as M
    from moshi_jax.nn.sampling import SamplingConfig

    greedy = SamplingConfig.greedy()
    user = np.random.default_rng(B).integers(0, cfg.card, (B, cfg.n_q - cfg.dep_q)).astype(np.int32)
    user_j = jnp.asarray(user)
    state = G.init_gen_state(cfg, B)
    tokens = []

    sparams = G.prepare_streaming_params(params, cfg)  # once, as a server would (per-layer / per-step buffers)

    def ours():
        nonlocal state
        state, out = G.step_donated(sparams, state, user_j, None, cfg=cfg, sampling=greedy)
        tokens.append(out.sampled_text)
        return out.sampled_audio

    first, ours_s, _ = time_fn(ours, warmup=args.warmup, iters=args.steps)
    ours_tokens = np.asarray(jnp.stack(tokens[: args.check_steps]))

    ref_s = None
    note = f"{M.param_count(params) / 1e6:.1f}M params"
    if ref_lm is not None:
        import torch
        from moshi.models.lm import LMGen

        ref_tokens = []
        gen = LMGen(ref_lm, use_sampling=False, on_text_hook=lambda t: ref_tokens.append(t.numpy().copy()))
        tuser = torch.from_numpy(user.astype(np.int64))[:, :, None]
        with torch.no_grad(), gen.streaming(B):
            _, ref_s, _ = time_fn(lambda: gen.step(tuser), warmup=args.warmup, iters=args.steps)
        if args.check_steps:
            same = np.array_equal(np.stack(ref_tokens[: args.check_steps]), ours_tokens)
            note += ", greedy text tokens " + ("identical" if same else "DIFFER")
            if not same:
                print("WARNING: greedy tokens differ between the reference and moshi-jax", file=sys.stderr)
    rows = [Row(f"greedy step, batch {B}", ours_s, ref_s, first - ours_s, note=note)]

    # Our attention only visits the ring chunks that hold keys, so early in a conversation it is cheaper;
    # the reference always attends over the whole ring. Same step with a ring full of past frames:
    state = _full_ring_state(G.init_gen_state(cfg, B), cfg)
    _, full_s, _ = time_fn(ours, warmup=args.warmup, iters=args.steps)
    rows.append(Row(f"greedy step, batch {B}, KV ring full ({cfg.temporal.context} past frames)", full_s, ref_s,
                    None, note="reference cost does not depend on the fill (always the whole ring)"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="bench_111m", help="LMConfig preset (bench_111m, tiny, ...)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes to time")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measure (after warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the reference")
    p.add_argument("--check-steps", type=int, default=4, help="steps whose greedy tokens must agree (0: skip)")
    p.add_argument("--no-reference", action="store_true", help="time moshi-jax only")
    p.add_argument("--json", default=None, help="write results as JSON here")
    args = p.parse_args(argv)

    import jax

    from benchmarks.common import Row, print_table, write_results
    from moshi_jax.lm import model as M
    from moshi_jax.lm.config import LMConfig

    cfg = getattr(LMConfig, args.config)()

    ref_lm = None
    if not args.no_reference:
        import torch
        from moshi.models import loaders

        from moshi_jax.lm import checkpoint as ck

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        ref_lm = loaders.get_moshi_lm(None, lm_kwargs=cfg.to_reference_kwargs(), dtype=torch.float32)
        ref_lm.eval()
        params = ck.load_reference(ref_lm.state_dict(), cfg)
    else:
        import flax.linen as nn

        params = nn.unbox(jax.jit(M.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0)))
    params = jax.device_put(params)

    rows: list[Row] = []
    for B in args.batch:
        rows += _bench_batch(B, cfg, params, ref_lm, args)

    title = (f"LM streaming generation ({args.config}, float32, CPU x{os.cpu_count()}, "
             f"torch threads {args.threads})")
    print_table(title, rows)
    write_results(args.json, title, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
