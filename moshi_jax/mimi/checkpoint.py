"""Reference Mimi checkpoints <-> moshi-jax params (the only module that knows the reference's key names).

`load_reference(path_or_state_dict, cfg)` reads the released `tokenizer-e351c8d8-checkpoint125.safetensors`
layout (or a `MimiModel.state_dict()`) strictly: a missing, unexpected or wrongly shaped key is a
`ValueError` naming the keys. `save_reference(params, cfg, path)` writes a safetensors file that the
reference `MimiModel.load_state_dict` accepts.

Layout conversions (PyTorch -> here): Conv1d weight `[out, in/g, k]` -> kernel `[k, in/g, out]`;
ConvTranspose1d weight `[in, out/g, k]` -> `[in, k, out/g]`; Linear `[out, in]` -> `[in, out]`; the fused
attention projection `[(3 H Dh), d]` -> `[d, 3, H, Dh]`;
codebook centroid = embedding_sum / clamp(cluster_usage, eps).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from moshi_jax.mimi.config import MimiConfig

log = logging.getLogger(__name__)

Params = Any
ParamPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One reference tensor <-> one param."""

    key: str
    path: ParamPath
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_ref: Callable[[np.ndarray], np.ndarray]
    aliases: tuple[str, ...] = ()  # other names the reference's load hooks accept for this tensor


def _ident(w: np.ndarray) -> np.ndarray:
    return w


def _conv_entries(prefix: str, path: ParamPath, bias: bool = True) -> list[_Entry]:
    out = [_Entry(f"{prefix}.weight", path + ("kernel",),
                  lambda w: w.transpose(2, 1, 0), lambda k: k.transpose(2, 1, 0))]
    if bias:
        out.append(_Entry(f"{prefix}.bias", path + ("bias",), _ident, _ident))
    return out


def _convtr_entries(prefix: str, path: ParamPath, bias: bool = True) -> list[_Entry]:
    out = [_Entry(f"{prefix}.weight", path + ("kernel",),
                  lambda w: w.transpose(0, 2, 1), lambda k: k.transpose(0, 2, 1))]
    if bias:
        out.append(_Entry(f"{prefix}.bias", path + ("bias",), _ident, _ident))
    return out


def _res_entries(prefix: str, path: ParamPath) -> list[_Entry]:
    # Reference ResBlock: block = [ELU, conv, ELU, conv] -> convs at indices 1 and 3.
    return (_conv_entries(f"{prefix}.block.1.conv.conv", path + ("conv1",))
            + _conv_entries(f"{prefix}.block.3.conv.conv", path + ("conv2",)))


def _seanet_entries(cfg: MimiConfig, side: str) -> list[_Entry]:
    n_res, P = cfg.n_residual_layers, (side,)
    stage = n_res + 2  # per ratio: residual blocks, ELU, (transposed) conv
    last = 1 + len(cfg.ratios) * stage + 1
    out = _conv_entries(f"{side}.model.0.conv.conv", P + ("conv_in",))
    for i in range(len(cfg.ratios)):
        base = 1 + i * stage
        if side == "encoder":
            for j in range(n_res):
                out += _res_entries(f"encoder.model.{base + j}", P + (f"res_{i}_{j}",))
            out += _conv_entries(f"encoder.model.{base + n_res + 1}.conv.conv", P + (f"down_{i}",))
        else:
            out += _convtr_entries(f"decoder.model.{base + 1}.convtr.convtr", P + (f"up_{i}",))
            for j in range(n_res):
                out += _res_entries(f"decoder.model.{base + 2 + j}", P + (f"res_{i}_{j}",))
    out += _conv_entries(f"{side}.model.{last}.conv.conv", P + ("conv_out",))
    return out


def _transformer_entries(cfg: MimiConfig, side: str) -> list[_Entry]:
    d, H = cfg.dimension, cfg.num_heads
    Dh = d // H
    out = []
    for i in range(cfg.num_layers):
        base = (f"{side}_transformer", f"layer_{i}")
        p = f"{side}_transformer.transformer.layers.{i}"
        out += [
            _Entry(f"{p}.self_attn.in_proj_weight", base + ("self_attn", "in_proj"),
                   lambda w: w.reshape(3, H, Dh, d).transpose(3, 0, 1, 2),
                   lambda k: k.transpose(1, 2, 3, 0).reshape(3 * d, d),
                   aliases=(f"{p}.self_attn.in_projs.0.weight",)),
            _Entry(f"{p}.self_attn.out_proj.weight", base + ("self_attn", "out_proj"),
                   lambda w: w.T.reshape(H, Dh, d), lambda k: k.reshape(d, d).T,
                   aliases=(f"{p}.self_attn.out_projs.0.weight",)),
            _Entry(f"{p}.linear1.weight", base + ("mlp", "linear1"), lambda w: w.T, lambda k: k.T),
            _Entry(f"{p}.linear2.weight", base + ("mlp", "linear2"), lambda w: w.T, lambda k: k.T),
        ]
        for n in ("1", "2"):
            out += [
                _Entry(f"{p}.norm{n}.weight", base + (f"norm{n}", "scale"), _ident, _ident),
                _Entry(f"{p}.norm{n}.bias", base + (f"norm{n}", "bias"), _ident, _ident),
                _Entry(f"{p}.layer_scale_{n}.scale", base + (f"layer_scale_{n}",), _ident, _ident),
            ]
    return out


def _quantizer_proj_entries(cfg: MimiConfig) -> list[_Entry]:
    out = []
    for ref, ours in (("rvq_first", "semantic"), ("rvq_rest", "acoustic")):
        for proj in ("input_proj", "output_proj"):
            out.append(_Entry(f"quantizer.{ref}.{proj}.weight", ("quantizer", ours, proj),
                              lambda w: w[:, :, 0].T, lambda k: k.T[:, :, None]))
    return out


def _codebook_levels(cfg: MimiConfig) -> list[tuple[str, ParamPath]]:
    """(reference prefix, codebook param path) for every RVQ level."""
    out = []
    for ref, ours, n in (("rvq_first", "semantic", cfg.n_q_semantic), ("rvq_rest", "acoustic", cfg.n_q_acoustic)):
        for lvl in range(n):
            out.append((f"quantizer.{ref}.vq.layers.{lvl}._codebook", ("quantizer", ours, f"codebook_{lvl}")))
    return out


# Older codebook buffer names that the reference's load hook renames.
_CODEBOOK_ALIASES = {
    "_initialized": ("inited",),
    "cluster_usage": ("cluster_size",),
    "embedding_sum": ("embed_avg", "embed_sum"),
}


def _entries(cfg: MimiConfig) -> list[_Entry]:
    return (_seanet_entries(cfg, "encoder") + _transformer_entries(cfg, "encoder")
            + _conv_entries("downsample.conv.conv.conv", ("downsample",), bias=False)
            + _quantizer_proj_entries(cfg)
            + _convtr_entries("upsample.convtr.convtr.convtr", ("upsample",), bias=False)
            + _transformer_entries(cfg, "decoder") + _seanet_entries(cfg, "decoder"))


def _param_shapes(cfg: MimiConfig) -> dict[ParamPath, tuple[int, ...]]:
    from moshi_jax.mimi.model import MimiCodec

    abstract = nn.unbox(MimiCodec(cfg).param_axes())
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract).items()}


def _ref_shape(entry: _Entry, shapes: Mapping[ParamPath, tuple[int, ...]]) -> tuple[int, ...]:
    return entry.to_ref(np.broadcast_to(np.float32(0), shapes[entry.path])).shape


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, np.float32)


def _read_state_dict(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    from safetensors.numpy import load_file

    path = Path(source)
    if not path.is_file():
        raise ValueError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from e


def _problems(missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
    parts = []
    for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                       ("wrongly shaped keys", misshaped)):
        if keys:
            shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
            parts.append(f"{name}: {shown}")
    return "; ".join(parts)


def load_reference(source: str | Path | Mapping[str, Any], cfg: MimiConfig | None = None) -> Params:
    """Reference Mimi weights (safetensors path or state dict of numpy arrays / torch tensors) -> params.

    Raises ValueError naming every missing, unexpected or wrongly shaped key, and NonFiniteError (a ValueError)
    naming every tensor with NaN / inf values."""
    from moshi_jax.finite import NonFiniteError, count_nonfinite

    cfg = cfg or MimiConfig()
    sd = _read_state_dict(source)
    shapes = _param_shapes(cfg)
    flat: dict[ParamPath, np.ndarray] = {p: np.zeros(s, np.float32) for p, s in shapes.items()}
    used: set[str] = set()
    missing: list[str] = []
    misshaped: list[str] = []
    nonfinite: list[str] = []

    def fetch(key: str, aliases: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray | None:
        name = next((k for k in (key, *aliases) if k in sd), None)
        if name is None:
            missing.append(key)
            return None
        used.add(name)
        value = _to_numpy(sd[name])
        if value.shape != tuple(shape):
            misshaped.append(f"{name} {tuple(value.shape)} (expected {tuple(shape)})")
            return None
        bad = count_nonfinite(value)
        if bad:
            nonfinite.append(f"{name} ({bad} of {value.size} values)")
        return value

    for e in _entries(cfg):
        value = fetch(e.key, e.aliases, _ref_shape(e, shapes))
        if value is None:
            continue
        flat[e.path] = np.ascontiguousarray(e.to_jax(value))

    bins, cdim = cfg.bins, cfg.codebook_dim
    for prefix, path in _codebook_levels(cfg):
        fetch(f"{prefix}._initialized", tuple(f"{prefix}.{a}" for a in _CODEBOOK_ALIASES["_initialized"]), (1,))
        usage = fetch(f"{prefix}.cluster_usage", tuple(f"{prefix}.{a}" for a in _CODEBOOK_ALIASES["cluster_usage"]),
                      (bins,))
        emb = fetch(f"{prefix}.embedding_sum", tuple(f"{prefix}.{a}" for a in _CODEBOOK_ALIASES["embedding_sum"]),
                    (bins, cdim))
        if usage is not None and emb is not None:
            flat[path] = emb / np.maximum(usage, cfg.codebook_epsilon)[:, None]

    unexpected = sorted(set(sd) - used)
    if missing or unexpected or misshaped:
        raise ValueError(f"checkpoint does not match this Mimi config: {_problems(missing, unexpected, misshaped)}")
    if nonfinite:
        more = f" and {len(nonfinite) - 5} more" if len(nonfinite) > 5 else ""
        raise NonFiniteError(f"Mimi weights hold NaN/inf values in {', '.join(nonfinite[:5])}{more}")
    return jax.tree.map(jax.numpy.asarray, traverse_util.unflatten_dict(flat))


def to_reference_state_dict(params: Params, cfg: MimiConfig | None = None) -> dict[str, np.ndarray]:
    """params -> {reference key: float32 array} in the released checkpoint's layout (attention weights
    fused as `in_proj_weight` / `out_proj.weight`; codebooks as embedding_sum = centroid, usage 1)."""
    cfg = cfg or MimiConfig()
    flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params).items()}
    expected = _param_shapes(cfg)
    wrong = sorted("/".join(p) for p in set(expected) ^ set(flat))
    wrong += sorted(f"{'/'.join(p)} {flat[p].shape} (expected {s})" for p, s in expected.items()
                    if p in flat and flat[p].shape != s)
    if wrong:
        raise ValueError(f"params do not match this Mimi config: {', '.join(wrong[:12])}")
    out: dict[str, np.ndarray] = {}
    for e in _entries(cfg):
        out[e.key] = np.array(e.to_ref(flat[e.path]), np.float32, order="C")  # own, writable copy
    for prefix, path in _codebook_levels(cfg):
        out[f"{prefix}._initialized"] = np.ones((1,), np.float32)
        out[f"{prefix}.cluster_usage"] = np.ones((cfg.bins,), np.float32)
        out[f"{prefix}.embedding_sum"] = np.array(flat[path], np.float32, order="C")
    return out


def save_reference(params: Params, cfg: MimiConfig | None, path: str | Path) -> Path:
    """Write params as a reference-loadable Mimi safetensors file; returns the path."""
    from safetensors.numpy import save_file

    from moshi_jax.finite import check_finite
    from moshi_jax.io_atomic import atomic_path

    sd = to_reference_state_dict(params, cfg)
    check_finite(list(sd.items()), "refusing to save Mimi weights")
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp))
    return Path(path)


def reference_config(cfg: MimiConfig | None = None) -> dict[str, Any]:
    """The reference's `mimi_config` dict (`loaders.get_mimi(None, mimi_config=...)`) for `cfg`."""
    cfg = cfg or MimiConfig()
    seanet = dict(
        channels=cfg.channels, dimension=cfg.dimension, causal=True, n_filters=cfg.n_filters,
        n_residual_layers=cfg.n_residual_layers, activation="ELU", compress=cfg.compress,
        dilation_base=cfg.dilation_base, disable_norm_outer_blocks=0, kernel_size=cfg.kernel_size,
        residual_kernel_size=cfg.residual_kernel_size, last_kernel_size=cfg.last_kernel_size, norm="none",
        pad_mode="constant", ratios=list(cfg.ratios), true_skip=True,
    )
    quantizer = dict(dimension=cfg.codebook_dim, n_q=cfg.n_q, n_q_semantic=cfg.n_q_semantic, bins=cfg.bins,
                     input_dimension=cfg.dimension, output_dimension=cfg.dimension)
    transformer = dict(
        d_model=cfg.dimension, num_heads=cfg.num_heads, num_layers=cfg.num_layers, causal=True,
        layer_scale=cfg.layer_scale, context=cfg.context, conv_layout=True, max_period=cfg.max_period,
        gating="none", norm="layer_norm", positional_embedding="rope", dim_feedforward=cfg.dim_feedforward,
        input_dimension=cfg.dimension, output_dimensions=[cfg.dimension],
    )
    return dict(sample_rate=cfg.sample_rate, channels=cfg.channels, frame_rate=cfg.frame_rate, seanet=seanet,
                quantizer=quantizer, transformer=transformer)


def load_or_random(weights: str | Path | None, cfg: MimiConfig, seed: int, *, flag: str = "--weights",
                   consequence: str = "the codes and audio are meaningless") -> Params:
    """Params from a reference Mimi safetensors file, or (weights None) a seeded random Mimi with a loud
    warning naming the command-line `flag` that gives real weights. A missing or unloadable file is a
    ValueError whose message names the file (callers turn it into their own user-facing error)."""
    from moshi_jax.mimi.model import MimiCodec

    if weights is None:
        log.warning("=" * 78)
        log.warning("NO MIMI WEIGHTS GIVEN: using a RANDOMLY INITIALISED Mimi (seed %d): %s.", seed, consequence)
        log.warning("Pass %s tokenizer-e351c8d8-checkpoint125.safetensors for the released codec.", flag)
        log.warning("=" * 78)
        return MimiCodec(cfg).init(jax.random.PRNGKey(seed))
    path = Path(weights)
    if not path.is_file():
        raise ValueError(f"Mimi weights file not found: {path}")
    log.info("loading Mimi weights from %s", path)
    try:
        return load_reference(str(path), cfg)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"cannot load Mimi weights from {path}: {e}") from e


def config_path_for(weights: str | Path) -> Path:
    """Where a trained codec's `mimi_config` json sits: beside the weights, same stem (`mimi.json`)."""
    return Path(weights).with_suffix(".json")


_FIXED_REFERENCE = {  # settings of the reference's mimi_config that this implementation hard-codes
    ("seanet", "causal"): True, ("seanet", "norm"): "none", ("seanet", "pad_mode"): "constant",
    ("seanet", "true_skip"): True, ("seanet", "activation"): "ELU", ("seanet", "disable_norm_outer_blocks"): 0,
    ("transformer", "causal"): True, ("transformer", "gating"): "none", ("transformer", "norm"): "layer_norm",
    ("transformer", "positional_embedding"): "rope", ("transformer", "conv_layout"): True,
}


def config_from_reference(d: Mapping[str, Any]) -> MimiConfig:
    """The MimiConfig of a reference `mimi_config` dict (inverse of `reference_config`); settings this
    implementation does not support are a ValueError naming them."""
    try:
        s, q, t = d["seanet"], d["quantizer"], d["transformer"]
        bad = [f"{a}.{b}={d[a].get(b)!r}" for (a, b), v in _FIXED_REFERENCE.items() if b in d[a] and d[a][b] != v]
        if s["dimension"] != t["d_model"] or q["input_dimension"] != s["dimension"]:
            bad.append("seanet.dimension / transformer.d_model / quantizer.input_dimension differ")
        if bad:
            raise ValueError(f"unsupported mimi_config settings: {', '.join(bad)}")
        n_q = int(q["n_q"])
        return MimiConfig(
            sample_rate=int(d["sample_rate"]), channels=int(d["channels"]), frame_rate=float(d["frame_rate"]),
            dimension=int(s["dimension"]), n_filters=int(s["n_filters"]),
            n_residual_layers=int(s["n_residual_layers"]), ratios=tuple(int(r) for r in s["ratios"]),
            kernel_size=int(s["kernel_size"]), residual_kernel_size=int(s["residual_kernel_size"]),
            last_kernel_size=int(s["last_kernel_size"]), dilation_base=int(s["dilation_base"]),
            compress=int(s["compress"]), num_heads=int(t["num_heads"]), num_layers=int(t["num_layers"]),
            dim_feedforward=int(t["dim_feedforward"]), context=int(t["context"]),
            layer_scale=float(t["layer_scale"]), max_period=float(t["max_period"]),
            codebook_dim=int(q["dimension"]), n_q=n_q, n_q_semantic=int(q["n_q_semantic"]), bins=int(q["bins"]),
            num_codebooks=min(8, n_q))
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a reference mimi_config dict (missing or bad {e})") from e


def config_beside(weights: str | Path | None) -> MimiConfig | None:
    """The MimiConfig stored beside a trained codec's weights (`config_path_for`), None when there is none."""
    if weights is None:
        return None
    path = config_path_for(weights)
    if not path.is_file():
        return None
    import json

    try:
        return config_from_reference(json.loads(path.read_text()))
    except (ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {e}") from e
