"""Ahead-of-time compile of the LM train step for a TPU slice, on a machine without TPUs (libtpu compile-only).

    python -m train.tpu_aot setup                         # create .venv-tpu: libtpu only (~700 MB, ~15 s)
    python -m train.tpu_aot compile tiny --topology v5e:2x2 [key=value ...]      # runs inside .venv-tpu
    python -m train.tpu_aot compile 7b --topology v5p:2x2x2 --mesh 1,8,1 --json out.json
    python -m train.tpu_aot engine moshi_7b --topology v5e:2x2 --batches 1 32    # serving roofline, one chip
    python -m train.tpu_aot compile 7b --topology v5p:2x2x2 --extrapolate-layers 1,2   # full-depth train roofline
    python -m train.tpu_aot extrapolate L1.json L2.json --full-layers 32         # the same from point compiles

libtpu must not live in the main environment (on a CPU machine it would make jax probe for TPUs), so `setup`
creates a separate venv holding only the libtpu wheel pinned by jax's own `tpu` extra, plus a `.pth` file
that puts the main environment's packages (jax, flax, optax, ...) after it on `sys.path`. `compile` re-executes
itself with that venv's Python when it is not already running there, builds a mesh of the topology's devices
(`jax.experimental.topologies.get_topology_desc`), lowers and compiles the sharded, donated train step from
abstract shapes only (no parameter is allocated) and prints XLA's per-device memory analysis and FLOPs as JSON,
with XLA's bytes accessed and a roofline against the chip's peaks (`CHIPS`): the step time if it ran at peak
FLOP/s or peak HBM bandwidth, whichever is slower, and the MFU that implies. `engine` does the same for the
serving step on one chip and derives the sessions a chip holds and serves in real time.
XLA's cost analysis counts a while loop's body once, so a scanned layer stack reports one layer: `--extrapolate-layers`
compiles the step unrolled at a few temporal depths of the same widths and extrapolates linearly to the config's
depth (`fit_layers`, `extrapolated_step`); a program libtpu refuses for want of HBM is reported with the
temporaries it needed. The kernels are
traced with `moshi_jax.nn.backend`'s portable choices (the host backend of a compile-only run is CPU).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from moshi_jax.nn import backend

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = REPO / ".venv-tpu"
VENV_ENV_VAR = "MOSHI_JAX_TPU_VENV"


def venv_path() -> Path:
    return Path(os.environ.get(VENV_ENV_VAR) or DEFAULT_VENV)


def venv_python(venv: Path | None = None) -> Path:
    return (venv or venv_path()) / "bin" / "python"


def libtpu_requirement() -> str:
    """The libtpu pin of the installed jax's `tpu` extra (e.g. 'libtpu==0.0.42.*')."""
    for req in importlib.metadata.requires("jax") or []:
        if req.startswith("libtpu") and "extra == \"tpu\"" in req:
            return req.split(";")[0].replace(" ", "")
    raise RuntimeError("the installed jax declares no libtpu version in its `tpu` extra")


def venv_is_ready(venv: Path | None = None) -> tuple[bool, str]:
    """(ready, reason): the venv exists and its Python can import libtpu and jax."""
    py = venv_python(venv)
    if not py.exists():
        return False, f"no TPU compile venv at {py.parent.parent} (create it: python -m train.tpu_aot setup)"
    probe = subprocess.run([str(py), "-c", "import libtpu, jax; print(jax.__version__)"], capture_output=True,
                           text=True, timeout=120)
    if probe.returncode:
        return False, f"{py} cannot import libtpu + jax: {probe.stderr.strip()[-300:]}"
    return True, probe.stdout.strip()


def setup(venv: Path | None = None) -> Path:
    """Create the libtpu-only venv layered over the current environment."""
    venv = venv or venv_path()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv_python(venv)), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    req = libtpu_requirement()
    # pip of the current environment installs into the new venv's site-packages (--target), no deps: jax,
    # jaxlib etc. come from the base environment through the .pth file below.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(site),
                    req], check=True)
    base = sysconfig.get_paths()["purelib"]
    # addsitedir (not a plain path line) so the base environment's own .pth files (editable installs) apply too.
    (site / "zz_moshi_jax_base_env.pth").write_text(f"import site; site.addsitedir({base!r})\n")
    ok, why = venv_is_ready(venv)
    if not ok:
        raise RuntimeError(why)
    print(f"created {venv} ({req}, over {base}) in {time.perf_counter() - t0:.1f}s")
    return venv


# ----------------------------------------------------------------------------------------------- compile


def _topology_mesh(topology: str, mesh_shape: tuple[int, ...] | None):
    import jax
    from jax.experimental import topologies

    from moshi_jax.training import mesh as mesh_lib

    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    devices = list(topo.devices)
    shape = mesh_shape or (1, -1, 1)
    del jax
    return mesh_lib.make_mesh(shape, devices), devices[0].device_kind


def compile_lm(config: str, overrides: list[str], topology: str, mesh_shape: tuple[int, ...] | None = None,
               batch_size: int | None = None) -> dict:
    """Lower + compile `config`'s LM train step for `topology`; returns sizes, memory (bytes per device) and
    FLOPs. `batch_size` (default: the config's) is the global batch."""
    import jax

    from moshi_jax.nn.quant import nbytes
    from moshi_jax.training import config as config_lib
    from moshi_jax.training import mesh as mesh_lib
    from moshi_jax.training.optimizer import make_optimizer, make_schedule
    from moshi_jax.training.step import aot_compile_step
    from moshi_jax.training.train_state import build_state_spec, count_params
    from train.train_lm import lm_program

    cfg = config_lib.load_config(config, overrides)
    if batch_size is not None:
        cfg = config_lib.apply_overrides(cfg, [f"data.batch_size={batch_size}"])
    lm_cfg = config_lib.build_lm_config(cfg)
    mesh, kind = _topology_mesh(topology, mesh_shape)
    rules = cfg.mesh.rules if cfg.mesh.rules is not None else mesh_lib.LOGICAL_AXIS_RULES
    program = lm_program(cfg, lm_cfg)
    tx = make_optimizer(cfg.optimizer, cfg.steps)
    B, T = cfg.data.batch_size, cfg.data.seq_frames
    batch_sh = program.batch_shardings(mesh)
    shapes = {"codes": ((B, 1 + lm_cfg.n_q, T), "int32")}
    try:
        with backend.override("portable"):  # the host backend here is CPU; the target is a TPU
            res = aot_compile_step(program.task, tx, make_schedule(cfg.optimizer, cfg.steps), mesh, rules, shapes,
                                   batch_sh, lora=cfg.lora, microbatches=cfg.optimizer.microbatches,
                                   compute_dtype=cfg.compute_dtype)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # libtpu refuses to compile a program that cannot fit the chip: report what it needs instead.
        return {"config": config, "overrides": overrides, "topology": topology, "device_kind": kind,
                "mesh": {k: int(v) for k, v in mesh.shape.items()}, "batch": [B, 1 + lm_cfg.n_q, T],
                "remat": cfg.remat, "lora": cfg.lora.enabled, "temporal_layers": lm_cfg.temporal.num_layers,
                "oom": str(e).split("\n")[0][:400], "temp_required_bytes": oom_temp_bytes(str(e)),
                "hbm_bytes_per_chip": chip_peaks(topology)[2]}
    cost = _cost(res.compiled)
    spec = build_state_spec(program.task, tx, mesh, rules, cfg.lora)
    trainable = count_params(spec.abstract_state.params)
    state_bytes, frozen_bytes = nbytes(spec.abstract_state), nbytes(spec.abstract_frozen)
    mem = res.memory
    per_device = mem.get("argument_size_in_bytes", 0) + mem.get("output_size_in_bytes", 0) \
        - mem.get("alias_size_in_bytes", 0) + mem.get("temp_size_in_bytes", 0)
    return {
        "config": config, "overrides": overrides, "topology": topology, "device_kind": kind,
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "batch": [B, 1 + lm_cfg.n_q, T],
        "compute_dtype": cfg.compute_dtype, "remat": cfg.remat, "lora": cfg.lora.enabled,
        "microbatches": cfg.optimizer.microbatches,
        "temporal_layers": lm_cfg.temporal.num_layers, "scan_layers": cfg.scan_layers,
        "while_loops": count_program_loops(res.lowered), "compiled_while_loops": count_while_loops(res.compiled),
        "params": count_params(spec.abstract_params), "trainable_params": trainable,
        "train_state_bytes_total": state_bytes, "frozen_bytes_total": frozen_bytes,
        "flops_per_device_step": res.flops, "model_flops_per_step": program.flops_per_step,
        "compile_seconds": res.compile_seconds, "num_devices": res.num_devices,
        "peak_bytes_per_device_estimate": per_device, **mem,
        "bytes_accessed_per_device_step": cost["bytes_accessed"], "xla_optimal_seconds": cost["optimal_seconds"],
        "roofline": train_roofline(topology, res.flops, cost["bytes_accessed"], program.flops_per_step,
                                   res.num_devices, B * T),
        "hbm_bytes_per_chip": chip_peaks(topology)[2],
    }


def oom_temp_bytes(message: str) -> float | None:
    """The temporaries a refused TPU program needed, from libtpu's 'memory required for HLO temporaries (17.56G)'."""
    m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
    return float(m.group(1)) * 2 ** (10 * "KMGT".index(m.group(2)) + 10) if m else None


def count_program_loops(lowered) -> int:
    """While loops of the traced program (scanned layer stacks, the microbatch loop): StableHLO `while` ops."""
    return len(re.findall(r"stablehlo\.while\b", lowered.as_text())) if lowered is not None else -1


def count_while_loops(compiled) -> int:
    """While loops in the compiled HLO, the program's and any XLA made (e.g. a collective matmul decomposed over
    the shards); XLA's cost analysis counts each one's body once. -1 if unreadable."""
    try:
        return len(re.findall(r"\bwhile\(", compiled.as_text()))
    except Exception:  # noqa: BLE001 - a backend that cannot print its executable
        return -1


# ----------------------------------------------------------------------------------------------- layer extrapolation

#: Per-device quantities of a compiled train step that grow linearly with the temporal depth (identical layers).
LINEAR_FIELDS = ("flops_per_device_step", "bytes_accessed_per_device_step", "argument_size_in_bytes",
                 "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "peak_bytes_per_device_estimate", "model_flops_per_step", "params", "trainable_params",
                 "train_state_bytes_total", "frozen_bytes_total")
#: AdamW's float32 update traffic per trainable parameter: read param, grad, mu, nu; write param, mu, nu.
ADAMW_BYTES_PER_PARAM = 7 * 4


def fit_layers(points: list[dict], full_layers: int) -> dict:
    """Linear fit cost(L) = base + L * per_layer over compiled points of the same step at temporal depths L
    (`points[i]["temporal_layers"]`, layers unrolled so that XLA counts every layer), from the two shallowest;
    every further point checks the linearity (relative error of the prediction). Returns the fit and the
    values at `full_layers`."""
    pts = sorted(points, key=lambda p: p["temporal_layers"])
    depths = [p["temporal_layers"] for p in pts]
    if len(pts) < 2 or len(set(depths)) != len(depths):
        raise ValueError(f"need >= 2 compiled points at distinct depths, got depths {depths}")
    # JAX lowers a one-step scan (a 1-layer stack) as a while loop of trip count 1: counted once is exact there
    # (and XLA removes it); deeper points must hold no loop.
    loops = [p.get("while_loops", 0) for p in pts]
    if any(n > 0 and p["temporal_layers"] > 1 for n, p in zip(loops, pts, strict=True)):
        raise ValueError(f"the programs hold while loops ({loops}): XLA counts a loop body once; compile "
                         "them with scan_layers=false and optimizer.microbatches=1")
    a, b = pts[0], pts[1]
    la, lb = a["temporal_layers"], b["temporal_layers"]
    per_layer = {k: (b[k] - a[k]) / (lb - la) for k in LINEAR_FIELDS}
    base = {k: a[k] - la * per_layer[k] for k in LINEAR_FIELDS}
    check = {str(p["temporal_layers"]): {k: (base[k] + p["temporal_layers"] * per_layer[k] - p[k]) / p[k]
                                         for k in LINEAR_FIELDS if p[k]} for p in pts[2:]}
    worst = max((abs(e) for c in check.values() for e in c.values()), default=None)
    return {"fit_depths": [la, lb], "check_depths": depths[2:], "full_layers": full_layers, "base": base,
            "per_layer": per_layer, "at_full_depth": {k: base[k] + full_layers * per_layer[k] for k in LINEAR_FIELDS},
            "linearity_rel_error": check, "linearity_max_rel_error": worst}


def extrapolated_step(points: list[dict], full_layers: int, microbatches: int = 1) -> dict:
    """The full-depth train step from unrolled shallow compiles: `fit_layers` at `full_layers`, the roofline
    (compute and HBM time at the chip's peaks, the MFU it implies, frames/s) and the HBM fit per chip.

    `microbatches` M > 1: the points are compiles of ONE microbatch (global batch B/M, no accumulation loop), so
    the step does M times their FLOPs and bytes less the (M - 1) AdamW updates it does not repeat (analytic
    float32 traffic, `ADAMW_BYTES_PER_PARAM`), and holds one more float32 copy of its trainable shard (the
    gradient accumulator). Those two corrections are estimates; everything else is XLA's own count."""
    fit = fit_layers(points, full_layers)
    full = dict(fit["at_full_depth"])
    # XLA's temporaries follow its scheduling: between shallow points they can even shrink with depth. Then the
    # memory is not extrapolated: the largest point's temporaries make a lower bound (compile the scanned
    # full-depth step for the real figure: its memory analysis is right, only its cost analysis is not).
    temps_linear = fit["per_layer"]["temp_size_in_bytes"] >= 0
    if not temps_linear:
        full["temp_size_in_bytes"] = max(p["temp_size_in_bytes"] for p in points)
        full["peak_bytes_per_device_estimate"] = (full["argument_size_in_bytes"] + full["output_size_in_bytes"]
                                                  - full["alias_size_in_bytes"] + full["temp_size_in_bytes"])
    p0 = points[0]
    n, topology = p0["num_devices"], p0["topology"]
    frames = p0["batch"][0] * p0["batch"][2]
    if microbatches > 1:
        update_bytes = ADAMW_BYTES_PER_PARAM * full["trainable_params"] / n
        full["flops_per_device_step"] *= microbatches
        full["model_flops_per_step"] *= microbatches
        full["bytes_accessed_per_device_step"] = (microbatches * full["bytes_accessed_per_device_step"]
                                                  - (microbatches - 1) * update_bytes)
        accumulator = 4 * full["trainable_params"] / n
        full["temp_size_in_bytes"] += accumulator
        full["peak_bytes_per_device_estimate"] += accumulator
        frames *= microbatches
    hbm = chip_peaks(topology)[2]
    out = {k: p0[k] for k in ("config", "topology", "device_kind", "mesh", "num_devices", "compute_dtype", "remat",
                              "lora") if k in p0}
    out.update({
        "overrides": [o for o in p0["overrides"] if not o.startswith(("model.temporal.num_layers=", "scan_layers=",
                                                                      "optimizer.microbatches="))],
        "batch": [p0["batch"][0] * microbatches, *p0["batch"][1:]], "microbatches": microbatches,
        "extrapolated_from_layers": fit["fit_depths"], "temporal_layers": full_layers,
        "compile_seconds": sum(p["compile_seconds"] for p in points), **full,
        "xla_over_model_flops": full["flops_per_device_step"] * n / full["model_flops_per_step"],
        "roofline": train_roofline(topology, full["flops_per_device_step"], full["bytes_accessed_per_device_step"],
                                   full["model_flops_per_step"], n, frames),
        "hbm_bytes_per_chip": hbm, "fits_hbm": full["peak_bytes_per_device_estimate"] <= hbm,
        "memory_is_lower_bound": not temps_linear,
        "fit": fit, "points": points,
    })
    return out


def compile_extrapolated(config: str, overrides: list[str], topology: str, layers: list[int],
                         mesh_shape: tuple[int, ...] | None = None, batch_size: int | None = None) -> dict:
    """Compile the LM train step unrolled (scan_layers=false) at the temporal depths `layers` (same widths,
    same depth transformer) and extrapolate linearly to the config's depth (`extrapolated_step`): XLA's cost
    analysis of a scanned stack counts one layer, and a full-depth unrolled 7B compile takes far longer."""
    from moshi_jax.training import config as config_lib

    cfg = config_lib.load_config(config, overrides)
    if batch_size is not None:
        cfg = config_lib.apply_overrides(cfg, [f"data.batch_size={batch_size}"])
    full_layers = config_lib.build_lm_config(cfg).temporal.num_layers
    M = cfg.optimizer.microbatches
    points = []
    for L in layers:
        t0 = time.perf_counter()
        p = compile_lm(config, [*overrides, f"model.temporal.num_layers={L}", "scan_layers=false",
                                "optimizer.microbatches=1"], topology, mesh_shape, cfg.data.batch_size // M)
        points.append(p)
        if p.get("oom"):
            print(f"  {L} temporal layers: does not fit one chip: {p['oom']}", file=sys.stderr, flush=True)
            return {**p, "temporal_layers": full_layers, "oom_at_layers": L, "fits_hbm": False, "microbatches": M,
                    "overrides": overrides, "points": points}
        print(f"  {L} temporal layers: {p['flops_per_device_step']:.4e} flop, "
              f"{p['bytes_accessed_per_device_step'] / 1e9:.2f} GB accessed, peak "
              f"{p['peak_bytes_per_device_estimate'] / 2**30:.2f} GiB per device, {p['while_loops']} while loops "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return extrapolated_step(points, full_layers, M)


# ----------------------------------------------------------------------------------------------- roofline

#: Public per-chip peaks: bf16 dense FLOP/s, HBM bandwidth (bytes/s), HBM capacity (bytes).
CHIPS = {"v5e": (197e12, 819e9, 16 * 2**30), "v5p": (459e12, 2765e9, 95 * 2**30),
         "v4": (275e12, 1228e9, 32 * 2**30), "v6e": (918e12, 1640e9, 32 * 2**30)}


def chip_peaks(topology: str) -> tuple[float, float, float]:
    name = topology.split(":")[0].lower()
    if name not in CHIPS:
        raise ValueError(f"no peak figures for TPU {name!r} (known: {sorted(CHIPS)})")
    return CHIPS[name]


def _cost(compiled) -> dict:
    ca = compiled.cost_analysis()
    ca = (ca[0] if ca else {}) if isinstance(ca, list | tuple) else (ca or {})
    return {"flops": float(ca.get("flops", 0.0)), "bytes_accessed": float(ca.get("bytes accessed", 0.0)),
            "optimal_seconds": float(ca.get("optimal_seconds", float("nan")))}


def roofline_seconds(topology: str, flops: float, bytes_accessed: float) -> dict:
    """Roofline time of one program on one chip: the larger of compute time at peak and memory time at peak."""
    peak, bw, _ = chip_peaks(topology)
    t_c, t_m = flops / peak, bytes_accessed / bw
    return {"compute_s": t_c, "memory_s": t_m, "roofline_s": max(t_c, t_m),
            "bound": "compute" if t_c >= t_m else "memory"}


def train_roofline(topology: str, flops_per_device: float, bytes_per_device: float, model_flops: float,
                   num_devices: int, frames_per_step: int) -> dict:
    """Roofline step time per device and the MFU it implies (model FLOPs / (chips x peak x time)).

    XLA's cost analysis counts a while loop's body once, so a scanned layer stack (`scan_layers=True`) reports
    about 1/L of the step's FLOPs and bytes. Where the analytic model FLOPs per device exceed XLA's count,
    the compute time uses the model FLOPs and `xla_counts_loop_body_once` is set: the memory time is then a
    lower bound too (compile with scan_layers=false for a full count)."""
    undercount = model_flops / num_devices > flops_per_device
    r = roofline_seconds(topology, max(flops_per_device, model_flops / num_devices), bytes_per_device)
    r["xla_counts_loop_body_once"] = undercount
    peak = chip_peaks(topology)[0]
    r["implied_mfu"] = model_flops / (num_devices * peak * r["roofline_s"]) if r["roofline_s"] else None
    r["frames_per_s"] = frames_per_step / r["roofline_s"] if r["roofline_s"] else None
    return r


def compile_engine(preset: str, topology: str, batches: list[int], kernels: str = "portable",
                   kv_cache_dtype: str | None = None, weight_dtype: str | None = None) -> dict:
    """The full-duplex engine step (Mimi enc + LM + Mimi dec, LM in bf16, donated state) compiled for ONE chip of
    `topology`, per batch size: XLA's cost analysis (flops, bytes accessed, optimal_seconds), memory analysis,
    roofline time per frame on that chip, and the sessions one chip holds (HBM) and serves (80 ms frames).
    `kv_cache_dtype` / `weight_dtype` ("int8"): the engine's int8 serving options (`EngineConfig`)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from moshi_jax.engine.engine import Engine, EngineConfig, preset_configs
    from moshi_jax.lm import generate as gen
    from moshi_jax.lm import model as lm_model
    from moshi_jax.mimi.model import MimiCodec
    from moshi_jax.nn.quant import nbytes

    dev = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0]
    rep = NamedSharding(Mesh([dev], ("x",)), P())
    mimi_cfg, lm_cfg = preset_configs(preset)
    lm_cfg = lm_cfg.with_dtypes("bfloat16", "bfloat16")
    ecfg = EngineConfig(kv_cache_dtype=kv_cache_dtype, weight_dtype=weight_dtype)
    engine = Engine(mimi_cfg, lm_cfg, ecfg, None)
    abs_lm = jax.eval_shape(lambda k: nn.unbox(lm_model.init_params(lm_cfg, k)), jax.random.PRNGKey(0))
    put = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), t)  # noqa: E731
    params = put({"mimi": jax.eval_shape(lambda k: MimiCodec(mimi_cfg).init(k), jax.random.PRNGKey(1)),
                  "lm": jax.eval_shape(lambda p: gen.prepare_streaming_params(p, lm_cfg, weight_dtype=weight_dtype),
                                       abs_lm)})
    peak, bw, hbm = chip_peaks(topology)
    out = {"preset": preset, "topology": topology, "device_kind": dev.device_kind, "kernels": kernels,
           "kv_cache_dtype": kv_cache_dtype, "weight_dtype": weight_dtype,
           "param_bytes": nbytes(params), "per_batch": {}}
    for B in batches:
        state = put(jax.eval_shape(lambda B=B: engine.init_state(B)))
        pcm = jax.ShapeDtypeStruct((B, engine.frame_size), jnp.float32, sharding=rep)
        act = jax.ShapeDtypeStruct((B,), jnp.bool_, sharding=rep)
        t0 = time.perf_counter()
        with backend.override(kernels):
            compiled = jax.jit(engine._step_impl, donate_argnums=(1,)).lower(params, state, pcm, act).compile()
        mem = memory_stats_dict(compiled)
        cost = _cost(compiled)
        r = {"compile_s": round(time.perf_counter() - t0, 1), "state_bytes": nbytes(state), **cost, **mem,
             **roofline_seconds(topology, cost["flops"], cost["bytes_accessed"])}
        r["weights_plus_state_bytes"] = out["param_bytes"] + r["state_bytes"]
        r["bytes_over_weights_plus_state"] = cost["bytes_accessed"] / r["weights_plus_state_bytes"]
        out["per_batch"][str(B)] = r
        print(f"  B={B}: {cost['flops']:.3e} flop, {cost['bytes_accessed'] / 1e9:.2f} GB accessed "
              f"({r['bytes_over_weights_plus_state']:.2f}x weights+state), roofline {1e3 * r['roofline_s']:.2f} ms "
              f"({r['bound']}), XLA optimal {1e3 * cost['optimal_seconds']:.2f} ms; temporaries "
              f"{mem.get('temp_size_in_bytes', 0) / 2**30:.2f} GiB, aliased "
              f"{mem.get('alias_size_in_bytes', 0) / 2**30:.2f} GiB ({r['compile_s']} s)", file=sys.stderr, flush=True)
    out.update(sessions_per_chip(out, hbm))
    return out


def memory_stats_dict(compiled) -> dict:
    m = compiled.memory_analysis()
    names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
    return {n: int(getattr(m, n)) for n in names if m is not None and hasattr(m, n)}


def sessions_per_chip(res: dict, hbm: float, frame_s: float = 0.080) -> dict:
    """From the two largest compiled batch sizes (memory and roofline time are linear in B): the most sessions
    whose compiled step fits the chip's HBM, and the most whose roofline time per frame stays under 80 ms."""
    pts = sorted((int(b), r) for b, r in res["per_batch"].items())
    if len(pts) < 2:
        return {}
    (b0, r0), (b1, r1) = pts[-2], pts[-1]

    def total(r):
        return r.get("argument_size_in_bytes", 0) + r.get("output_size_in_bytes", 0) \
            - r.get("alias_size_in_bytes", 0) + r.get("temp_size_in_bytes", 0)

    dm = (total(r1) - total(r0)) / (b1 - b0)
    dt = (r1["roofline_s"] - r0["roofline_s"]) / (b1 - b0)
    fit = b1 + math.floor((hbm - total(r1)) / dm + 1e-9) if dm > 0 else None
    real_time = b1 + math.floor((frame_s - r1["roofline_s"]) / dt + 1e-9) if dt > 0 else None
    ds = (r1["state_bytes"] - r0["state_bytes"]) / (b1 - b0)
    return {"bytes_per_extra_session": dm, "state_bytes_per_session": ds,
            "roofline_s_per_extra_session": dt, "sessions_fit_hbm": fit, "sessions_real_time_roofline": real_time,
            "sessions_per_chip": None if fit is None or real_time is None else max(0, min(fit, real_time))}


def compile_codec(config: str, overrides: list[str], topology: str, mesh_shape: tuple[int, ...] | None = None,
                  batch_size: int | None = None) -> dict:
    """The same for a codec config (program=mimi): moshi_jax.training.train_mimi.aot_compile_codec."""
    from moshi_jax.training import config as config_lib
    from moshi_jax.training.train_mimi import aot_compile_codec

    cfg = config_lib.load_config(config, overrides)
    if batch_size is not None:
        cfg = config_lib.apply_overrides(cfg, [f"data.batch_size={batch_size}"])
    mesh, kind = _topology_mesh(topology, mesh_shape or (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    with backend.override("portable"):  # as compile_lm: the host backend is CPU, the target a TPU
        result = aot_compile_codec(cfg, mesh)
    return {**result, "config": config, "overrides": overrides, "topology": topology, "device_kind": kind}


def _compile(config: str, overrides: list[str], topology: str, mesh_shape, batch_size) -> dict:
    """Dispatch on the config's program kind (lm | mimi)."""
    from moshi_jax.training import config as config_lib

    program = config_lib.load_config(config, overrides, check_model=False).program
    return (compile_codec if program == "mimi" else compile_lm)(config, overrides, topology, mesh_shape, batch_size)


def _in_tpu_venv() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def _parse_mesh(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    parts = tuple(int(p) for p in re.split(r"[,x]", text))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--mesh needs 3 sizes data,fsdp,tensor, got {text!r}")
    return parts


def format_summary(r: dict) -> str:
    gib = 2 ** 30
    if r.get("oom"):
        need = r.get("temp_required_bytes")
        return (f"AOT train step: config {r['config']} {' '.join(r['overrides'])} on {r['topology']} (mesh "
                f"{r['mesh']}): DOES NOT FIT {r['hbm_bytes_per_chip'] / gib:.0f} GiB per chip at "
                f"{r.get('oom_at_layers', r['temporal_layers'])} temporal layers"
                + (f" (temporaries alone {need / gib:.2f} GiB)" if need else "") + f": {r['oom']}")
    lines = [f"AOT train step: config {r['config']} {' '.join(r['overrides'])} on {r['topology']} "
             f"({r['num_devices']} x {r['device_kind']}, mesh {r['mesh']})",
             f"  params {r['params'] / 1e9:.3f}B, trainable {r['trainable_params'] / 1e6:.1f}M"
             f"{' (LoRA)' if r['lora'] else ''}; batch {r['batch']}, {r['compute_dtype']}, remat {r['remat']}",
             f"  compile {r['compile_seconds']:.1f}s; per device: arguments "
             f"{r.get('argument_size_in_bytes', 0) / gib:.2f} GiB, outputs {r.get('output_size_in_bytes', 0) / gib:.2f}"
             f" GiB, aliased (donated) {r.get('alias_size_in_bytes', 0) / gib:.2f} GiB, temporaries "
             f"{r.get('temp_size_in_bytes', 0) / gib:.2f} GiB -> peak ~{r['peak_bytes_per_device_estimate'] / gib:.2f}"
             f" GiB",
             f"  XLA flops per device per step {r['flops_per_device_step']:.3e}; model flops per step "
             f"{r['model_flops_per_step']:.3e}"]
    if r.get("roofline"):
        rf = r["roofline"]
        lines.append(f"  bytes accessed per device {r['bytes_accessed_per_device_step'] / 1e9:.1f} GB; roofline step "
                     f"{rf['roofline_s']:.3f} s ({rf['bound']}-bound) -> implied MFU {rf['implied_mfu']:.1%}, "
                     f"{rf['frames_per_s']:.0f} frames/s")
    if r.get("fit"):
        f = r["fit"]
        err = f["linearity_max_rel_error"]
        lines.append(f"  extrapolated from unrolled compiles at {f['fit_depths']} temporal layers to "
                     f"{f['full_layers']} (linearity checked at {f['check_depths'] or 'no third depth'}"
                     f"{'' if err is None else f', max rel. error {err:.2%}'}); XLA / model flops "
                     f"{r['xla_over_model_flops']:.2f}; fits {r['hbm_bytes_per_chip'] / gib:.0f} GiB HBM: "
                     f"{r['fits_hbm']}" + (" (temporaries not linear in depth: memory is a lower bound)"
                                           if r.get("memory_is_lower_bound") else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.tpu_aot", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="create the libtpu-only venv (default .venv-tpu, or $MOSHI_JAX_TPU_VENV)")
    s.add_argument("--venv", type=Path, default=None)
    c = sub.add_parser("compile", help="compile a config's train step for a TPU topology; print memory + flops")
    c.add_argument("config", help="configs/<name>.py preset (tiny, 100m, 2b, 7b) or a path")
    c.add_argument("overrides", nargs="*", help="key=value config overrides")
    c.add_argument("--topology", default="v5e:2x2", help="TPU topology name, e.g. v5e:2x2, v5e:4x4, v5p:2x2x2")
    c.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes (default 1,-1,1: all chips on fsdp)")
    c.add_argument("--batch-size", type=int, default=None, help="global batch (default: the config's)")
    c.add_argument("--extrapolate-layers", default=None, metavar="L1,L2[,L3]",
                   help="compile unrolled (scan_layers=false) at these temporal depths and extrapolate linearly to "
                        "the config's depth (XLA counts a scanned stack's layer once); a third depth checks "
                        "linearity. With optimizer.microbatches=M the points are one microbatch each (B/M)")
    c.add_argument("--json", type=Path, default=None, help="also write the result here")
    x = sub.add_parser("extrapolate", help="combine `compile` JSONs of unrolled shallow points (same step, "
                                           "model.temporal.num_layers=L scan_layers=false) into the full-depth "
                                           "roofline; runs anywhere (no compile)")
    x.add_argument("points", type=Path, nargs="+", help="compile --json outputs, >= 2 depths")
    x.add_argument("--full-layers", type=int, required=True, help="temporal depth to extrapolate to (7B: 32)")
    x.add_argument("--microbatches", type=int, default=1, help="the points are one microbatch of this many")
    x.add_argument("--json", type=Path, default=None, help="also write the result here")
    e = sub.add_parser("engine", help="compile the full-duplex engine step for one chip of a TPU topology; print "
                                      "cost analysis, memory and the roofline time per frame / sessions per chip")
    e.add_argument("preset", nargs="?", default="moshi_7b", help="engine preset (tiny, bench_111m, moshi_7b)")
    e.add_argument("--topology", default="v5p:2x2x1", help="TPU topology; one chip of it is used")
    e.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes (>= 2 of them for the "
                                                                            "sessions-per-chip estimate)")
    e.add_argument("--kernels", default="portable", choices=sorted(backend.NAMED),
                   help="kernel choices (moshi_jax.nn.backend): portable = what a TPU run traces")
    e.add_argument("--kv-cache-dtype", default=None, choices=["int8"], help="int8 KV rings (default: bf16)")
    e.add_argument("--weight-dtype", default=None, choices=["int8"], help="int8 transformer weights (default: bf16)")
    e.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    if args.cmd == "setup":
        setup(args.venv)
        return 0
    if args.cmd == "extrapolate":
        result = extrapolated_step([json.loads(f.read_text()) for f in args.points], args.full_layers,
                                   args.microbatches)
        print(format_summary(result), file=sys.stderr)
        return _emit(result, args.json)
    if not _in_tpu_venv():  # re-run inside the TPU venv
        ok, why = venv_is_ready()
        if not ok:
            print(why, file=sys.stderr)
            return 2
        env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
        # This environment's packages first (whichever env created the TPU venv): the worker then runs the
        # same jax / flax as the caller, plus libtpu from the TPU venv.
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), sysconfig.get_paths()["purelib"],
                                             env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        argv = sys.argv[1:] if argv is None else argv
        return subprocess.run([str(venv_python()), "-m", "train.tpu_aot", *argv], env=env, cwd=REPO).returncode
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no TPU here: the host backend stays CPU, TPU is compile-only
    # Compile-only use never touches a chip: let several such processes run at once (libtpu otherwise takes
    # /tmp/libtpu_lockfile and a second process fails).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if args.cmd == "engine":
        result = compile_engine(args.preset, args.topology, args.batches, args.kernels, args.kv_cache_dtype,
                                args.weight_dtype)
    elif args.extrapolate_layers:
        layers = [int(v) for v in args.extrapolate_layers.split(",")]
        result = compile_extrapolated(args.config, args.overrides, args.topology, layers, _parse_mesh(args.mesh),
                                      args.batch_size)
        print(format_summary(result), file=sys.stderr)
    else:
        result = _compile(args.config, args.overrides, args.topology, _parse_mesh(args.mesh), args.batch_size)
        print(format_summary(result), file=sys.stderr)
    return _emit(result, args.json)


def _emit(result: dict, path: Path | None) -> int:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
