"""Does the codec learn? Train `mimi_tiny` on CPU and measure it on HELD-OUT voices, against its initialisation
and a low-passed mu-law baseline at a comparable bitrate.

    python -m benchmarks.codec_learning --steps 150 --every 30 --out benchmarks/results/codec_learning
    python -m benchmarks.codec_learning --steps 90 --every 30 --files 8 --run-dir runs/codec_paper \
        --out benchmarks/results/codec_learning_paper codec.mel_weight=0 codec.l1_weight=0   # the paper recipe
    python -m benchmarks.codec_learning --eval-only --files 8 --run-dir runs/codec_paper \
        --out benchmarks/results/codec_learning_paper codec.mel_weight=0 codec.l1_weight=0   # + raw weights
    python -m benchmarks.codec_learning --plot a.json b.json --out benchmarks/results/codec_learning  # one figure
    python -m benchmarks.codec_learning --aot-topology v5e:2x2     # + the released-size step AOT-compiled for TPU

Training runs through the real job (`train_mimi`, the shared loop, checkpoints), in chunks of `--every` steps
(each chunk resumes from the previous checkpoint); after each chunk the checkpointed EMA generator
reconstructs the held-out utterances (whole files, the 8 default levels) and we record the mean mel distance
(mean |log10 mel| difference, 1024-point FFT, 64 bands) and SI-SNR. Baseline: each file resampled (soxr,
which low-passes) to `bitrate / bits` Hz, mu-law quantised to `bits` bits, decoded and resampled back to
24 kHz; the best bits in {2, 3, 4, 6, 8} is reported. Writes `<out>.json` and `<out>.png` (the curves).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("moshi_jax.bench")


def mulaw_roundtrip(wav: np.ndarray, sr: int, bitrate: float, bits: int, mu: float = 255.0) -> np.ndarray:
    """Low-pass + downsample to bitrate / bits Hz, mu-law quantise to `bits` bits, decode, upsample back."""
    from moshi_jax.audio import resample

    rate = int(bitrate // bits)
    x = resample(wav.astype(np.float32), sr, rate)
    peak = max(float(np.max(np.abs(x))), 1e-8)  # a per-file gain (a few bytes: ignored in the bitrate)
    y = np.sign(x / peak) * np.log1p(mu * np.abs(x / peak)) / np.log1p(mu)
    levels = 2 ** bits
    q = np.clip(np.round((y + 1) / 2 * (levels - 1)), 0, levels - 1) / (levels - 1) * 2 - 1
    x_hat = np.sign(q) * ((1 + mu) ** np.abs(q) - 1) / mu * peak
    out = resample(x_hat.astype(np.float32), rate, sr)
    out = out[: len(wav)]
    return np.pad(out, (0, len(wav) - len(out)))


def _metrics(ref: np.ndarray, est: np.ndarray, sr: int) -> tuple[float, float]:
    import jax.numpy as jnp

    from moshi_jax.training import codec_loss as L

    r, e = jnp.asarray(ref[None]), jnp.asarray(est[None])
    return float(L.mel_distance(r, e, sr)[0]), float(L.si_snr(r, e)[0])


def heldout_files(cfg, limit: int) -> list[Path]:
    from moshi_jax.data import codec_audio

    return codec_audio.list_audio(cfg.data.eval_sources[0].path)[:limit]


def evaluate_codec(steps, state, files, mcfg, ema: bool = True) -> dict:
    """Mean mel distance and SI-SNR of the (EMA, or raw with ema=False) generator's round trip over `files`."""
    import jax
    import jax.numpy as jnp

    from moshi_jax.audio import load_audio

    gen = state.ema if ema and steps.cfg.codec.weight_ema > 0 else state.gen
    if not hasattr(steps, "_bench_recon"):  # compiled once for all evaluations
        steps._bench_recon = jax.jit(lambda g, vq, w: steps.model.reconstruct(g["mimi"], vq, w))
    recon = steps._bench_recon
    wavs = [load_audio(f, mcfg.sample_rate)[0] for f in files]
    T = max(len(w) for w in wavs)
    T += -T % mcfg.frame_size
    # One batch, zero right-padded: Mimi is causal, so the padding does not change the output of the file.
    batch = np.stack([np.pad(w, (0, T - len(w))) for w in wavs])
    y = np.asarray(recon(jax.device_get(gen), jax.device_get(state.vq), jnp.asarray(batch)))
    mel, snr = [], []
    for w, out in zip(wavs, y, strict=True):
        m, s = _metrics(w, out[: len(w)], mcfg.sample_rate)
        mel.append(m)
        snr.append(s)
    return {"mel_distance": float(np.mean(mel)), "si_snr": float(np.mean(snr))}


def kmeans_initialised(steps, state, program):
    """The initial state with every codebook level k-means-initialised on the latents of the first training
    batch (what the first training steps do before learning anything): the codec "at initialisation". Fresh
    codebooks are zeros (reference buffers), which would make the initial codec output silence."""
    import jax
    import jax.numpy as jnp

    from moshi_jax.mimi.model import MimiModule
    from moshi_jax.mimi.vq_training import rvq_train

    model = steps.model

    @jax.jit  # one compilation (eagerly, every k-means level would compile on its own)
    def init_codebooks(gen, vq, wav):
        full = model.full_params(gen["mimi"], vq)
        latent, _ = model.module.apply({"params": full}, wav[:, 0, :, None], None, method=MimiModule.encode_latent)
        x = latent.reshape(-1, latent.shape[-1])
        new_vq = {}
        for name, levels in model.levels().items():
            xin = x @ gen["mimi"]["quantizer"][name]["input_proj"]
            new_vq[name] = vq[name]
            for lvl in range(levels):  # one level per call (a level initialises once the one before it has)
                new_vq[name] = rvq_train(xin, new_vq[name], levels, lvl, jax.random.PRNGKey(lvl), model.vq_opts)[3]
        return new_vq

    batch = next(program.train_iter())
    new_vq = init_codebooks(jax.device_get(state.gen), jax.device_get(state.vq), jnp.asarray(batch["wav"]))
    return state.replace(vq=new_vq)


def baseline(files, mcfg, bitrate: float) -> dict:
    from moshi_jax.audio import load_audio

    results = []
    for bits in (2, 3, 4, 6, 8):
        mel, snr = [], []
        for f in files:
            wav = load_audio(f, mcfg.sample_rate)[0]
            m, s = _metrics(wav, mulaw_roundtrip(wav, mcfg.sample_rate, bitrate, bits), mcfg.sample_rate)
            mel.append(m)
            snr.append(s)
        r = {"bits": bits, "rate_hz": int(bitrate // bits), "mel_distance": float(np.mean(mel)),
             "si_snr": float(np.mean(snr))}
        log.info("mu-law baseline %d bits at %d Hz: mel %.3f, SI-SNR %.2f dB", bits, r["rate_hz"], r["mel_distance"],
                 r["si_snr"])
        results.append(r)
    best = min(results, key=lambda r: r["mel_distance"])
    return {**best, "best_si_snr": max(r["si_snr"] for r in results), "all": results}


def run_learning(steps_total: int, every: int, run_dir: Path, overrides: list[str], n_files: int) -> dict:
    import jax

    from moshi_jax.training import config as config_lib
    from moshi_jax.training import train_mimi
    from moshi_jax.training.checkpointing import Checkpointer
    from moshi_jax.training.loop import train_loop

    base_overrides = [f"steps={steps_total}", f"run_dir={run_dir}", f"checkpoint.every={every}", "eval_every=0",
                      "metrics.progress_bar=false"]
    cfg = config_lib.load_config("mimi_tiny", base_overrides + overrides)
    cfg = train_mimi.prepare_codec_data(cfg)
    mcfg = config_lib.build_mimi_config(cfg)
    mesh = train_mimi.build_mesh(cfg)
    rules = train_mimi.codec_rules(cfg)
    program = train_mimi.mimi_program(cfg, mcfg)
    steps = train_mimi.CodecSteps(cfg, mcfg, mesh, rules, train_mimi.codec_batch_shardings(mesh))
    files = heldout_files(cfg, n_files)
    bitrate = mcfg.num_codebooks * math.log2(mcfg.bins) * mcfg.frame_rate
    log.info("held-out: %d files; codec bitrate %.0f bps (%d levels x %d bits x %.1f Hz)", len(files), bitrate,
             mcfg.num_codebooks, math.log2(mcfg.bins), mcfg.frame_rate)
    state0, _ = steps.init()
    curve = [{"step": 0, **evaluate_codec(steps, kmeans_initialised(steps, state0, program), files, mcfg)}]
    log.info("init: %s", curve[-1])
    del state0
    step_times, train_points = [], []
    t0 = time.perf_counter()
    done = 0
    while done < steps_total:
        report = train_loop(cfg, program, mesh, rules, stop_after=every)
        done = report["end_step"]
        if report["step_time_s"]:
            step_times.append(report["step_time_s"])
        train_points.append({"step": done, **{k: report["final"][k] for k in ("loss", "mel_loss", "l1_loss",
                                                                              "adv_loss", "feat_loss", "d_loss",
                                                                              "distill_loss", "commit_loss")
                                              if k in report["final"]}})
        with Checkpointer(cfg.checkpoint_dir) as ckpt:
            state = jax.device_get(ckpt.restore(done, steps.abstract_state))
        curve.append({"step": done, **evaluate_codec(steps, state, files, mcfg)})
        log.info("step %d: %s", done, curve[-1])
    wall = time.perf_counter() - t0
    base = baseline(files, mcfg, bitrate)
    step_time = float(np.median(step_times)) if step_times else None
    return {"config": "mimi_tiny", "overrides": overrides, "steps": steps_total, "batch": cfg.data.batch_size,
            "segment_s": cfg.data.seq_frames * mcfg.frame_size / mcfg.sample_rate, "devices": mesh.size,
            "device_kind": jax.devices()[0].device_kind, "heldout_files": len(files),
            "heldout_voices": list(__import__("moshi_jax.data.codec_audio", fromlist=["x"]).HELDOUT_VOICES),
            "bitrate_bps": bitrate, "curve": curve, "train": train_points, "baseline_mulaw": base,
            "step_time_s": step_time, "steps_per_s": 1 / step_time if step_time else None,
            "train_wall_s": wall, "params": steps.n_params, "export": report.get("export")}


def evaluate_run(run_dir: Path, overrides: list[str], n_files: int) -> dict:
    """Held-out metrics of the run's initialisation (step 0, codebooks k-means-initialised) and of every kept
    checkpoint of a run (stopped or finished), with the EMA and with the raw generator weights, and the mu-law
    baseline on the same files: a result `plot` reads (curve = EMA)."""
    import jax

    from moshi_jax.training import config as config_lib
    from moshi_jax.training import train_mimi
    from moshi_jax.training.checkpointing import Checkpointer

    cfg = train_mimi.prepare_codec_data(config_lib.load_config("mimi_tiny", [f"run_dir={run_dir}"] + overrides))
    mcfg = config_lib.build_mimi_config(cfg)
    mesh = train_mimi.build_mesh(cfg)
    steps = train_mimi.CodecSteps(cfg, mcfg, mesh, train_mimi.codec_rules(cfg), train_mimi.codec_batch_shardings(mesh))
    files = heldout_files(cfg, n_files)
    # The run's initial state (same seed) with k-means-initialised codebooks: the codec "at initialisation".
    state0, _ = steps.init()
    init = evaluate_codec(steps, kmeans_initialised(steps, state0, train_mimi.mimi_program(cfg, mcfg)), files, mcfg)
    log.info("init: %s", init)
    del state0
    curve, raw = [{"step": 0, **init}], [{"step": 0, **init}]
    with Checkpointer(cfg.checkpoint_dir) as ckpt:
        for step in ckpt.all_steps():
            state = jax.device_get(ckpt.restore(step, steps.abstract_state))
            curve.append({"step": step, **evaluate_codec(steps, state, files, mcfg, ema=True)})
            raw.append({"step": step, **evaluate_codec(steps, state, files, mcfg, ema=False)})
            log.info("step %d: EMA %s, raw %s", step, curve[-1], raw[-1])
    bitrate = mcfg.num_codebooks * math.log2(mcfg.bins) * mcfg.frame_rate
    return {"config": "mimi_tiny", "overrides": overrides, "batch": cfg.data.batch_size,
            "segment_s": cfg.data.seq_frames * mcfg.frame_size / mcfg.sample_rate, "heldout_files": len(files),
            "bitrate_bps": bitrate, "curve": curve, "curve_raw": raw, "baseline_mulaw": baseline(files, mcfg, bitrate)}


def aot_released(topology: str) -> dict:
    """The released-size Mimi training step (configs/mimi.py) compiled for a TPU topology (in .venv-tpu)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "train.tpu_aot", "compile", "mimi", "--topology", topology],
                         cwd=repo, capture_output=True, text=True, timeout=3000)
    if out.returncode:
        raise RuntimeError(f"tpu_aot failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_label(result: dict) -> str:
    """'paper recipe' (adversarial + feature matching only) or the reconstruction losses the run added."""
    from moshi_jax.training import config as config_lib

    codec = config_lib.load_config("mimi_tiny", [o for o in result["overrides"] if o.startswith("codec.")]).codec
    if codec.mel_weight == 0 and codec.l1_weight == 0:
        return "paper recipe (adv + feat)"
    return f"+ mel x{codec.mel_weight:g} + L1 x{codec.l1_weight:g}"


def plot(results: list[dict], path: Path) -> None:
    """The held-out curves of one or more runs (EMA weights) against the mu-law baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = results[0]
    base = first["baseline_mulaw"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for a, key, label in ((ax[0], "mel_distance", "mel distance (lower is better)"),
                          (ax[1], "si_snr", "SI-SNR dB (higher is better)")):
        for result in results:
            a.plot([c["step"] for c in result["curve"]], [c[key] for c in result["curve"]], "o-",
                   label=f"mimi_tiny, {run_label(result)}")
        a.axhline(base[key], color="gray", ls="--", label=f"mu-law {base['bits']} bit @ {base['rate_hz']} Hz")
        a.set_xlabel("training step")
        a.set_title(f"held-out voices: {label}", fontsize=10)
        a.legend(fontsize=7)
    fig.suptitle(f"mimi_tiny on CPU (EMA weights), {first['bitrate_bps']:.0f} bps, batch {first['batch']} x "
                 f"{first['segment_s']:.2f} s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.codec_learning", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--every", type=int, default=30, help="steps between held-out evaluations")
    p.add_argument("--files", type=int, default=24, help="held-out files evaluated")
    p.add_argument("--run-dir", type=Path, default=Path("runs/codec_learning"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/codec_learning"))
    p.add_argument("--aot-topology", default=None, help="also AOT-compile the released-size step (e.g. v5e:2x2)")
    p.add_argument("--aot-only", action="store_true")
    p.add_argument("--eval-only", action="store_true",
                   help="held-out metrics of --run-dir's kept checkpoints (EMA and raw weights); no training")
    p.add_argument("--plot", nargs="+", type=Path, default=None, metavar="RESULT_JSON",
                   help="only plot these results' curves together into <out>.png")
    p.add_argument("overrides", nargs="*", help="mimi_tiny config overrides key=value")
    args = p.parse_args(argv)
    from moshi_jax.training.loop import setup_logging

    setup_logging()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    if args.plot:
        plot([json.loads(p.read_text()) for p in args.plot], args.out.with_suffix(".png"))
        return 0
    if args.eval_only:
        result = evaluate_run(args.run_dir, args.overrides, args.files)
        args.out.with_name(args.out.name + "_final_eval.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return 0
    if not args.aot_only:
        result = run_learning(args.steps, args.every, args.run_dir, args.overrides, args.files)
        plot([result], args.out.with_suffix(".png"))
    if args.aot_topology:
        result["aot_released"] = aot_released(args.aot_topology)
    path = args.out.with_suffix(".json") if not args.aot_only else args.out.with_name(args.out.name + "_aot.json")
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("curve", "train")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
