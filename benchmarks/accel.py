"""Accelerator benchmark: the serving and training rows of issues 9 and 10 on whatever device JAX sees, beside the
reference PyTorch package on the same device when it is installed. One command, under 6 minutes on one GPU.

    python -m benchmarks.accel --out runs/accel                 # GPU / TPU: the 7B engine, LM, Mimi, 2b / 7B training
    python -m benchmarks.accel --smoke --out runs/accel_smoke   # CPU smoke run (tiny configs), tested in CI
    python -m benchmarks.accel --sections engine train --train-remat dots --train-microbatches 2

Sections (each in its own process, so JAX and torch never share the device memory; one failing or running out
of memory does not stop the others; each gets what is left of `--budget-s`, in this order):

  env         versions, device, peak FLOP/s and HBM bandwidth used for MFU and the weight-read floor
  engine      our full-duplex engine step (Mimi enc + LM + Mimi dec), bf16 LM, params prepared once (raw stacks
              freed while copying), state donated: p50 / p99 per frame at each batch, compile time apart, peak
              device memory; then the LM step alone at batch 1 against the weight-read floor (LM bytes / HBM B/s)
  ref_engine  the reference on the same device: Mimi streaming encode, LMGen.step (CUDA graphs on a GPU), Mimi
              decode, timed apart, same batches
  mimi_batch  10 s encode / decode (released Mimi config, float32), ours and the reference's
  train       configs/2b full train step (bf16 compute, float32 master weights, AdamW, clip) at B x T frames:
              step time, frames/s, MFU (the analytic model FLOPs / device peak), peak memory; `--train-remat`,
              `--train-microbatches` choose the remat policy and gradient accumulation
  train_ref   the reference's same step (bf16 module, the moshi-finetune loss, clip, AdamW) at `--ref-train-batch`
  train_cpu_tricks  the same configs/2b step with the CPU choices forced (MOSHI_JAX_KERNELS=cpu: materialised
              transposes, see moshi_jax/nn/backend.py) and the layer stacks unrolled (scan_layers=false): the
              "both ways" row; on a GPU / TPU the tricks should cost nothing (or lose), on CPU they win
  lora7b      configs/7b LoRA train step (moshi-finetune's recipe): frames/s (moshi-finetune: ~12k per H100)
  engine_int8 the engine with the int8 KV cache and int8 weights (EngineConfig kv_cache_dtype / weight_dtype) at
              `--int8-batches` (default 1 32 64 96: the sessions bf16 cannot hold), state bytes per session, then
              its quality against bf16 (benchmarks/int8_quality.py: logit drift, greedy agreement) over
              `--int8-frames` frames

`--profile`: the train sections also trace `--profile-steps` steady-state steps with jax.profiler into
`<out>/profile/<section>/` and summarise the top device ops by time (benchmarks/trace_summary.py) into the JSON
and the markdown (open the trace itself in Perfetto / TensorBoard).

Writes results.json (everything) and results.md (the table) in `--out`, after every section.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.common import time_fn

SECTIONS = ("env", "engine", "ref_engine", "train", "lora7b", "mimi_batch", "train_ref", "train_cpu_tricks",
            "engine_int8")
SMOKE_SECTIONS = ("env", "engine", "train", "lora7b", "mimi_batch", "train_cpu_tricks", "engine_int8")
#: seconds a section needs at least to be started (compile + a few steps on one GPU)
NEED_S = {"env": 5, "engine": 60, "ref_engine": 30, "mimi_batch": 20, "train": 45, "train_ref": 30, "lora7b": 45,
          "train_cpu_tricks": 45, "engine_int8": 60}
#: device kind substring -> (dense bf16 FLOP/s, HBM bytes/s) from the vendors' spec sheets
PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12), "L4": (121e12, 0.3e12),
         "TPU v5p": (459e12, 2.765e12), "TPU v5 lite": (197e12, 0.819e12), "TPU v5e": (197e12, 0.819e12),
         "TPU v4": (275e12, 1.228e12), "TPU v6": (918e12, 1.64e12)}


# ------------------------------------------------------------------------------------------------- helpers


def _pct(xs: list[float]) -> dict:
    ms = sorted(x * 1e3 for x in xs)
    return {"median_ms": round(statistics.median(ms), 3), "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 3),
            "min_ms": round(ms[0], 3), "n": len(ms)}


def _peak_mem_gib() -> float | None:
    import jax

    try:
        st = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - a backend without memory stats (CPU)
        return None
    v = st.get("peak_bytes_in_use")
    return None if v is None else round(v / 2**30, 2)


def device_peaks() -> tuple[float | None, float | None]:
    import jax

    kind = jax.devices()[0].device_kind
    for k, v in PEAKS.items():
        if k.lower() in kind.lower():
            return v
    return None, None


def _is_oom(e: BaseException) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


# ------------------------------------------------------------------------------------------------- sections


def sec_env(s: dict) -> dict:
    import jax

    out = {"jax": jax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()][:8],
           "device_kind": jax.devices()[0].device_kind, "smoke": s["smoke"]}
    out["peak_flops"], out["hbm_bytes_per_s"] = device_peaks()
    for m in ("flax", "optax", "torch", "moshi", "numpy"):
        try:
            out[m] = getattr(__import__(m), "__version__", "?")
        except Exception as e:  # noqa: BLE001
            out[m] = f"missing ({type(e).__name__})"
    try:
        import torch

        out["torch_cuda"] = torch.cuda.is_available() and torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    from moshi_jax.nn import backend

    out["kernels"] = str(backend.choices())
    return out


def sec_engine(s: dict) -> dict:
    import flax.linen as nn
    import jax
    import numpy as np

    from moshi_jax.engine.engine import Engine, EngineConfig, preset_configs
    from moshi_jax.lm import generate as gen
    from moshi_jax.lm import model as lm_model
    from moshi_jax.mimi.model import MimiCodec
    from moshi_jax.nn.quant import nbytes
    from moshi_jax.nn.sampling import SamplingConfig

    mimi_cfg, lm_cfg = preset_configs(s["preset"])
    lm_cfg = lm_cfg.with_dtypes("bfloat16", "bfloat16")
    t0 = time.perf_counter()
    raw = nn.unbox(jax.jit(lm_model.init_params, static_argnums=0)(lm_cfg, jax.random.PRNGKey(0)))
    engine = Engine(mimi_cfg, lm_cfg, EngineConfig())  # no tokenizer: text is not decoded here
    params = engine.prepare_params({"mimi": MimiCodec(mimi_cfg).init(jax.random.PRNGKey(1)), "lm": raw},
                                   consume=True)
    del raw
    jax.block_until_ready(params)
    lm_bytes = nbytes(params["lm"])
    out = {"preset": s["preset"], "init_s": round(time.perf_counter() - t0, 1), "lm_param_bytes": lm_bytes,
           "mem_after_params_gib": _peak_mem_gib(), "batches": {}}
    _time_engine(engine, params, s, s["batches"], out)
    # the LM step alone (batch 1) against the weight-read floor
    _, bw = device_peaks()
    try:
        cfg = lm_cfg
        user = jax.numpy.zeros((1, cfg.n_q - cfg.dep_q), jax.numpy.int32)
        state = gen.init_gen_state(cfg, 1)
        key = jax.random.PRNGKey(0)
        h = {"state": state}

        def lm_step():
            h["state"], o = gen.step_donated(params["lm"], h["state"], user, key, cfg=cfg, sampling=SamplingConfig())
            return np.asarray(o.text)

        first, _, times = time_fn(lm_step, warmup=6, iters=s["iters"])  # the first call + 5 more untimed
        r = _pct(times)
        r["compile_s"] = round(first - r["median_ms"] / 1e3, 1)
        if bw:
            r["weight_read_floor_ms"] = round(1e3 * lm_bytes / bw, 3)
            r["x_floor"] = round(r["median_ms"] / r["weight_read_floor_ms"], 2)
        out["lm_B1"] = r
    except Exception as e:  # noqa: BLE001
        out["lm_B1"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def _frame_stepper(engine, params, state, pcm):
    """A no-argument call that runs the donated engine step on the next frame of `pcm` [N, B, frame]."""
    import numpy as np

    active = np.ones(pcm.shape[1], bool)
    h = {"state": state, "i": 0}

    def frame():
        h["state"], o = engine.step_donated(params, h["state"], pcm[h["i"]], active)
        h["i"] += 1
        return np.asarray(o.pcm), np.asarray(o.text_token)

    return frame


def _time_engine(engine, params, s: dict, batches: list[int], out: dict) -> None:
    """p50 / p99 per frame of `engine.step_donated` at each batch, into out["batches"] (and state bytes)."""
    import numpy as np

    from moshi_jax.nn.quant import nbytes

    rng = np.random.default_rng(0)
    iters, warm = s["iters"], 5
    for B in batches:
        if time.monotonic() > s["deadline"] - 20:
            out["batches"][str(B)] = "skipped (time)"
            continue
        try:
            state = engine.init_state(B)
            out[f"state_bytes_B{B}"] = nbytes(state)
            pcm = (0.1 * rng.standard_normal((iters + warm + 1, B, engine.frame_size))).astype(np.float32)
            frame = _frame_stepper(engine, params, state, pcm)
            del state  # donated: `frame` holds the live state
            first, _, times = time_fn(frame, warmup=warm + 1, iters=iters)  # the first call + `warm` untimed
            r = _pct(times)
            r["compile_s"] = round(first - r["median_ms"] / 1e3, 1)
            r["peak_mem_gib"] = _peak_mem_gib()
            r["real_time_80ms"] = r["p99_ms"] <= 80.0
            out["batches"][str(B)] = r
            del frame
        except Exception as e:  # noqa: BLE001
            out["batches"][str(B)] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            if _is_oom(e):
                break


def sec_engine_int8(s: dict) -> dict:
    """The engine with int8 KV + int8 weights at `int8_batches`, then the int8 variants' quality against bf16."""
    import flax.linen as nn
    import jax

    from benchmarks import int8_quality
    from moshi_jax.engine.engine import Engine, EngineConfig, preset_configs, random_lm_params
    from moshi_jax.lm import model as lm_model
    from moshi_jax.mimi.model import MimiCodec
    from moshi_jax.nn.quant import nbytes

    mimi_cfg, lm_cfg = preset_configs(s["preset"])
    lm_cfg = lm_cfg.with_dtypes("bfloat16", "bfloat16")
    t0 = time.perf_counter()
    raw = nn.unbox(jax.jit(lm_model.init_params, static_argnums=0)(lm_cfg, jax.random.PRNGKey(0)))
    engine = Engine(mimi_cfg, lm_cfg, EngineConfig(kv_cache_dtype="int8", weight_dtype="int8"))
    params = engine.prepare_params({"mimi": MimiCodec(mimi_cfg).init(jax.random.PRNGKey(1)), "lm": raw},
                                   consume=True)  # quantized layer by layer while the raw stacks are freed
    del raw
    jax.block_until_ready(params)
    out = {"preset": s["preset"], "kv_cache_dtype": "int8", "weight_dtype": "int8",
           "init_s": round(time.perf_counter() - t0, 1), "lm_param_bytes": nbytes(params["lm"]),
           "mem_after_params_gib": _peak_mem_gib(), "batches": {}}
    _time_engine(engine, params, s, s["int8_batches"], out)
    del params
    try:
        q = int8_quality.compare(lm_cfg, random_lm_params(lm_cfg, 0), s["int8_frames"], 2,
                                 variants=("int8 KV + weights",))
        out["quality"] = q
    except Exception as e:  # noqa: BLE001
        out["quality"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def sec_ref_engine(s: dict) -> dict:
    import torch
    from moshi.models import loaders
    from moshi.models.lm import LMGen

    from moshi_jax.engine.engine import preset_configs

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    mimi_cfg, lm_cfg = preset_configs(s["preset"])
    torch.manual_seed(0)
    lm = loaders.get_moshi_lm(None, lm_kwargs=lm_cfg.to_reference_kwargs(), device=dev, dtype=dt)
    lm.eval()
    mimi = loaders.get_mimi(None, device=dev) if s["preset"] != "tiny" else None
    if mimi is not None:
        mimi.eval()
    out = {"device": dev, "cuda_graphs": dev == "cuda", "batches": {}}
    n_user = lm_cfg.n_q - lm_cfg.dep_q
    for B in s["batches"]:
        if time.monotonic() > s["deadline"] - 15:
            out["batches"][str(B)] = "skipped (time)"
            continue
        try:
            gen = LMGen(lm)
            pcm = 0.1 * torch.randn(s["iters"] + 6, B, 1, mimi_cfg.frame_size, device=dev)
            parts = {"enc": [], "lm": [], "dec": [], "total": []}
            sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
            with torch.no_grad(), gen.streaming(B):
                ctx = mimi.streaming(B) if mimi is not None else None
                if ctx is not None:
                    ctx.__enter__()
                try:
                    for i in range(s["iters"] + 6):
                        t0 = time.perf_counter()
                        codes = (mimi.encode(pcm[i]) if mimi is not None else
                                 torch.randint(0, lm_cfg.card, (B, n_user, 1), device=dev))
                        sync()
                        t1 = time.perf_counter()
                        tok = gen.step(codes[:, :n_user])
                        sync()
                        t2 = time.perf_counter()
                        if tok is not None and mimi is not None:
                            mimi.decode(tok[:, 1:]).cpu()
                        elif tok is not None:
                            tok.cpu()
                        t3 = time.perf_counter()
                        for k, v in zip(("enc", "lm", "dec", "total"), (t1 - t0, t2 - t1, t3 - t2, t3 - t0),
                                        strict=True):
                            parts[k].append(v)
                finally:
                    if ctx is not None:
                        ctx.__exit__(None, None, None)
            out["batches"][str(B)] = {k: _pct(v[6:]) for k, v in parts.items()}
        except Exception as e:  # noqa: BLE001
            out["batches"][str(B)] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            if _is_oom(e):
                break
    return out


def sec_mimi_batch(s: dict) -> dict:
    import jax
    import numpy as np

    from moshi_jax.mimi.config import MimiConfig
    from moshi_jax.mimi.model import MimiCodec

    cfg = MimiConfig.tiny() if s["smoke"] else MimiConfig()
    seconds = 1 if s["smoke"] else 10
    x = (0.1 * np.random.default_rng(0).standard_normal((1, 1, cfg.sample_rate * seconds))).astype(np.float32)
    out = {"seconds": seconds}

    def timeit(fn, n):
        return _pct(time_fn(fn, warmup=1, iters=n)[2])

    n = 2 if s["smoke"] else 10
    codec = MimiCodec(cfg)
    params = codec.init(jax.random.PRNGKey(0))
    xj = jax.device_put(x)
    codes = codec.encode(params, xj)
    out["ours_encode"] = timeit(lambda: np.asarray(codec.encode(params, xj)), n)
    out["ours_decode"] = timeit(lambda: np.asarray(codec.decode(params, codes)), n)
    if s["reference"] and not s["smoke"]:
        try:
            import torch
            from moshi.models import loaders

            dev = "cuda" if torch.cuda.is_available() else "cpu"
            ref = loaders.get_mimi(None, device=dev)
            ref.eval()
            xt = torch.from_numpy(x).to(dev)
            with torch.no_grad():
                rc = ref.encode(xt)
                out["ref_encode"] = timeit(lambda: ref.encode(xt).cpu(), n)
                out["ref_decode"] = timeit(lambda: ref.decode(rc).cpu(), n)
        except Exception as e:  # noqa: BLE001
            out["ref"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def _train_setup(config: str, B: int, T: int, remat: str, microbatches: int, lora: bool, scan_layers: bool = True):
    from moshi_jax.training import config as config_lib
    from moshi_jax.training.train_lm import lm_program, synthetic_codes

    over = [f"data.batch_size={B}", f"data.seq_frames={T}", "compute_dtype=bfloat16", f"remat={remat}",
            "data.builtin=random", "optimizer.schedule=constant", "optimizer.warmup_steps=0", "optimizer.lr=1e-5",
            f"optimizer.microbatches={microbatches}", f"lora.enabled={'true' if lora else 'false'}",
            f"scan_layers={'true' if scan_layers else 'false'}"]
    cfg = config_lib.load_config(config, over)
    lm_cfg = config_lib.build_lm_config(cfg)
    program = lm_program(cfg, lm_cfg)
    return cfg, lm_cfg, program, next(synthetic_codes(lm_cfg, B, T, 0))["codes"]


def _our_train(config: str, B: int, T: int, remat: str, microbatches: int, lora: bool, steps: int,
               scan_layers: bool = True, profile_dir: str | None = None, profile_steps: int = 3) -> dict:
    """Our train step on one device: compile, `steps` timed steps; with `profile_dir`, `profile_steps` more under
    jax.profiler and the summary of their top ops. The kernel choices are those in force (`backend.choices`)."""
    import jax

    from moshi_jax.nn import backend
    from moshi_jax.training.mesh import LOGICAL_AXIS_RULES, make_mesh
    from moshi_jax.training.optimizer import make_optimizer, make_schedule
    from moshi_jax.training.step import ShardedStep, make_train_step
    from moshi_jax.training.train_state import build_state_spec, count_params, init_train_state

    cfg, lm_cfg, program, codes = _train_setup(config, B, T, remat, microbatches, lora, scan_layers)
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    tx = make_optimizer(cfg.optimizer, cfg.steps)
    spec = build_state_spec(program.task, tx, mesh, LOGICAL_AXIS_RULES, cfg.lora)
    state, frozen = init_train_state(spec, program.task, tx, cfg.seed)
    step = ShardedStep(make_train_step(program.task, spec.partition, tx, make_schedule(cfg.optimizer, cfg.steps),
                                       microbatches=microbatches, compute_dtype="bfloat16"),
                       spec, program.batch_shardings(mesh))
    batch = {"codes": jax.device_put(codes, program.batch_shardings(mesh)["codes"])}
    h = {"s": state}

    losses = []

    def one():
        h["s"], m = step(h["s"], batch, frozen)
        losses.append(float(m["loss"]))

    first, st, _ = time_fn(one, warmup=1, iters=steps)
    loss0 = losses[0]
    peak, _ = device_peaks()
    flops = program.flops_per_step
    out = {"config": config, "params_M": round(count_params(spec.abstract_params) / 1e6, 1), "B": B, "T": T,
           "remat": remat, "microbatches": microbatches, "lora": lora, "step_s": round(st, 4),
           "compile_s": round(first - st, 1), "first_loss": loss0, "flops_per_step": flops,
           "tflops": round(flops / st / 1e12, 2), "frames_per_s": round(B * T / st, 1),
           "tokens_per_s": round(B * T * lm_cfg.num_streams / st, 1), "peak_mem_gib": _peak_mem_gib(),
           "scan_layers": scan_layers, "kernels": str(backend.choices())}
    if peak:
        out["mfu"] = round(flops / st / peak, 3)
    if profile_dir:
        from benchmarks import trace_summary

        with jax.profiler.trace(profile_dir):
            for _ in range(profile_steps):
                one()
        summary = trace_summary.summarize(Path(profile_dir), top=15, steps=profile_steps)
        out["profile"] = {k: summary[k] for k in ("trace", "lines", "total_ms", "ms_per_step", "ops", "categories")}
    return out


def _profile_dir(s: dict, name: str) -> str | None:
    return str(Path(s["out"]) / "profile" / name) if s.get("profile") else None


def sec_train(s: dict) -> dict:
    return _our_train(s["train_config"], s["train_batch"], s["train_frames"], s["train_remat"],
                      s["train_microbatches"], False, s["train_steps"], s["train_scan_layers"],
                      _profile_dir(s, "train"), s["profile_steps"])


def sec_train_cpu_tricks(s: dict) -> dict:
    from moshi_jax.nn import backend

    with backend.override("cpu"):
        return _our_train(s["train_config"], s["train_batch"], s["train_frames"], s["train_remat"],
                          s["train_microbatches"], False, s["train_steps"], False,
                          _profile_dir(s, "train_cpu_tricks"), s["profile_steps"])


def sec_lora7b(s: dict) -> dict:
    return _our_train(s["lora_config"], s["lora_batch"], s["lora_frames"], "full", 1, True, s["train_steps"],
                      True, _profile_dir(s, "lora7b"), s["profile_steps"])


def sec_train_ref(s: dict) -> dict:
    import numpy as np
    import torch
    from moshi.models import loaders

    from benchmarks.bench_train import _reference_loss

    B, T = s["ref_train_batch"], s["train_frames"]
    cfg, lm_cfg, program, codes = _train_setup(s["train_config"], B, T, "none", 1, False)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ref = loaders.get_moshi_lm(None, lm_kwargs=lm_cfg.to_reference_kwargs(), device=dev, dtype=torch.bfloat16)
    ref.train()
    codes_t = torch.tensor(np.asarray(codes), dtype=torch.long, device=dev)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    pad_ids = (lm_cfg.existing_text_padding_id, lm_cfg.existing_text_end_padding_id)

    def step():
        o = ref(codes_t)
        loss = _reference_loss(o, codes_t, lm_cfg.dep_q, cfg.loss.text_padding_weight,
                               cfg.loss.first_codebook_weight_multiplier, pad_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.optimizer.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))

    losses = []
    _, st, _ = time_fn(step, warmup=1, iters=s["train_steps"])
    loss0 = losses[0]
    peak, _ = device_peaks()
    flops = program.flops_per_step
    out = {"config": s["train_config"], "B": B, "T": T, "step_s": round(st, 4), "first_loss": loss0,
           "tflops": round(flops / st / 1e12, 2), "frames_per_s": round(B * T / st, 1),
           "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if dev == "cuda" else None}
    if peak:
        out["mfu"] = round(flops / st / peak, 3)
    return out


FUNCS = {"env": sec_env, "engine": sec_engine, "ref_engine": sec_ref_engine, "mimi_batch": sec_mimi_batch,
         "train": sec_train, "train_ref": sec_train_ref, "lora7b": sec_lora7b, "train_cpu_tricks": sec_train_cpu_tricks,
         "engine_int8": sec_engine_int8}


# ------------------------------------------------------------------------------------------------- report


def markdown(res: dict) -> str:
    env = res.get("env", {})
    lines = [f"# benchmarks.accel: {env.get('device_kind', '?')} ({env.get('backend', '?')}), "
             f"jax {env.get('jax', '?')}, torch {env.get('torch', '?')}, moshi {env.get('moshi', '?')}", "",
             "| measure | moshi-jax | reference | note |", "|---|---|---|---|"]
    eng, ref = res.get("engine", {}), res.get("ref_engine", {})
    for b, r in (eng.get("batches") or {}).items():
        rr = (ref.get("batches") or {}).get(b, {})
        ours = (f"{r['median_ms']} ms (p99 {r['p99_ms']})" if isinstance(r, dict) and "median_ms" in r
                else (r.get("error", r) if isinstance(r, dict) else r))
        theirs = (f"{rr['total']['median_ms']} ms (LM {rr['lm']['median_ms']})" if isinstance(rr, dict)
                  and "total" in rr else "-")
        note = f"compile {r.get('compile_s')} s, peak {r.get('peak_mem_gib')} GiB" if isinstance(r, dict) else ""
        lines.append(f"| {eng.get('preset')} full-duplex step, batch {b} | {ours} | {theirs} | {note} |")
    lm = eng.get("lm_B1")
    if isinstance(lm, dict) and "median_ms" in lm:
        rr = (ref.get("batches") or {}).get("1", {})
        theirs = f"{rr['lm']['median_ms']} ms" if isinstance(rr, dict) and "lm" in rr else "-"
        lines.append(f"| LM step only, batch 1 | {lm['median_ms']} ms | {theirs} | floor "
                     f"{lm.get('weight_read_floor_ms', '?')} ms ({lm.get('x_floor', '?')}x) |")
    e8 = res.get("engine_int8", {})
    for b, r in (e8.get("batches") or {}).items():
        ours = (f"{r['median_ms']} ms (p99 {r['p99_ms']})" if isinstance(r, dict) and "median_ms" in r
                else (r.get("error", r) if isinstance(r, dict) else r))
        note = (f"state {e8.get(f'state_bytes_B{b}', 0) / 2**30:.3g} GiB, compile {r.get('compile_s')} s, peak "
                f"{r.get('peak_mem_gib')} GiB" if isinstance(r, dict) else "")
        lines.append(f"| {e8.get('preset')} full-duplex step, int8 KV + weights, batch {b} | {ours} | - | {note} |")
    for name, v in ((e8.get("quality") or {}).get("variants") or {}).items():
        t, a = v["text"], v.get("audio", {})
        lines.append(f"| {name} vs bf16, {e8['quality']['frames']} frames (teacher-forced) | text top-1 "
                     f"{100 * t['top1_agree']:.1f}%, KL {t['kl_mean']:.1e}; audio top-1 "
                     f"{100 * a.get('top1_agree', float('nan')):.1f}%, KL {a.get('kl_mean', float('nan')):.1e} | - | "
                     f"max drift {t['max_rel_std']:.3f} / {a.get('max_rel_std', float('nan')):.3f} x std |")
    mb = res.get("mimi_batch", {})
    if "ours_encode" in mb:
        r_e = mb.get("ref_encode", {}).get("median_ms", "-")
        r_d = mb.get("ref_decode", {}).get("median_ms", "-")
        lines.append(f"| Mimi {mb['seconds']} s encode / decode | {mb['ours_encode']['median_ms']} / "
                     f"{mb['ours_decode']['median_ms']} ms | {r_e} / {r_d} ms | float32 |")
    for name, label in (("train", "full train step"), ("train_cpu_tricks", "full train step, CPU tricks on "
                                                                            "(kernels=cpu, unrolled)"),
                        ("lora7b", "LoRA train step")):
        t = res.get(name, {})
        if "step_s" in t:
            tr = res.get("train_ref", {}) if name == "train" else {}
            theirs = (f"{tr['step_s']} s/step, {tr['frames_per_s']} frames/s, MFU {tr.get('mfu')} (B={tr['B']})"
                      if "step_s" in tr else "-")
            lines.append(f"| {t['config']} {label}, B={t['B']} T={t['T']} remat {t['remat']} mb {t['microbatches']}"
                         f" | {t['step_s']} s/step, {t['frames_per_s']} frames/s, MFU {t.get('mfu')}, peak "
                         f"{t.get('peak_mem_gib')} GiB | {theirs} | compile {t['compile_s']} s |")
    for name in ("train", "train_cpu_tricks", "lora7b"):
        prof = res.get(name, {}).get("profile") if isinstance(res.get(name), dict) else None
        if prof:
            from benchmarks import trace_summary

            lines += ["", f"## profile: {name} ({prof['trace']})", "",
                      trace_summary.markdown({**prof, "distinct_ops": len(prof["ops"])}, top=10)]
    for k, v in res.items():
        if isinstance(v, dict) and ("error" in v or "skipped" in v):
            lines.append(f"| {k} | {v.get('error') or v.get('skipped')} | | |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- driver


def settings(args) -> dict:
    smoke = args.smoke
    return {
        "smoke": smoke, "reference": not args.no_reference,
        "preset": args.preset or ("tiny" if smoke else "moshi_7b"),
        "batches": args.batches or ([1, 2] if smoke else [1, 8, 32, 64]),
        "iters": args.iters or (3 if smoke else 40),
        "train_config": args.train_config or ("tiny" if smoke else "2b"),
        "train_batch": args.train_batch or (2 if smoke else 64),
        "train_frames": args.train_frames or (16 if smoke else 256), "train_remat": args.train_remat,
        "train_microbatches": args.train_microbatches or (1 if smoke else 4),
        "train_steps": 2 if smoke else 5, "ref_train_batch": args.ref_train_batch,
        "lora_config": "tiny" if smoke else "7b", "lora_batch": args.lora_batch or (2 if smoke else 8),
        "lora_frames": args.lora_frames or (16 if smoke else 512),
        "int8_batches": args.int8_batches or ([1, 2] if smoke else [1, 32, 64, 96]),
        "int8_frames": args.int8_frames or (6 if smoke else 64),
        "train_scan_layers": args.train_scan_layers == "true", "profile": args.profile,
        "profile_steps": args.profile_steps, "out": str(args.out.resolve()),
    }


def run_section(name: str, s: dict, out_file: Path) -> None:
    """Child process: run one section, write its result (or error) as JSON."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        r = FUNCS[name](s)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        r = {"error": f"{type(e).__name__}: {str(e)[:1000]}"}
    out_file.write_text(json.dumps(r, default=str))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accel", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/accel"), help="folder for results.json / results.md")
    p.add_argument("--smoke", action="store_true", help="tiny configs, CPU-sized (the CI test)")
    p.add_argument("--sections", nargs="+", default=None, choices=SECTIONS, help="default: all (smoke: no reference)")
    p.add_argument("--budget-s", type=float, default=330.0, help="wall-clock budget for all sections (default 330)")
    p.add_argument("--preset", default=None, help="engine preset (default moshi_7b; smoke: tiny)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="engine batches (default 1 8 32 64)")
    p.add_argument("--iters", type=int, default=None, help="timed frames per batch (default 40)")
    p.add_argument("--train-config", default=None, help="configs/ preset for the full train row (default 2b)")
    p.add_argument("--train-batch", type=int, default=None, help="B of the train row (default 64: 16k frames)")
    p.add_argument("--train-frames", type=int, default=None, help="T of the train row (default 256)")
    p.add_argument("--train-remat", default="dots", choices=("none", "full", "dots", "dots_no_batch"),
                   help="remat policy of the full train row (default dots)")
    p.add_argument("--train-microbatches", type=int, default=None,
                   help="gradient accumulation steps (default 4: 16k frames in 4k-frame microbatches; smoke 1)")
    p.add_argument("--train-scan-layers", default="true", choices=("true", "false"),
                   help="scanned (true, default) or unrolled layer stacks in the full train row")
    p.add_argument("--profile", action="store_true", help="trace a few steady-state steps of the train sections "
                                                          "(jax.profiler) and summarise their top ops")
    p.add_argument("--profile-steps", type=int, default=3, help="steps traced with --profile (default 3)")
    p.add_argument("--ref-train-batch", type=int, default=8, help="B of the reference train row (default 8)")
    p.add_argument("--lora-batch", type=int, default=None, help="B of the 7B LoRA row (default 8)")
    p.add_argument("--lora-frames", type=int, default=None, help="T of the 7B LoRA row (default 512)")
    p.add_argument("--int8-batches", type=int, nargs="+", default=None,
                   help="batches of the int8 engine rows (default 1 32 64 96)")
    p.add_argument("--int8-frames", type=int, default=None, help="frames of the int8 quality run (default 64)")
    p.add_argument("--no-reference", action="store_true", help="skip the reference PyTorch sections")
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # child process: run this one section
    p.add_argument("--section-settings", default=None, help=argparse.SUPPRESS)
    p.add_argument("--section-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.section:
        run_section(args.section, json.loads(args.section_settings), args.section_out)
        return 0
    s = settings(args)
    sections = args.sections or (SMOKE_SECTIONS if args.smoke else SECTIONS)
    if args.no_reference:
        sections = [x for x in sections if x not in ("ref_engine", "train_ref")]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    res: dict = {"settings": s, "sections": list(sections)}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    for i, name in enumerate(sections, 1):
        left = args.budget_s - (time.monotonic() - t0)
        if left < NEED_S[name] * (0.2 if args.smoke else 1):
            res[name] = {"skipped": f"only {left:.0f} s of the budget left"}
            continue
        print(f"[{i}/{len(sections)}] {name} ({left:.0f} s of the budget left)", flush=True)
        sub = dict(s, deadline=time.monotonic() + left)
        with tempfile.TemporaryDirectory() as tmp:
            out_file = Path(tmp) / "r.json"
            t = time.monotonic()
            try:
                proc = subprocess.run([sys.executable, "-m", "benchmarks.accel", "--section", name,
                                       "--section-settings", json.dumps(sub), "--section-out", str(out_file)],
                                      env=env, timeout=left, capture_output=True, text=True)
                r = json.loads(out_file.read_text()) if out_file.exists() else {
                    "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
            except subprocess.TimeoutExpired:
                r = {"error": f"timed out after {left:.0f} s (budget)"}
        if isinstance(r, dict):
            r["section_s"] = round(time.monotonic() - t, 1)
        res[name] = r
        print(f"    {json.dumps(r, default=str)[:400]}", flush=True)
        res["total_s"] = round(time.monotonic() - t0, 1)
        (args.out / "results.json").write_text(json.dumps(res, indent=1, default=str))
        (args.out / "results.md").write_text(markdown(res))
    print(markdown(res))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'} in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
