"""Strict import / export of reference Moshi LM checkpoints (the released `model.safetensors` layout).

Reference layout (PyTorch Linear weights are [out, in]; see spec section 3.2):
  emb.{k}.weight [card+1, D]   text_emb.weight [text_card+1, D]   out_norm.alpha [1, 1, D]
  transformer.layers.{l}.self_attn.in_proj_weight [3D, D]   (rows: q | k | v, each (heads, head_dim))
  transformer.layers.{l}.self_attn.out_proj.weight [D, D]
  transformer.layers.{l}.gating.linear_in.weight [2h, D]  (rows: gate | value)   gating.linear_out.weight [D, h]
  transformer.layers.{l}.norm{1,2}.alpha [1, 1, D]   (LayerNorm: .weight/.bias [D]; plain MLP: linear1/linear2)
  text_linear.weight [text_out, D]   depformer_in.{i}.weight [d, D]   depformer_text_emb.weight [text_card+1, d]
  depformer_emb.{k}.weight [card+1, d]   (low rank: [card+1, r] + depformer_emb.{k}.low_rank.weight [d, r])
  depformer.layers.{l}.self_attn.in_proj_weight [m*3d, d]   (m per-step blocks stacked on dim 0)
  depformer.layers.{l}.self_attn.out_proj.weight [m*d, d]   depformer.layers.{l}.gating.{s}.linear_{in,out}.weight
  linears.{k}.weight [card, d]
A live reference model's `state_dict()` names the attention projections `self_attn.in_projs.{i}.weight` /
`out_projs.{i}.weight` (its load hook splits the stacked form); both forms are accepted on import.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from moshi_jax.finite import NonFiniteError, check_finite, count_nonfinite
from moshi_jax.lm.config import LMConfig
from moshi_jax.nn.mlp import gated_hidden_dim
from moshi_jax.nn.norms import NORMS

PathT = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One reference tensor: where it goes in the JAX tree (`path`, leading `index` into a stacked leaf) and
    how to convert it (`to_jax`: reference array -> JAX slice; `to_ref`: the inverse)."""

    key: str
    path: PathT
    index: tuple[int, ...]
    ref_shape: tuple[int, ...]
    to_jax: Callable[[Any], Any]
    to_ref: Callable[[Any], Any]


def _t(a):
    return a.T


def _ident(a):
    return a


def _norm_entries(prefix: str, path: PathT, idx: tuple[int, ...], norm: str, dim: int) -> list[Entry]:
    if NORMS[norm][0] == "rms":
        return [Entry(prefix + ".alpha", path + ("alpha",), idx, (1, 1, dim),
                      lambda a: a.reshape(dim), lambda a: a.reshape(1, 1, dim))]
    return [Entry(prefix + ".weight", path + ("scale",), idx, (dim,), _ident, _ident),
            Entry(prefix + ".bias", path + ("bias",), idx, (dim,), _ident, _ident)]


def _stack_entries(prefix: str, path: PathT, tcfg, n_layers: int) -> list[Entry]:
    """Entries of one scanned transformer stack (`path` is its module path, e.g. ("transformer",))."""
    D, H = tcfg.d_model, tcfg.num_heads
    Dh = D // H
    m = tcfg.mult
    out: list[Entry] = []
    lp = path + ("layers",)
    for layer in range(n_layers):
        p = f"{prefix}.layers.{layer}"
        idx = (layer,)
        out += _norm_entries(p + ".norm1", lp + ("norm1",), idx, tcfg.norm, D)
        out += _norm_entries(p + ".norm2", lp + ("norm2",), idx, tcfg.norm, D)
        if m:
            out.append(Entry(p + ".self_attn.in_proj_weight", lp + ("self_attn", "in_proj"), idx, (m * 3 * D, D),
                             lambda a, m=m: a.reshape(m, 3, H, Dh, D).transpose(0, 4, 1, 2, 3),
                             lambda a, m=m: a.transpose(0, 2, 3, 4, 1).reshape(m * 3 * D, D)))
            out.append(Entry(p + ".self_attn.out_proj.weight", lp + ("self_attn", "out_proj"), idx, (m * D, D),
                             lambda a, m=m: a.reshape(m, D, H, Dh).transpose(0, 2, 3, 1),
                             lambda a, m=m: a.transpose(0, 3, 1, 2).reshape(m * D, D)))
        else:
            out.append(Entry(p + ".self_attn.in_proj_weight", lp + ("self_attn", "in_proj"), idx, (3 * D, D),
                             lambda a: a.reshape(3, H, Dh, D).transpose(3, 0, 1, 2),
                             lambda a: a.transpose(1, 2, 3, 0).reshape(3 * D, D)))
            out.append(Entry(p + ".self_attn.out_proj.weight", lp + ("self_attn", "out_proj"), idx, (D, D),
                             lambda a: a.reshape(D, H, Dh).transpose(1, 2, 0),
                             lambda a: a.transpose(2, 0, 1).reshape(D, D)))
        if tcfg.gating == "none":
            F = tcfg.dim_feedforward
            out.append(Entry(p + ".linear1.weight", lp + ("mlp", "linear1"), idx, (F, D), _t, _t))
            out.append(Entry(p + ".linear2.weight", lp + ("mlp", "linear2"), idx, (D, F), _t, _t))
        else:
            h = gated_hidden_dim(D, tcfg.dim_feedforward)
            steps = [(f"{p}.gating.{s}", idx + (s,)) for s in range(m)] if m else [(f"{p}.gating", idx)]
            for gp, gidx in steps:
                out.append(Entry(gp + ".linear_in.weight", lp + ("mlp", "linear_in"), gidx, (2 * h, D),
                                 lambda a, h=h: a.reshape(2, h, D).transpose(2, 0, 1),
                                 lambda a, h=h: a.transpose(1, 2, 0).reshape(2 * h, D)))
                out.append(Entry(gp + ".linear_out.weight", lp + ("mlp", "linear_out"), gidx, (D, h), _t, _t))
        if tcfg.layer_scale is not None:
            for i in (1, 2):
                out.append(Entry(f"{p}.layer_scale_{i}.scale", lp + (f"layer_scale_{i}",), idx, (D,), _ident, _ident))
    return out


def reference_layout(cfg: LMConfig) -> list[Entry]:
    """Every tensor of the reference checkpoint of `cfg`, in the released (stacked-projection) layout."""
    D = cfg.dim
    out: list[Entry] = []
    for k in range(cfg.n_q):
        out.append(Entry(f"emb.{k}.weight", ("emb",), (k,), (cfg.card + 1, D), _ident, _ident))
    out.append(Entry("text_emb.weight", ("text_emb",), (), (cfg.text_card + 1, D), _ident, _ident))
    out += _stack_entries("transformer", ("transformer",), cfg.temporal, cfg.temporal.num_layers)
    out += _norm_entries("out_norm", ("out_norm",), (), cfg.temporal.norm, D)
    out.append(Entry("text_linear.weight", ("text_linear",), (), (cfg.text_out, D), _t, _t))
    if cfg.depth is None:
        return out
    d = cfg.depth.d_model
    for i in range(cfg.num_depformer_in):
        out.append(Entry(f"depformer_in.{i}.weight", ("depformer_in",), (i,), (d, D), _t, _t))
    r = cfg.depformer_low_rank_embeddings
    w = d if r is None else r
    out.append(Entry("depformer_text_emb.weight", ("depformer_text_emb",), (), (cfg.text_card + 1, w), _ident, _ident))
    if r is not None:
        out.append(Entry("depformer_text_emb.low_rank.weight", ("depformer_text_emb_low_rank",), (), (d, r), _t, _t))
    for k in range(cfg.dep_q - 1):
        out.append(Entry(f"depformer_emb.{k}.weight", ("depformer_emb",), (k,), (cfg.card + 1, w), _ident, _ident))
        if r is not None:
            out.append(Entry(f"depformer_emb.{k}.low_rank.weight", ("depformer_emb_low_rank",), (k,), (d, r), _t, _t))
    out += _stack_entries("depformer", ("depformer",), cfg.depth, cfg.depth.num_layers)
    for k in range(cfg.dep_q):
        out.append(Entry(f"linears.{k}.weight", ("linears",), (k,), (cfg.card, d), _t, _t))
    return out


def reference_shapes(cfg: LMConfig) -> dict[str, tuple[int, ...]]:
    """{reference key: shape} of the released layout for `cfg`."""
    return {e.key: e.ref_shape for e in reference_layout(cfg)}


def abstract_params(cfg: LMConfig) -> dict:
    """The JAX param tree of `cfg` as ShapeDtypeStructs (nothing allocated)."""
    from moshi_jax.lm.model import init_params

    return nn.unbox(jax.eval_shape(lambda key: init_params(cfg, key), jax.random.PRNGKey(0)))


def check_layout(cfg: LMConfig, abstract: dict | None = None) -> None:
    """Check, with abstract shapes only, that the reference layout maps one-to-one onto the JAX param tree:
    every leaf is fully covered by its entries and every converted entry has its slice's shape."""
    abstract = abstract_params(cfg) if abstract is None else abstract
    flat = traverse_util.flatten_dict(abstract)
    covered: dict[PathT, set[tuple[int, ...]]] = {p: set() for p in flat}
    errors = []
    for e in reference_layout(cfg):
        if e.path not in flat:
            errors.append(f"{e.key}: no JAX param {'/'.join(e.path)}")
            continue
        leaf = flat[e.path]
        want = tuple(leaf.shape[len(e.index):])
        got = jax.eval_shape(e.to_jax, jax.ShapeDtypeStruct(e.ref_shape, jnp.float32)).shape
        back = jax.eval_shape(e.to_ref, jax.ShapeDtypeStruct(want, jnp.float32)).shape
        if tuple(got) != want or tuple(back) != e.ref_shape:
            errors.append(f"{e.key}: reference {e.ref_shape} -> {tuple(got)}, JAX slice {want}")
        covered[e.path].add(e.index)
    for p, idx in covered.items():
        n_lead = len(next(iter(idx))) if idx else 0
        need = int(np.prod(flat[p].shape[:n_lead])) if n_lead else 1
        if len(idx) != need:
            errors.append(f"JAX param {'/'.join(p)} {flat[p].shape}: {len(idx)} of {need} slices have a reference key")
    if errors:
        raise ValueError("reference layout does not match the JAX params:\n  " + "\n  ".join(errors))


# ---------------------------------------------------------------------------------------------------- sources


def _to_numpy(x: Any) -> np.ndarray:
    """numpy / jax / torch tensor -> numpy (bf16 kept as ml_dtypes.bfloat16)."""
    if type(x).__module__.startswith("torch"):
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            import ml_dtypes

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


_SPLIT_RE = re.compile(r"^(.*\.self_attn\.)(in_projs|out_projs)\.(\d+)\.weight$")


class _Source:
    """Uniform read access to a safetensors file or an in-memory state dict, with the per-step projections
    (`in_projs.{i}` / `out_projs.{i}`, `in_proj.weight`) normalised to the released stacked names."""

    def __init__(self, src: str | Path | Mapping[str, Any]):
        self._file = None
        if isinstance(src, str | Path):
            from safetensors import safe_open

            path = Path(src)
            if not path.is_file():
                raise FileNotFoundError(f"LM checkpoint not found: {path}")
            self._file = safe_open(str(path), framework="numpy")
            raw_keys = list(self._file.keys())
            self._raw_shape = lambda k: tuple(self._file.get_slice(k).get_shape())
            self._raw_get = lambda k: self._file.get_tensor(k)
        else:
            data = dict(src)
            raw_keys = list(data)
            self._raw_shape = lambda k: tuple(data[k].shape)
            self._raw_get = lambda k: _to_numpy(data[k])
        self._groups: dict[str, list[str]] = {}  # normalised key -> raw keys (stacked along dim 0)
        split: dict[str, dict[int, str]] = {}
        for k in raw_keys:
            m = _SPLIT_RE.match(k)
            if m:
                name = m.group(1) + ("in_proj_weight" if m.group(2) == "in_projs" else "out_proj.weight")
                split.setdefault(name, {})[int(m.group(3))] = k
            elif k.endswith(".self_attn.in_proj.weight"):
                self._groups[k.removesuffix("in_proj.weight") + "in_proj_weight"] = [k]
            else:
                self._groups[k] = [k]
        for name, parts in split.items():
            if sorted(parts) != list(range(len(parts))) or name in self._groups:
                for k in parts.values():  # incomplete / conflicting: leave them to be reported as unexpected
                    self._groups[k] = [k]
            else:
                self._groups[name] = [parts[i] for i in range(len(parts))]

    def keys(self) -> list[str]:
        return list(self._groups)

    def shape(self, key: str) -> tuple[int, ...]:
        shapes = [self._raw_shape(k) for k in self._groups[key]]
        if len(shapes) == 1:
            return shapes[0]
        if any(len(s) != len(shapes[0]) or s[1:] != shapes[0][1:] for s in shapes):
            return (-1,)
        return (sum(s[0] for s in shapes),) + shapes[0][1:]

    def get(self, key: str) -> np.ndarray:
        parts = [self._raw_get(k) for k in self._groups[key]]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def _check_keys(layout: list[Entry], src: _Source) -> None:
    want = {e.key: e.ref_shape for e in layout}
    have = set(src.keys())
    missing = sorted(set(want) - have)
    unexpected = sorted(have - set(want))
    misshaped = [f"{k}: checkpoint {src.shape(k)}, expected {want[k]}" for k in sorted(set(want) & have)
                 if src.shape(k) != want[k]]
    if missing or unexpected or misshaped:
        def lst(xs):
            return "; ".join(xs[:20]) + (f"; ... ({len(xs)} in all)" if len(xs) > 20 else "")

        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {lst(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {lst(unexpected)}")
        if misshaped:
            parts.append(f"misshaped keys ({len(misshaped)}): {lst(misshaped)}")
        raise ValueError("LM checkpoint does not match the config: " + " | ".join(parts))


# ---------------------------------------------------------------------------------------------------- import


def load_reference(src: str | Path | Mapping[str, Any], cfg: LMConfig, dtype: Any = None,
                   shardings: Any = None) -> dict:
    """Reference checkpoint (a `.safetensors` path, or a state dict of numpy / torch tensors, released or
    live-module key names) -> JAX params (plain nested dict of jax arrays, unboxed), strictly: any missing,
    unexpected or misshaped key raises ValueError naming it. bf16 and float32 inputs are accepted; params are
    cast to `dtype` (default: the config's param dtype).

    `shardings`: a `jax.sharding.Sharding` for every param, or a tree of them shaped like the params; each
    param is placed with its sharding as soon as it is converted, so a 7B checkpoint never sits whole on one
    device (host memory peaks at about one stacked param)."""
    dtype = jnp.dtype(cfg.param_dtype if dtype is None else dtype)
    layout = reference_layout(cfg)
    src_ = _Source(src)
    _check_keys(layout, src_)
    abstract = traverse_util.flatten_dict(abstract_params(cfg))
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        place = {p: shardings for p in abstract}
    else:
        place = traverse_util.flatten_dict(shardings)
        if set(place) != set(abstract):
            raise ValueError(f"shardings tree does not match the params: missing "
                             f"{sorted('/'.join(p) for p in set(abstract) - set(place))[:5]}, unexpected "
                             f"{sorted('/'.join(p) for p in set(place) - set(abstract))[:5]}")
    by_path: dict[PathT, list[Entry]] = {}
    for e in layout:
        by_path.setdefault(e.path, []).append(e)
    flat = {}
    nonfinite = []
    for path, entries in by_path.items():
        shape = tuple(abstract[path].shape)
        # Convert leaf by leaf (never the whole checkpoint in float32 at once).
        buf = np.empty(shape, dtype) if entries[0].index else None
        for e in entries:
            with np.errstate(over="ignore"):  # an overflow to inf is reported below, naming the tensor
                val = np.asarray(e.to_jax(src_.get(e.key).astype(np.float32))).astype(dtype)
            if bad := count_nonfinite(val):  # NaN/inf in the file, or values overflowing `dtype`
                nonfinite.append(f"{e.key} ({bad} of {val.size} values)")
            if buf is None:
                buf = val
            else:
                buf[e.index] = val
        flat[path] = jnp.asarray(buf, dtype) if place[path] is None else jax.device_put(buf, place[path])
        del buf
    if nonfinite:
        more = f" and {len(nonfinite) - 5} more" if len(nonfinite) > 5 else ""
        raise NonFiniteError(f"LM checkpoint holds NaN/inf values in {', '.join(nonfinite[:5])}{more}")
    missing = set(abstract) - set(flat)
    if missing:  # cannot happen when check_layout passes; kept as a guard against a partial tree
        raise ValueError(f"JAX params without a reference key: {sorted('/'.join(p) for p in missing)}")
    return traverse_util.unflatten_dict(flat)


def iter_reference(params: Any, cfg: LMConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(reference key, numpy array in the params' dtype) for every tensor of the released layout."""
    flat = traverse_util.flatten_dict(nn.unbox(params))
    for e in reference_layout(cfg):
        if e.path not in flat:
            raise ValueError(f"params have no {'/'.join(e.path)} (needed for {e.key})")
        leaf = flat[e.path]
        val = leaf[e.index] if e.index else leaf
        yield e.key, np.ascontiguousarray(np.asarray(e.to_ref(np.asarray(val))))


def to_reference_state_dict(params: Any, cfg: LMConfig, dtype: Any = None) -> dict[str, np.ndarray]:
    """JAX params -> {reference key: numpy array} (released layout; `dtype` default: the params' dtype)."""
    out = {}
    for k, v in iter_reference(params, cfg):
        out[k] = v if dtype is None else v.astype(jnp.dtype(dtype))
    return out


def save_reference(params: Any, cfg: LMConfig, path: str | Path, dtype: Any = None) -> None:
    """Write a `.safetensors` file that the reference `LMModel.load_state_dict` (strict) accepts (atomically;
    params with NaN/inf values are refused, naming the tensors)."""
    from safetensors.numpy import save_file

    from moshi_jax.io_atomic import atomic_path

    sd = to_reference_state_dict(params, cfg, dtype)
    check_finite(list(sd.items()), "refusing to save LM weights")
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp))


# ---------------------------------------------------------------------------------------------------- repos


@dataclasses.dataclass(frozen=True)
class RepoInfo:
    """What a downloaded Kyutai model repository holds (reference `CheckpointInfo`), as local paths."""

    cfg: LMConfig
    moshi_weights: Path
    mimi_weights: Path
    tokenizer: Path
    model_type: str = "moshi"
    lm_gen_config: dict = dataclasses.field(default_factory=dict)
    raw_config: dict | None = None


def read_repo(repo_dir: str | Path) -> RepoInfo:
    """Read `config.json` of a downloaded repository directory (legacy repos without one are the 7B)."""
    repo = Path(repo_dir)
    if not repo.is_dir():
        raise FileNotFoundError(f"model repository directory not found: {repo}")
    cfg_path = repo / "config.json"
    raw = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
    conf = dict(raw or {})
    cfg = LMConfig.from_reference_kwargs(conf) if raw is not None else LMConfig.moshi_7b()
    return RepoInfo(
        cfg=cfg,
        moshi_weights=repo / conf.get("moshi_name", "model.safetensors"),
        mimi_weights=repo / conf.get("mimi_name", "tokenizer-e351c8d8-checkpoint125.safetensors"),
        tokenizer=repo / conf.get("tokenizer_name", "tokenizer_spm_32k_3.model"),
        model_type=conf.get("model_type", "moshi"),
        lm_gen_config=dict(conf.get("lm_gen_config", {})),
        raw_config=raw,
    )


def load_pretrained(repo_dir: str | Path, dtype: Any = None, shardings: Any = None) -> tuple[LMConfig, dict]:
    """Config and params of a downloaded Kyutai repository directory (config.json + model.safetensors).
    `dtype` sets both param and compute dtype (e.g. "bfloat16" for real use); default float32. `shardings`:
    see `load_reference`."""
    info = read_repo(repo_dir)
    cfg = info.cfg if dtype is None else info.cfg.with_dtypes(str(jnp.dtype(dtype)), str(jnp.dtype(dtype)))
    params = load_reference(info.moshi_weights, cfg, shardings=shardings)
    if info.model_type == "hibiki":  # reference get_moshi: EOS (2) embeds like PAD (3) so early EOS is ignored
        params["text_emb"] = params["text_emb"].at[2].set(params["text_emb"][3])
    return cfg, params
