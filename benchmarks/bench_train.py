"""Train-step throughput: moshi-jax vs the reference PyTorch LMModel, same config, same weights, same run.

One optimizer step = forward on a [B, 17, T] token grid + moshi-finetune loss (text CE with PAD weight +
audio CE with the semantic multiplier) + backward + global-norm clip + AdamW. moshi-jax runs its real
train step (`moshi_jax.training.step`, jitted, state donated, one device = all host cores); the reference is
`moshi.models.lm.LMModel` with the identical weights (exported from it and imported here), the same loss
written out as in moshi-finetune, `clip_grad_norm_` and `torch.optim.AdamW`. Both in float32 (default), or both
computing in bfloat16 with `--dtype bfloat16` (moshi-jax: float32 master weights cast inside the step; the
reference: its module cast to bf16, AdamW on the bf16 params), or each in its own with `--ref-dtype`.

    python -m benchmarks.bench_train                          # bench_111m, B=4, T=256 (the issue's setting)
    python -m benchmarks.bench_train --dtype bfloat16 --ref-dtype float32   # our default recipe vs the f32 ref
    python -m benchmarks.bench_train --config tiny --batch 8 --frames 64 --no-reference

The timed steps alternate (ours, reference, ours, ...) so that on a shared machine both see the same
background load. Reports steady-state step time (median), frames/s (B*T per step; x9 for text + 8
predicted audio tokens), the ratio, JAX compile time apart, the first-step loss of both (they must agree:
same weights, same batch; bf16: close, not equal), and achieved model FLOP/s over the box's measured matmul
peak in each side's dtype.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _measure_matmul_peak(dtype: str = "float32", n: int = 2048, iters: int = 5) -> dict:
    """Best matmul FLOP/s of this box in `dtype` (float32 accumulation), with XLA (all host cores) and torch."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    out = {}
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32), dtype)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(iters))
    out["xla"] = 2 * n ** 3 / best
    try:
        import torch

        t = torch.randn(n, n).to(getattr(torch, dtype))
        t @ t
        out["torch"] = 2 * n ** 3 / min(_timed(lambda: t @ t) for _ in range(iters))
    except ImportError:
        pass
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _reference_loss(out, codes, dep_q: int, text_padding_weight: float, first_codebook_weight_multiplier: float,
                    pad_ids: tuple[int, int]):
    """moshi-finetune train.py + finetune/loss.py compute_loss_with_mask, written out."""
    import torch
    import torch.nn.functional as F

    def masked(logits, target, mask, weights):
        target = torch.where(mask, target, torch.zeros_like(target))
        logits = logits.reshape(-1, logits.size(-1)).float()
        ce = F.cross_entropy(logits, target.reshape(-1), reduction="none")
        w = weights.reshape(-1)
        ce = torch.where(w > 0.0, ce * w, torch.zeros_like(ce))
        return ce.sum() / w.sum()

    text_t = codes[:, :1]
    tw = out.text_mask.float()
    safe_text = torch.where(out.text_mask, text_t, torch.zeros_like(text_t))
    for i in pad_ids:
        tw[safe_text == i] *= text_padding_weight
    aw = out.mask.float()
    aw[:, 0] *= first_codebook_weight_multiplier
    text_loss = masked(out.text_logits, text_t, out.text_mask, tw)
    audio_loss = masked(out.logits, codes[:, 1:1 + dep_q], out.mask, aw)
    return text_loss + audio_loss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="100m", help="configs/ preset whose LM is timed (100m = bench_111m)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=256, help="T, frames per sequence")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step) per implementation")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the reference")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype of both (moshi-jax keeps float32 master weights; the reference model is cast)")
    p.add_argument("--ref-dtype", default=None, choices=("float32", "bfloat16"),
                   help="compute dtype of the reference (default: --dtype). `--dtype bfloat16 --ref-dtype float32` "
                        "compares moshi-jax's default mixed-precision recipe with the float32 reference")
    p.add_argument("--remat", default="none", help="moshi-jax remat policy (none | full | dots | dots_no_batch)")
    p.add_argument("--no-reference", action="store_true", help="time moshi-jax only")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="keep glibc's default malloc (returns big freed buffers to the OS: page faults every step)")
    p.add_argument("--json", default=None, help="write results as JSON here")
    args = p.parse_args(argv)
    ref_dtype = args.ref_dtype or args.dtype
    from benchmarks.common import keep_freed_memory

    # re-execs once, before any work, so that it applies to both (only as a command: argv None)
    keep_freed_memory(not args.no_malloc_tuning and argv is None)

    import jax
    import numpy as np

    from benchmarks.common import Row, machine_info, print_table, write_results
    from moshi_jax.lm import checkpoint as lm_checkpoint
    from moshi_jax.training import config as config_lib
    from moshi_jax.training.mesh import LOGICAL_AXIS_RULES, make_mesh
    from moshi_jax.training.optimizer import make_optimizer, make_schedule
    from moshi_jax.training.step import ShardedStep, make_train_step
    from moshi_jax.training.train_lm import lm_program, synthetic_codes
    from moshi_jax.training.train_state import build_state_spec, count_params, init_from_params, init_train_state

    B, T = args.batch, args.frames
    lr = 3e-4
    cfg = config_lib.load_config(args.config, [
        f"data.batch_size={B}", f"data.seq_frames={T}", f"compute_dtype={args.dtype}", f"remat={args.remat}",
        "data.builtin=random", "optimizer.schedule=constant", "optimizer.warmup_steps=0", f"optimizer.lr={lr}",
        "optimizer.microbatches=1", "lora.enabled=false"])
    lm_cfg = config_lib.build_lm_config(cfg)
    mesh = make_mesh((1, 1, 1))
    program = lm_program(cfg, lm_cfg)
    codes = next(synthetic_codes(lm_cfg, B, T, 0))["codes"]
    tx = make_optimizer(cfg.optimizer, cfg.steps)
    spec = build_state_spec(program.task, tx, mesh, LOGICAL_AXIS_RULES)
    n_params = count_params(spec.abstract_params)
    print(f"config {args.config} ({cfg.model.preset}): {n_params / 1e6:.1f}M params, batch {B} x {T} frames, "
          f"{args.dtype}, remat {args.remat}; jax devices: {jax.devices()}; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES')}", flush=True)

    ref = None
    if not args.no_reference:
        import torch
        from moshi.models import loaders

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        ref = loaders.get_moshi_lm(None, lm_kwargs=lm_cfg.to_reference_kwargs(), device="cpu", dtype=torch.float32)
        ref.train()
        sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
        ref = ref.to(getattr(torch, ref_dtype))  # bfloat16: AdamW directly on bf16 params (cheaper than master copies)
        params = lm_checkpoint.load_reference(sd, lm_cfg)
        state, frozen = init_from_params(spec, params, tx, cfg.seed)
    else:
        state, frozen = init_train_state(spec, program.task, tx, cfg.seed)

    step = ShardedStep(make_train_step(program.task, spec.partition, tx, make_schedule(cfg.optimizer, cfg.steps),
                                       compute_dtype=args.dtype), spec, program.batch_shardings(mesh))
    batch = {"codes": jax.device_put(codes, program.batch_shardings(mesh)["codes"])}

    holder = {"state": state}

    def one_jax_step() -> float:
        holder["state"], m = step(holder["state"], batch, frozen)
        return float(m["loss"])  # blocks until the step is done

    t0 = time.perf_counter()
    jax_first_loss = one_jax_step()
    first = time.perf_counter() - t0

    one_ref_step = None
    ref_first_loss = None
    if ref is not None:
        import torch

        codes_t = torch.tensor(np.asarray(codes), dtype=torch.long)
        opt = torch.optim.AdamW(ref.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        pad_ids = (lm_cfg.existing_text_padding_id, lm_cfg.existing_text_end_padding_id)

        def one_ref_step() -> float:
            out = ref(codes_t)
            loss = _reference_loss(out, codes_t, lm_cfg.dep_q, cfg.loss.text_padding_weight,
                                   cfg.loss.first_codebook_weight_multiplier, pad_ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.optimizer.grad_clip)
            opt.step()
            return float(loss.detach())

        ref_first_loss = one_ref_step()  # warm-up (allocator, thread pool)
        print(f"first-step loss: moshi-jax {jax_first_loss:.5f}, reference {ref_first_loss:.5f}", flush=True)

    # Interleaved (ours, reference, ours, ...): on a shared machine both see the same background load.
    dtypes = sorted({args.dtype, ref_dtype})
    peaks_before = {dt: _measure_matmul_peak(dt) for dt in dtypes}
    times: list[float] = []
    ref_times: list[float] = []
    for _ in range(args.steps):
        times.append(_timed(one_jax_step))
        if one_ref_step is not None:
            ref_times.append(_timed(one_ref_step))
    jax_step = statistics.median(times)
    jax_compile = max(first - jax_step, 0.0)
    ref_step = statistics.median(ref_times) if ref_times else None
    print(f"moshi-jax: first step {first:.2f}s (compile + run), steady {jax_step:.3f}s/step "
          f"(samples {', '.join(f'{t:.3f}' for t in times)})", flush=True)
    if ref_times:
        print(f"reference: steady {ref_step:.3f}s/step (samples {', '.join(f'{t:.3f}' for t in ref_times)})",
              flush=True)

    peaks = {dt: {k: max(v, _measure_matmul_peak(dt).get(k, 0.0)) for k, v in peaks_before[dt].items()}
             for dt in dtypes}  # best of before / after the timed steps
    peak, ref_peak = max(peaks[args.dtype].values()), max(peaks[ref_dtype].values())
    frames = B * T
    tokens = frames * (1 + lm_cfg.dep_q)
    rows = [Row("train step (fwd+bwd+AdamW)", jax_step, ref_step, jax_compile,
                note=f"B={B}, T={T}, ours {args.dtype} / ref {ref_dtype}")]
    title = (f"Train step, {cfg.model.preset} ({n_params / 1e6:.1f}M params), moshi-jax {args.dtype} vs reference "
             f"{ref_dtype}, 2-core CPU box")
    print()
    print_table(title, rows)
    print()
    print("| measure | moshi-jax | reference | speed-up (ref time / ours) |")
    print("|---|---|---|---|")
    speedup = f"{ref_step / jax_step:.2f}x" if ref_step else "-"
    ref_fps = f"{frames / ref_step:.0f}" if ref_step else "-"
    ref_tps = f"{tokens / ref_step:.0f}" if ref_step else "-"
    print(f"| frames/s (B*T per step) | {frames / jax_step:.0f} | {ref_fps} | {speedup} |")
    print(f"| tokens/s (x{1 + lm_cfg.dep_q}: text + {lm_cfg.dep_q} audio) | {tokens / jax_step:.0f} | {ref_tps} | "
          f"{speedup} |")
    flops = program.flops_per_step
    print(f"| model FLOP/s (analytic {flops:.3g} FLOPs/step) | {flops / jax_step:.3g} | "
          f"{flops / ref_step:.3g} | |" if ref_step else f"| model FLOP/s | {flops / jax_step:.3g} | - | |")
    ref_frac = f"{flops / ref_step / ref_peak:.1%} of {ref_peak:.3g} ({ref_dtype})" if ref_step else "-"
    print(f"| fraction of measured matmul peak | {flops / jax_step / peak:.1%} of {peak:.3g} ({args.dtype}) | "
          f"{ref_frac} | |")
    for dt in dtypes:
        print(f"matmul peak ({dt}, 2048^3): " + ", ".join(f"{k} {v:.3g} FLOP/s" for k, v in peaks[dt].items()))
    print("note: the CPU is shared with other jobs; numbers are noisy (medians of "
          f"{args.steps} steps).")
    write_results(args.json, title, rows, {
        "frames_per_s": {"ours": frames / jax_step, "reference": frames / ref_step if ref_step else None},
        "tokens_per_s": {"ours": tokens / jax_step, "reference": tokens / ref_step if ref_step else None},
        "speedup": ref_step / jax_step if ref_step else None, "model_flops_per_step": flops,
        "matmul_peak_flops": peaks, "first_step_loss": {"ours": jax_first_loss, "reference": ref_first_loss},
        "samples_s": {"ours": times, "reference": ref_times}, "machine": machine_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
