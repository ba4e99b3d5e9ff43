"""Quality cost of the int8 serving options (int8 KV cache, int8 weights, both) against the bf16 LM.

    python -m benchmarks.int8_quality --preset bench_111m --frames 200 --batch 4 --out runs/int8q

For each variant the LM streams the same frames as the bf16 run (`lm.generate.run`, greedy), teacher-forced to
the bf16 run's tokens so that both see the same history at every frame, and we compare the logits frame by frame:

- drift: max / mean |logits - bf16 logits| (text head and the depformer's audio heads), also relative to the
  bf16 logits' standard deviation, and the mean KL(bf16 || int8) of the softmaxes;
- greedy agreement (teacher-forced): the share of (item, frame[, codebook]) where the variant's argmax equals
  the bf16 argmax;
- free-running: the variant generates on its own (greedy, same user codes) and we report the share of tokens
  equal to the bf16 run's and the mean number of frames before an item's first differing token.

The "float32" row runs the same weights in float32: its distance to the bf16 run is bf16's own rounding
error, the scale against which to read the int8 rows.

Random weights (`engine.random_lm_params`, seeded) stand in for a trained model: the drift is what quantization
does to this network's activations; agreement on a trained model (sharper distributions) is expected to be
higher. The user's codes are uniform random tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

#: name -> (kv_cache_dtype, weight_dtype); "float32" is the same LM in float32 (params and compute): its distance
#: to the bf16 run is bf16's own rounding error, the scale to read the int8 rows against.
VARIANTS = {"int8 KV": ("int8", None), "int8 weights": (None, "int8"), "int8 KV + weights": ("int8", "int8"),
            "float32": (None, None)}


def _drift(ref: np.ndarray, out: np.ndarray) -> dict:
    """ref / out [..., V] float32 logits -> drift measures over all leading positions."""
    d = np.abs(out - ref)
    lr, lo = jax.nn.log_softmax(jnp.asarray(ref), -1), jax.nn.log_softmax(jnp.asarray(out), -1)
    kl = np.asarray(jnp.sum(jnp.exp(lr) * (lr - lo), -1))
    std = float(ref.std())
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "max_rel_std": float(d.max() / std),
            "mean_rel_std": float(d.mean() / std), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agree": float((out.argmax(-1) == ref.argmax(-1)).mean())}


def _first_divergence(ref_tokens: np.ndarray, tokens: np.ndarray) -> float:
    """[B, K, T] token grids -> mean over items of the first frame where any stream differs (T if none)."""
    differs = (ref_tokens != tokens).any(axis=1)  # [B, T]
    T = differs.shape[1]
    return float(np.mean([np.argmax(row) if row.any() else T for row in differs]))


def compare(lm_cfg, raw_params, frames: int, batch: int, seed: int = 0, variants=tuple(VARIANTS)) -> dict:
    """Run the bf16 reference and each variant over `frames` frames at batch `batch`; the measures per variant."""
    from moshi_jax.lm import generate as gen
    from moshi_jax.nn import quant
    from moshi_jax.nn.sampling import SamplingConfig

    greedy = SamplingConfig(use_sampling=False)
    n_user = lm_cfg.n_q - lm_cfg.dep_q
    user = jnp.asarray(np.random.default_rng(seed).integers(0, lm_cfg.card, (batch, n_user, frames)), jnp.int32)
    sp = gen.prepare_streaming_params(raw_params, lm_cfg)
    t0 = time.perf_counter()
    _, ref = gen.run(sp, gen.init_gen_state(lm_cfg, batch), user, None, cfg=lm_cfg, sampling=greedy,
                     return_logits=True)
    ref = jax.tree.map(np.asarray, ref)
    res = {"frames": frames, "batch": batch, "lm_param_bytes": {"bf16": quant.nbytes(sp)},
           "state_bytes": {"bf16": quant.nbytes(gen.init_gen_state(lm_cfg, batch).temporal)},
           "ref_s": round(time.perf_counter() - t0, 1), "variants": {}}
    ref_tokens = np.concatenate([ref.sampled_text[:, None], ref.sampled_audio], axis=1)  # [B, 1 + dep_q, T]
    for name in variants:
        kv, w = VARIANTS[name]
        t0 = time.perf_counter()
        cfg = lm_cfg.with_dtypes("float32", "float32") if name == "float32" else lm_cfg
        if name == "float32":
            vp = gen.prepare_streaming_params(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), raw_params), cfg)
        else:
            vp = gen.prepare_streaming_params(raw_params, cfg, weight_dtype=w) if w else sp
        state = gen.init_gen_state(cfg, batch, kv_cache_dtype=kv)
        _, forced = gen.run(vp, state, user, None, cfg=cfg, sampling=greedy, forced_text=ref.sampled_text,
                            forced_audio=ref.sampled_audio, return_logits=True)
        _, free = gen.run(vp, state, user, None, cfg=cfg, sampling=greedy)
        forced, free = jax.tree.map(np.asarray, forced), jax.tree.map(np.asarray, free)
        free_tokens = np.concatenate([free.sampled_text[:, None], free.sampled_audio], axis=1)
        r = {"text": _drift(ref.text_logits, forced.text_logits)}
        if lm_cfg.dep_q:
            r["audio"] = _drift(ref.audio_logits, forced.audio_logits)
        r["free_running_token_agree"] = float((free_tokens == ref_tokens).mean())
        r["free_running_frames_to_first_difference"] = _first_divergence(ref_tokens, free_tokens)
        r["lm_param_bytes"] = quant.nbytes(vp)
        r["state_bytes"] = quant.nbytes(state.temporal)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        res["variants"][name] = r
        del vp
    return res


def markdown(res: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines += ["| variant | LM params | KV state | text logits: max / mean abs (x std) | text KL | text top-1 | "
              "audio logits: max / mean abs (x std) | audio KL | audio top-1 | free-running tokens equal | "
              "frames to 1st difference |", "|---" * 11 + "|"]
    pb, sb = res["lm_param_bytes"]["bf16"], res["state_bytes"]["bf16"]
    lines.append(f"| bf16 | {pb / 2**20:.1f} MiB | {sb / 2**20:.1f} MiB | - | - | - | - | - | - | - | - |")
    for name, r in res["variants"].items():
        t, a = r["text"], r.get("audio")
        cells = [name, f"{r['lm_param_bytes'] / 2**20:.1f} MiB ({r['lm_param_bytes'] / pb:.2f}x)",
                 f"{r['state_bytes'] / 2**20:.1f} MiB ({r['state_bytes'] / sb:.2f}x)",
                 f"{t['max_abs']:.3g} / {t['mean_abs']:.3g} ({t['max_rel_std']:.3f} / {t['mean_rel_std']:.4f})",
                 f"{t['kl_mean']:.2e}", f"{100 * t['top1_agree']:.1f}%"]
        if a is not None:
            cells += [f"{a['max_abs']:.3g} / {a['mean_abs']:.3g} ({a['max_rel_std']:.3f} / {a['mean_rel_std']:.4f})",
                      f"{a['kl_mean']:.2e}", f"{100 * a['top1_agree']:.1f}%"]
        else:
            cells += ["-", "-", "-"]
        cells += [f"{100 * r['free_running_token_agree']:.1f}%",
                  f"{r['free_running_frames_to_first_difference']:.1f} of {res['frames']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.int8_quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench_111m", help="LM preset: tiny, bench_111m, moshi_7b (random weights)")
    p.add_argument("--frames", type=int, default=200, help="streamed frames (80 ms each)")
    p.add_argument("--batch", type=int, default=4, help="conversations per run")
    p.add_argument("--seed", type=int, default=0, help="weights / user codes seed")
    p.add_argument("--dtype", default="bfloat16", help="the reference LM's dtype (params and compute)")
    p.add_argument("--out", type=Path, default=None, help="write results.json / results.md here")
    args = p.parse_args(argv)
    from moshi_jax.engine.engine import preset_configs, random_lm_params

    _, lm_cfg = preset_configs(args.preset)
    lm_cfg = lm_cfg.with_dtypes(args.dtype, args.dtype)
    print(f"{args.preset} ({args.dtype}), {args.frames} frames x batch {args.batch} ...", file=sys.stderr, flush=True)
    res = compare(lm_cfg, random_lm_params(lm_cfg, args.seed), args.frames, args.batch, args.seed)
    res.update(preset=args.preset, dtype=args.dtype, backend=jax.default_backend())
    md = markdown(res, f"int8 quality vs {args.dtype}: {args.preset}, random weights, {args.frames} frames x "
                       f"batch {args.batch} (`python -m benchmarks.int8_quality --preset {args.preset} "
                       f"--frames {args.frames} --batch {args.batch}`)\n")
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(res, indent=2))
        (args.out / "results.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
