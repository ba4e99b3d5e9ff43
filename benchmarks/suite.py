"""The moshi-jax benchmark suite: one entry point, a markdown report, JSON results and plots.

    python -m benchmarks.suite --out runs/bench                       # random weights (says so in the report)
    python -m benchmarks.suite --quick --out runs/bench_quick          # minutes on a small CPU
    python -m benchmarks.suite --weights-dir ~/models/moshiko-pytorch-bf16 --out runs/bench_real
    python -m benchmarks.suite --sections latency --configs bench_111m --batches 1 8 32 --out runs/lat

Sections (each one runs on its own; a failure is reported and the others still run):

- latency: the engine's full-duplex step (Mimi encode -> LM step -> Mimi decode, one 80 ms frame for B
  conversations) per frame: median and p99, real-time factor (median / 80 ms), compile time, for the tiny
  and bench_111m configs at batch 1, 8, 32; the reference (PyTorch Mimi streaming encode + LMGen.step +
  Mimi decode, same config and batch, same run) and the ratio; "sessions in real time" = the largest measured
  batch whose p99 fits in 80 ms, and the throughput bound B x 80 ms / median at the best batch.
  Speed does not depend on the weights' values, so this section always uses seeded random weights.
- codec: Mimi round trip (8 codebooks) of real speech (eSpeak NG, several voices; fixed sentences): mel
  distance, SI-SNR, PESQ (wide band) and STOI when those packages are installed; the reference Mimi with
  the same weights on the same audio in the same run.
- asr: the engine's streaming ASR mode (text delayed after audio) on synthesized utterances with known text,
  word error rate with jiwer.
- tts: the engine's streaming TTS mode on the same texts: DTW-aligned mel distance to eSpeak NG's rendering
  of the text, and TTS word error rate (generated speech -> the ASR mode above -> jiwer).

With random weights the quality numbers are meaningless (noise in, noise out): the report says what it ran on.
`--weights-dir` is a downloaded Kyutai repository (config.json, LM and Mimi safetensors, tokenizer); its
Mimi is used by the codec section; ASR uses `--asr-weights-dir` (an STT repository; default the same dir).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

log = logging.getLogger("benchmarks.suite")

FRAME_S = 0.08  # one Mimi frame = the real-time budget of one engine step
SENTENCE_IDS = (0, 2, 3, 5, 7, 9, 11, 13, 17, 19, 23, 29)  # fixed evaluation sentences (of speech_synth.SENTENCES)


@dataclasses.dataclass
class Section:
    name: str
    markdown: str = ""
    data: dict = dataclasses.field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------- inputs


def eval_utterances(n: int) -> list[tuple[str, str, np.ndarray]]:
    """(text, voice, audio [T] float32 24 kHz) for the first `n` fixed sentences, cycling over voices."""
    from moshi_jax.data.speech_synth import SENTENCES, VOICES, synthesize

    out = []
    for i, sid in enumerate(SENTENCE_IDS[:n]):
        text, voice = SENTENCES[sid], VOICES[i % len(VOICES)]
        out.append((text, voice, synthesize(text, voice).audio))
    return out


def speech_frames(n_frames: int, batch: int, frame_size: int) -> np.ndarray:
    """[n_frames, batch, frame_size] float32: real speech (the built-in sample, looped, shifted per item)."""
    from moshi_jax.data.speech_synth import builtin_sample

    x = builtin_sample()
    need = n_frames * frame_size + batch * 977
    x = np.tile(x, -(-need // x.size) + 1)
    rows = [x[b * 977: b * 977 + n_frames * frame_size] for b in range(batch)]
    return np.stack(rows, 0).reshape(batch, n_frames, frame_size).transpose(1, 0, 2).astype(np.float32)


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds, np.float64) * 1e3
    return {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "min_ms": float(ms.min()), "max_ms": float(ms.max()), "frames": int(ms.size)}


# ---------------------------------------------------------------------------------------------- latency


def time_ours(engine, params, batch: int, warmup: int, iters: int) -> dict:
    """Per-frame wall time of the jitted engine step (host arrays out, as the server needs them)."""
    pcm = speech_frames(warmup + iters + 1, batch, engine.frame_size)
    active = np.ones(batch, bool)
    state = engine.init_state(batch)
    t0 = time.perf_counter()
    state, out = engine.step_donated(params, state, pcm[0], active)
    np.asarray(out.pcm)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(1, warmup + iters + 1):
        t0 = time.perf_counter()
        state, out = engine.step_donated(params, state, pcm[i], active)
        np.asarray(out.pcm), np.asarray(out.text_token)
        times.append(time.perf_counter() - t0)
    res = percentiles(times[warmup:])
    res["compile_s"] = compile_s - res["median_ms"] / 1e3
    return res


def time_reference(engine, batch: int, warmup: int, iters: int, threads: int) -> dict:
    """The reference's per-frame work for the same configs: Mimi streaming encode, LMGen.step (default
    sampling), Mimi streaming decode of the emitted frame - in PyTorch float32 on CPU, random weights."""
    import torch
    from moshi.models import loaders
    from moshi.models.lm import LMGen

    from moshi_jax.mimi import checkpoint as mimi_ckpt

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lm_cfg = engine.lm_cfg
    mimi = loaders.get_mimi(None, mimi_config=mimi_ckpt.reference_config(engine.mimi_cfg),
                            num_codebooks=lm_cfg.n_q - lm_cfg.dep_q)
    lm = loaders.get_moshi_lm(None, lm_kwargs=lm_cfg.to_reference_kwargs(), dtype=torch.float32)
    lm.eval()
    gen = LMGen(lm)  # the reference defaults: temp 0.8 / top-k 250 audio, 0.7 / 25 text
    pcm = torch.from_numpy(speech_frames(warmup + iters, batch, engine.frame_size))
    times = []
    with torch.no_grad(), mimi.streaming(batch), gen.streaming(batch):
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            codes = mimi.encode(pcm[i][:, None, :])
            tokens = gen.step(codes)
            if tokens is not None:
                mimi.decode(tokens[:, 1:])
            times.append(time.perf_counter() - t0)
    return percentiles(times[warmup:])


def calibrate_threads(engine) -> dict[int, float]:
    """Median reference frame time (ms) with 1 thread and with all CPUs, a few frames each at batch 1."""
    cands = sorted({1, os.cpu_count() or 1})
    return {t: time_reference(engine, 1, 2, 5, t)["median_ms"] for t in cands}


def realtime_sessions(rows: list[dict], key: str) -> dict:
    """From {batch, <key>: {median_ms, p99_ms}} rows: the largest batch with p99 <= 80 ms, and the throughput
    bound max_B B * 80 ms / median (conversations one machine can advance in real time, if batched)."""
    ok = [r["batch"] for r in rows if r.get(key) and r[key]["p99_ms"] <= FRAME_S * 1e3]
    bound = max((r["batch"] * FRAME_S * 1e3 / r[key]["median_ms"] for r in rows if r.get(key)), default=0.0)
    return {"largest_batch_p99_within_80ms": max(ok) if ok else 0, "throughput_bound_sessions": bound}


def section_latency(args, sec: Section) -> None:
    from moshi_jax.engine.engine import Engine
    from moshi_jax.lm import model as lm_model

    warmup, iters = (3, 10) if args.quick else (5, 50)
    rows = []
    calibration = None
    for preset in args.configs:
        engine, params = Engine.load(None, preset=preset, seed=0)
        if args.threads is None and not args.no_reference:
            calibration = calibrate_threads(engine)
            args.threads = min(calibration, key=calibration.get)
            log.info("reference threads: %d (calibration, median ms per frame: %s)", args.threads, calibration)
        n_lm = lm_model.param_count(params["lm"]) if hasattr(lm_model, "param_count") else None
        params = engine.prepare_params(params)  # as a server would: streaming layout once, outside the step
        for B in args.batches:
            log.info("latency: %s batch %d (ours)", preset, B)
            row = {"config": preset, "batch": B, "lm_params": n_lm, "ours": time_ours(engine, params, B, warmup, iters)}
            if not args.no_reference:
                log.info("latency: %s batch %d (reference)", preset, B)
                try:
                    row["ref"] = time_reference(engine, B, warmup, iters, args.threads)
                except Exception as e:  # the reference may be missing or fail on a config: say so, go on
                    row["ref_error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
        del engine, params
    summary = {}
    for preset in args.configs:
        pr = [r for r in rows if r["config"] == preset]
        summary[preset] = {"ours": realtime_sessions(pr, "ours")}
        if any("ref" in r for r in pr):
            summary[preset]["ref"] = realtime_sessions(pr, "ref")
    sec.data = {"rows": rows, "sessions": summary, "warmup": warmup, "frames": iters,
                "reference_threads": args.threads, "thread_calibration_ms": calibration}

    md = [f"Per-frame wall time of one engine step for B conversations (Mimi encode + LM step + Mimi decode, "
          f"float32, {iters} frames after {warmup} warm-up frames; random weights: speed does not depend on "
          "them). Real-time factor = median / 80 ms (< 1 is faster than real time). Reference = PyTorch Mimi "
          "streaming encode + `LMGen.step` + Mimi decode, same config and batch, same run. JAX uses XLA's CPU "
          "thread pool (all cores); the reference uses the torch thread count given below.", "",
          "| config | batch | median | p99 | RTF | compile | ref median | ref p99 | ref RTF | ours / ref (median) |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, f = r["ours"], r.get("ref")
        ref_cols = (f"{f['median_ms']:.1f} ms | {f['p99_ms']:.1f} ms | {f['median_ms'] / 80:.2f} | "
                    f"{o['median_ms'] / f['median_ms']:.3g}x") if f else ("- | - | - | " + (
                        "error" if "ref_error" in r else "-"))
        md.append(f"| {r['config']} | {r['batch']} | {o['median_ms']:.1f} ms | {o['p99_ms']:.1f} ms | "
                  f"{o['median_ms'] / 80:.2f} | {o['compile_s']:.1f} s | {ref_cols} |")
    md += ["", "Sessions served in real time on this machine (largest measured batch with p99 <= 80 ms; "
               "throughput bound = max over batches of B x 80 ms / median):", "",
           "| config | ours: largest batch | ours: throughput bound | ref: largest batch | ref: throughput bound |",
           "|---|---|---|---|---|"]
    for preset, s in summary.items():
        o, f = s["ours"], s.get("ref")
        md.append(f"| {preset} | {o['largest_batch_p99_within_80ms']} | {o['throughput_bound_sessions']:.1f} | "
                  + (f"{f['largest_batch_p99_within_80ms']} | {f['throughput_bound_sessions']:.1f} |" if f
                     else "- | - |"))
    errs = [f"- {r['config']} batch {r['batch']}: reference failed: {r['ref_error']}" for r in rows
            if "ref_error" in r]
    if calibration:
        md += ["", f"Reference run with {args.threads} torch thread(s): calibration at batch 1, median ms per "
                   f"frame by thread count: {', '.join(f'{k}: {v:.1f}' for k, v in calibration.items())}."]
    sec.markdown = "\n".join(md + ([""] + errs if errs else []))


# ---------------------------------------------------------------------------------------------- codec


def _load_mimi(weights_dir: str | None, codec_weights: str | None = None):
    """(cfg, our params, reference state dict as numpy, description)."""
    import jax

    from moshi_jax.mimi import checkpoint as mimi_ckpt
    from moshi_jax.mimi.config import MimiConfig
    from moshi_jax.mimi.model import MimiCodec

    if codec_weights:  # a codec trained by `moshi-jax train mimi*` (its mimi.json beside it)
        cfg = mimi_ckpt.config_beside(codec_weights) or MimiConfig()
        params = mimi_ckpt.load_reference(str(codec_weights), cfg)
        return cfg, params, mimi_ckpt.to_reference_state_dict(params, cfg), f"trained Mimi {codec_weights}"
    cfg = MimiConfig()
    if weights_dir:
        from moshi_jax.lm.checkpoint import read_repo

        path = read_repo(weights_dir).mimi_weights
        params = mimi_ckpt.load_reference(str(path), cfg)
        return cfg, params, None, f"released-config Mimi from {path}"
    params = MimiCodec(cfg).init(jax.random.PRNGKey(0))
    return cfg, params, mimi_ckpt.to_reference_state_dict(params, cfg), "RANDOM released-config Mimi (seed 0)"


def section_codec(args, sec: Section) -> None:
    from benchmarks import quality as Q
    from moshi_jax.mimi.model import MimiCodec

    utts = eval_utterances(4 if args.quick else 12)
    cfg, params, ref_sd, what = _load_mimi(args.weights_dir, getattr(args, "codec_weights", None))
    codec = MimiCodec(cfg)
    K = cfg.num_codebooks
    T = max(a.size for _, _, a in utts)
    T = -(-T // cfg.frame_size) * cfg.frame_size
    wav = np.zeros((len(utts), 1, T), np.float32)
    for i, (_, _, a) in enumerate(utts):
        wav[i, 0, : a.size] = a
    ours = np.asarray(codec.decode(params, codec.encode(params, wav, num_codebooks=K)))[:, 0]
    outputs = {"ours": ours}
    if not args.no_reference:
        try:
            import torch
            from moshi.models import loaders

            from moshi_jax.mimi import checkpoint as mimi_ckpt

            torch.set_num_threads(args.threads or 1)
            if ref_sd is None:
                from moshi_jax.lm.checkpoint import read_repo

                ref = loaders.get_mimi(str(read_repo(args.weights_dir).mimi_weights), num_codebooks=K)
            else:
                ref = loaders.get_mimi(None, mimi_config=mimi_ckpt.reference_config(cfg), num_codebooks=K)
                ref.load_state_dict({k: torch.from_numpy(v) for k, v in ref_sd.items()})
            with torch.no_grad():
                outputs["ref"] = ref.decode(ref.encode(torch.from_numpy(wav))).numpy()[:, 0]
        except Exception as e:
            sec.data["ref_error"] = f"{type(e).__name__}: {e}"
    metrics: dict[str, dict[str, float | None]] = {}
    for impl, out in outputs.items():
        per = {"mel_distance": [], "si_snr_db": [], "pesq_wb": [], "stoi": []}
        for i, (_, _, a) in enumerate(utts):
            y = out[i, : a.size]
            per["mel_distance"].append(Q.mel_distance(a, y))
            per["si_snr_db"].append(Q.si_snr(a, y))
            per["pesq_wb"].append(Q.pesq_wb(a, y))
            per["stoi"].append(Q.stoi(a, y))
        metrics[impl] = {k: (None if any(x is None for x in v) else float(np.mean(v))) for k, v in per.items()}
    sec.data.update({"mimi": what, "codebooks": K, "utterances": len(utts),
                     "seconds": float(sum(a.size for _, _, a in utts) / cfg.sample_rate), "metrics": metrics})
    if "ours" in outputs and "ref" in outputs:
        sec.data["max_abs_diff_ours_vs_ref"] = float(np.max(np.abs(outputs["ours"] - outputs["ref"])))

    def f(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    md = [f"Mimi round trip with {K} codebooks on {len(utts)} eSpeak NG utterances "
          f"({sec.data['seconds']:.1f} s, {len({v for _, v, _ in utts})} voices). Model: **{what}**.", "",
          "| implementation | mel distance (lower better) | SI-SNR dB | PESQ wb | STOI |", "|---|---|---|---|---|"]
    for impl, m in metrics.items():
        md.append(f"| {'moshi-jax' if impl == 'ours' else 'reference (PyTorch)'} | {f(m['mel_distance'], '.3f')} | "
                  f"{f(m['si_snr_db'], '.2f')} | {f(m['pesq_wb'], '.2f')} | {f(m['stoi'], '.3f')} |")
    if "max_abs_diff_ours_vs_ref" in sec.data:
        md += ["", f"Largest sample difference moshi-jax vs reference: {sec.data['max_abs_diff_ours_vs_ref']:.2e}."]
    if "ref_error" in sec.data:
        md += ["", f"Reference failed: {sec.data['ref_error']}"]
    sec.markdown = "\n".join(md)


# ---------------------------------------------------------------------------------------------- ASR / TTS


def _repo_delay(weights_dir: str | None, key: str, field: str) -> float | None:
    if not weights_dir:
        return None
    from moshi_jax.lm.checkpoint import read_repo

    raw = read_repo(weights_dir).raw_config or {}
    value = (raw.get(key) or {}).get(field)
    return None if value is None else float(value)


def asr_engine(weights_dir: str | None, delay_frames: int | None):
    """(engine, params, prefix_frames) for streaming ASR; delays from the repo's stt_config when present."""
    from moshi_jax.engine.engine import Engine, EngineConfig
    from moshi_jax.nn.sampling import SamplingConfig

    if delay_frames is None:
        sec = _repo_delay(weights_dir, "stt_config", "audio_delay_seconds")
        delay_frames = round(sec * 12.5) if sec is not None else 2
    prefix = round((_repo_delay(weights_dir, "stt_config", "audio_silence_prefix_seconds") or 0.0) * 12.5)
    cfg = EngineConfig(mode="asr", text_delay_frames=delay_frames, sampling=SamplingConfig.greedy())
    engine, params = Engine.load(weights_dir, preset="tiny", cfg=cfg, seed=0)
    return engine, engine.prepare_params(params), prefix


def transcribe(engine, params, audios: list[np.ndarray], prefix_frames: int = 0) -> list[str]:
    """Batched streaming ASR: every audio gets its own conversation; text = the valid text pieces joined.
    As `moshi-jax asr`: `prefix_frames` of silence first (the repo's audio_silence_prefix_seconds), then the
    audio, then delay + 12 frames of silence so that the last words come out."""
    F = engine.frame_size
    n = prefix_frames + max(-(-a.size // F) for a in audios) + engine.delay + 12
    pcm = np.zeros((len(audios), n * F), np.float32)
    for i, a in enumerate(audios):
        pcm[i, prefix_frames * F: prefix_frames * F + a.size] = a
    state = engine.init_state(len(audios))
    active = np.ones(len(audios), bool)
    pieces: list[list[str]] = [[] for _ in audios]
    for t in range(n):
        state, out = engine.step_donated(params, state, pcm[:, t * F: (t + 1) * F], active)
        tok, valid = np.asarray(out.text_token), np.asarray(out.valid)
        for i in range(len(audios)):
            if valid[i]:
                p = engine.text_piece(int(tok[i]))
                if p:
                    pieces[i].append(p)
    return ["".join(p).strip() for p in pieces]


def section_asr(args, sec: Section) -> None:
    from benchmarks import quality as Q

    utts = eval_utterances(4 if args.quick else 12)
    wdir = args.asr_weights_dir or args.weights_dir
    engine, params, prefix = asr_engine(wdir, args.asr_delay_frames)
    t0 = time.perf_counter()
    hyps = transcribe(engine, params, [a for _, _, a in utts], prefix)
    run_s = time.perf_counter() - t0
    refs = [t for t, _, _ in utts]
    w = Q.wer(refs, hyps)
    what = f"weights from {wdir}" if wdir else "RANDOM tiny model (seed 0): the WER is meaningless"
    sec.data = {"model": what, "delay_frames": engine.delay, "wer": w, "utterances": len(utts),
                "examples": [{"ref": r, "hyp": h} for r, h in zip(refs, hyps, strict=True)], "run_s": run_s}
    md = [f"Streaming ASR mode (text delayed {engine.delay} frames after the audio, greedy) on {len(utts)} "
          f"eSpeak NG utterances with known text. Model: **{what}**.", "",
          f"WER (jiwer, lower case, no punctuation): **{'n/a' if w is None else f'{w:.3f}'}**", "",
          "| reference text | transcript |", "|---|---|"]
    md += [f"| {_md_cell(r)} | {_md_cell(h[:120]) or '(empty)'} |" for r, h in zip(refs, hyps, strict=True)][:4]
    sec.markdown = "\n".join(md)


def _md_cell(text: str) -> str:
    """Text safe inside a markdown table cell (pieces like <407> would be read as HTML tags)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def synthesize_tts(engine, params, texts: list[str], max_frames: int) -> list[np.ndarray]:
    """Batched streaming TTS: one conversation per text, run until every item is done (or max_frames)."""
    B = len(texts)
    state = engine.init_state(B)
    for i, text in enumerate(texts):
        state = engine.load_text(state, i, text, padding_between=1)  # as `moshi-jax tts`
    active = np.ones(B, bool)
    silence = np.zeros((B, engine.frame_size), np.float32)
    chunks: list[list[np.ndarray]] = [[] for _ in texts]
    done = np.zeros(B, bool)
    for _ in range(max_frames):
        state, out = engine.step_donated(params, state, silence, active)
        pcm, ok, d = np.asarray(out.pcm), np.asarray(out.audio_valid), np.asarray(out.done)
        for i in range(B):
            if ok[i] and not done[i]:
                chunks[i].append(pcm[i])
        done |= d
        if done.all():
            break
    return [np.concatenate(c) if c else np.zeros(0, np.float32) for c in chunks]


def section_tts(args, sec: Section) -> None:
    from benchmarks import quality as Q
    from moshi_jax.data.speech_synth import synthesize
    from moshi_jax.engine.engine import Engine, EngineConfig

    utts = eval_utterances(3 if args.quick else 12)
    texts = [t for t, _, _ in utts]
    delay = args.tts_delay_frames
    if delay is None:
        s = _repo_delay(args.weights_dir, "tts_config", "audio_delay")
        delay = round(s * 12.5) if s is not None else 2
    cfg = EngineConfig(mode="tts", text_delay_frames=-delay)
    engine, params = Engine.load(args.weights_dir, preset="tiny", cfg=cfg, seed=0)
    params = engine.prepare_params(params)
    max_frames = int(12.5 * (max(len(t.split()) for t in texts) * 0.8 + 4)) + delay
    t0 = time.perf_counter()
    audios = synthesize_tts(engine, params, texts, max_frames)
    run_s = time.perf_counter() - t0
    dtw = [Q.dtw_mel_distance(synthesize(t, "en-us").audio, a) if a.size else None for t, a in
           zip(texts, audios, strict=True)]
    asr_dir = args.asr_weights_dir or args.weights_dir
    asr, asr_params, prefix = asr_engine(asr_dir, args.asr_delay_frames)
    hyps = transcribe(asr, asr_params, [a if a.size else np.zeros(1920, np.float32) for a in audios], prefix)
    w = Q.wer(texts, hyps)
    what = f"weights from {args.weights_dir}" if args.weights_dir else \
        "RANDOM tiny model (seed 0): the numbers are meaningless"
    judge = f"the streaming ASR mode ({'weights from ' + asr_dir if asr_dir else 'RANDOM tiny model'})"
    valid = [x for x in dtw if x is not None]
    sec.data = {"model": what, "judge": judge, "delay_frames": delay, "wer": w,
                "dtw_mel_distance": float(np.mean(valid)) if valid else None,
                "seconds_generated": float(sum(a.size for a in audios) / engine.sample_rate), "run_s": run_s,
                "examples": [{"text": t, "asr": h} for t, h in zip(texts, hyps, strict=True)]}
    md = [f"Streaming TTS mode (audio {delay} frames after the text) on {len(texts)} fixed sentences. Model: "
          f"**{what}**. Generated {sec.data['seconds_generated']:.1f} s of audio in {run_s:.1f} s.", "",
          f"- DTW mel distance to eSpeak NG's rendering of the same text (lower better): "
          f"**{'n/a' if not valid else f'{np.mean(valid):.3f}'}**",
          f"- TTS WER, judged by {judge}: **{'n/a' if w is None else f'{w:.3f}'}**"]
    sec.markdown = "\n".join(md)


# ---------------------------------------------------------------------------------------------- server


async def _serve_clients(engine, params, n_clients: int, n_frames: int) -> dict:
    """`n_clients` loopback websocket clients stream `n_frames` of speech in real time (absolute 80 ms
    schedule) to a ChatServer with max_sessions = n_clients; per output frame: receive time - send time of
    the input frame it answers (output k answers input k + 1: the first input frame is dropped)."""
    import aiohttp
    import sphn

    from moshi_jax.engine import protocol as P
    from moshi_jax.engine.server import CHAT_PATH, ChatServer, latency_summary

    server = ChatServer(engine, params, max_sessions=n_clients)
    port = await server.start("127.0.0.1", 0)
    pcm = speech_frames(n_frames, n_clients, engine.frame_size)
    sent_at = np.full((n_clients, n_frames), np.nan)
    recv_at = np.full((n_clients, n_frames), np.nan)
    loop = asyncio.get_running_loop()
    try:
        async with aiohttp.ClientSession() as session:
            wss = [await session.ws_connect(f"http://127.0.0.1:{port}{CHAT_PATH}") for _ in range(n_clients)]
            for ws in wss:
                assert (await asyncio.wait_for(ws.receive(), 30)).data == P.HANDSHAKE

            async def reader(i, ws):
                k = 0
                while k < n_frames - 1:
                    msg = await ws.receive()
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        return
                    if msg.data[0] == P.Kind.AUDIO:
                        recv_at[i, k] = loop.time()
                        k += 1

            async def sender(i, ws, t0):
                writer = sphn.OpusStreamWriter(P.SAMPLE_RATE)
                for f in range(n_frames):
                    await asyncio.sleep(max(0.0, t0 + f * FRAME_S - loop.time()))
                    ogg = writer.append_pcm(pcm[f, i])
                    sent_at[i, f] = loop.time()
                    await ws.send_bytes(P.encode_audio(ogg))

            t0 = loop.time() + 0.2
            readers = [asyncio.ensure_future(reader(i, ws)) for i, ws in enumerate(wss)]
            await asyncio.gather(*[sender(i, ws, t0) for i, ws in enumerate(wss)])
            await asyncio.wait(readers, timeout=10.0)  # what has not arrived 10 s after the last frame is lost
            for r in readers:
                r.cancel()
            for ws in wss:
                await ws.close()
        steps = latency_summary(server.stats.step_seconds)
        max_batch = server.stats.max_batch
    finally:
        await server.stop()
        server.close()
    lat = (recv_at[:, : n_frames - 1] - sent_at[:, 1:]) * 1e3  # ms
    got = np.isfinite(lat)
    k = max(1, (n_frames - 1) // 5)
    first, last = np.nanmedian(lat[:, :k]), np.nanmedian(lat[:, -k:])
    return {"clients": n_clients, "frames": n_frames, "received_fraction": float(got.mean()),
            "latency_median_ms": float(np.nanmedian(lat)), "latency_p99_ms": float(np.nanpercentile(lat, 99)),
            "lag_growth_ms": float(last - first), "step_median_ms": steps.get("median_ms"),
            "max_batch": max_batch,
            "real_time": bool(got.mean() > 0.99 and last - first < FRAME_S * 1e3)}


def section_server(args, sec: Section) -> None:
    from moshi_jax.engine.engine import Engine

    n_frames = 50 if args.quick else 250
    rows = []
    for preset in args.server_configs:
        engine, params = Engine.load(None, preset=preset, seed=0)
        params = engine.prepare_params(params)
        for n in args.server_clients:
            log.info("server: %s, %d clients", preset, n)
            row = asyncio.run(_serve_clients(engine, params, n, n_frames))
            row["config"] = preset
            rows.append(row)
    sec.data = {"rows": rows}
    md = [f"`moshi-jax serve` end to end over loopback: N websocket clients (in the same process as the server) "
          f"each stream {n_frames * FRAME_S:.0f} s of speech as Ogg/Opus on an absolute 80 ms schedule; latency = "
          "time the answering audio frame arrives - time the input frame was sent (the server's batching window "
          "and Opus included, the 80 ms the frame took to record not included). Real time = more than 99% of "
          "the frames came back and the latency did not grow by a frame from the first to the last fifth.", "",
          "| config | clients | real time | latency median | latency p99 | lag growth | frames back | "
          "engine step median | max batch |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['config']} | {r['clients']} | {'yes' if r['real_time'] else 'NO'} | "
                  f"{r['latency_median_ms']:.0f} ms | {r['latency_p99_ms']:.0f} ms | {r['lag_growth_ms']:.0f} ms | "
                  f"{100 * r['received_fraction']:.0f}% | {r['step_median_ms'] or 0:.1f} ms | {r['max_batch']} |")
    sec.markdown = "\n".join(md)


# ---------------------------------------------------------------------------------------------- report


def plots(out: Path, sections: dict[str, Section]) -> list[str]:
    """PNG plots (matplotlib, optional). Returns the file names written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no plots (pip install -e '.[bench]')")
        return []
    written = []
    lat = sections.get("latency")
    if lat is not None and lat.data.get("rows"):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for preset in dict.fromkeys(r["config"] for r in lat.data["rows"]):
            rows = [r for r in lat.data["rows"] if r["config"] == preset]
            bs = [r["batch"] for r in rows]
            ax.plot(bs, [r["ours"]["median_ms"] for r in rows], "o-", label=f"moshi-jax {preset}")
            if all("ref" in r for r in rows):
                ax.plot(bs, [r["ref"]["median_ms"] for r in rows], "s--", label=f"reference {preset}")
        ax.axhline(80, color="k", lw=0.8, ls=":", label="80 ms (real time)")
        ax.set(xscale="log", yscale="log", xlabel="batch (conversations)", ylabel="median step (ms)",
               title="Engine step per 80 ms frame")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=120)
        plt.close(fig)
        written.append("latency.png")
    return written


def machine_summary() -> dict:
    import platform

    import jax

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()][:4]}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def _fmt_load(load) -> str:
    return "n/a" if not load else "/".join(f"{x:.1f}" for x in load)


def write_report(out: Path, args, sections: dict[str, Section], machine: dict, pngs: list[str]) -> Path:
    weights = f"`{args.weights_dir}`" if args.weights_dir else \
        "**none: seeded RANDOM weights** (latency is meaningful; quality / WER numbers are NOT)"
    lines = ["# moshi-jax benchmark report", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- weights: {weights}",
             f"- ASR judge weights: {args.asr_weights_dir or args.weights_dir or 'none (random)'}",
             f"- mode: {'--quick' if args.quick else 'full'}; sections: {', '.join(args.sections)}",
             f"- machine: {machine['platform']}, {machine['cpu_count']} CPUs, JAX {machine['jax']} "
             f"({machine['backend']}: {', '.join(machine['devices'])}), torch {machine.get('torch', '-')} "
             f"({args.threads or '-'} threads for the reference)",
             f"- load average (1/5/15 min) at start {_fmt_load(machine.get('loadavg_start'))}, at end "
             f"{_fmt_load(machine.get('loadavg_end'))}: timings on a shared machine are noisy",
             f"- command: `python -m benchmarks.suite {' '.join(sys.argv[1:])}`", ""]
    titles = {"latency": "Engine latency and real-time capacity", "server": "Server: concurrent clients over "
              "loopback", "codec": "Codec quality (Mimi)",
              "asr": "Streaming ASR", "tts": "Streaming TTS"}
    for name, sec in sections.items():
        lines += [f"## {titles.get(name, name)}", ""]
        if sec.error:
            lines += [f"**Failed** after {sec.seconds:.0f} s: `{sec.error}`", ""]
        else:
            lines += [sec.markdown, "", f"_({sec.seconds:.0f} s)_", ""]
    if pngs:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


SECTIONS = {"latency": section_latency, "server": section_server, "codec": section_codec, "asr": section_asr,
            "tts": section_tts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (report.md, results.json, *.png)")
    p.add_argument("--weights-dir", default=None, help="downloaded Kyutai repository (default: random weights)")
    p.add_argument("--codec-weights", default=None,
                   help="codec section: a trained Mimi (moshi-jax train mimi*: export/mimi.safetensors + mimi.json)")
    p.add_argument("--asr-weights-dir", default=None, help="STT repository for the ASR section and the TTS judge "
                                                           "(default: --weights-dir)")
    p.add_argument("--quick", action="store_true", help="fewer timed frames (10) and utterances (3-4)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--configs", nargs="+", default=None, help="latency configs (default tiny bench_111m)")
    p.add_argument("--batches", nargs="+", type=int, default=None, help="latency batch sizes (default 1 8 32)")
    p.add_argument("--server-configs", nargs="+", default=["tiny"], help="configs of the server section")
    p.add_argument("--server-clients", nargs="+", type=int, default=None,
                   help="concurrent clients of the server section (default 1 8 32)")
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference measurements")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the reference (default: auto, the faster of 1 and all CPUs on a short "
                        "calibration; on a loaded machine extra threads can make PyTorch 50x slower)")
    p.add_argument("--asr-delay-frames", type=int, default=None,
                   help="ASR text delay in frames (default: the repo's stt_config, else 2)")
    p.add_argument("--tts-delay-frames", type=int, default=None,
                   help="TTS audio delay in frames (default: the repo's tts_config, else 2)")
    args = p.parse_args(argv)
    args.configs = args.configs or ["tiny", "bench_111m"]
    args.batches = args.batches or [1, 8, 32]
    args.server_clients = args.server_clients or [1, 8, 32]
    if any(b < 1 for b in args.batches):
        p.error("--batches must be >= 1")
    for d in (args.weights_dir, args.asr_weights_dir):
        if d is not None and not Path(d).is_dir():
            p.error(f"weights directory not found: {d}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_summary()
    machine["loadavg_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    sections: dict[str, Section] = {}
    for name in args.sections:
        sec = Section(name)
        log.info("=== section %s", name)
        t0 = time.perf_counter()
        try:
            SECTIONS[name](args, sec)
        except Exception as e:  # one broken section must not lose the others' results
            sec.error = f"{type(e).__name__}: {e}"
            log.error("section %s failed:\n%s", name, traceback.format_exc())
        sec.seconds = time.perf_counter() - t0
        sections[name] = sec
        (out / "results.json").write_text(json.dumps(
            {"machine": machine, "weights_dir": args.weights_dir, "quick": args.quick,
             "sections": {k: dataclasses.asdict(v) for k, v in sections.items()}}, indent=2, default=str))
    machine["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    pngs = plots(out, sections)
    report = write_report(out, args, sections, machine, pngs)
    print(report.read_text())
    log.info("wrote %s, %s", report, out / "results.json")
    return 1 if any(s.error for s in sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
