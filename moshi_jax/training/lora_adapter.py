"""LoRA adapters in the reference layout (moshi-finetune's `lora.safetensors`) <-> the LoRA tree of training/lora.py.

The reference (`moshi/modules/lora.py`, `loaders.get_lora_moshi`) turns every `nn.Linear` NAME of the LMModel into
a LoRALinear with `NAME.lora_A.weight` [r, in] and `NAME.lora_B.weight` [out, r] (the base weight becomes
`NAME.frozen_W.weight`): W' = W + scaling * B @ A. NAMEs are the live module names (`...self_attn.in_projs.{s}`,
`...gating.{s}.linear_in`, `linears.{k}`, ...). moshi-finetune saves every module whose params all train: the
lora_A / lora_B of every Linear and, with `ft_embed`, the embedding tables under their base names
(`emb.{k}.weight`, `text_emb.weight`, ...); the reference server loads that file over the base weights
(`load_state_dict(strict=False)`: an adapter key it does not know is an error, and a Linear without factors is
left uninitialised, so every Linear needs its pair). The config.json beside it is the base config plus
`lora: true`, `lora_rank`, `lora_scaling`.

Here a LoRA target W [*lead, *in, *out] has a: [*lead, *in, r] and b: [*lead, r, *out]. The reference's input /
output feature order of each Linear is read off the checkpoint layout's own converter (`Entry.to_ref` applied to
an index array), so the adapter follows exactly the layout the merged export uses; the permutations are checked
to be separable (out x in) when they are built.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from moshi_jax.lm import checkpoint as lm_ckpt
from moshi_jax.lm.config import LMConfig
from moshi_jax.training.lora import LoraLayout

PathT = tuple[str, ...]
LORA_KEYS = ("lora", "lora_rank", "lora_scaling")


class AdapterError(ValueError):
    """An adapter file that does not fit the model / LoRA settings (names the keys)."""


@dataclasses.dataclass(frozen=True)
class LinearSlot:
    """One reference nn.Linear: its live module `name`, and where its weight lives in the JAX tree (`path`,
    full leading `index`; `target` False: not a LoRA target of ours, e.g. a low-rank embedding projection).
    Reference input feature j is our flattened input index in_perm[j]; output feature i is out_perm[i]."""

    name: str
    path: PathT
    index: tuple[int, ...]
    target: bool
    in_perm: np.ndarray
    out_perm: np.ndarray


def _live_name(key: str, step: int, stacked: bool) -> str:
    """Released key of a Linear weight -> the live module name the reference's LoRA keys use."""
    for suffix, name in ((".self_attn.in_proj_weight", ".self_attn.in_projs"),
                         (".self_attn.out_proj.weight", ".self_attn.out_projs")):
        if key.endswith(suffix):
            return key.removesuffix(suffix) + f"{name}.{step}"
    if stacked:
        raise ValueError(f"{key}: a per-step stacked weight that is not an attention projection")
    return key.removesuffix(".weight")


def _separable(r: np.ndarray, out_size: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """r [out, in] of flat indices into a W slice [*in, *out] -> (in_perm, out_perm)."""
    in_perm, out_perm = r[0, :] // out_size, r[:, 0] % out_size
    if not np.array_equal(r, in_perm[None, :] * out_size + out_perm[:, None]):
        raise ValueError(f"{key}: reference layout is not a separable (out, in) permutation of the JAX kernel")
    return in_perm, out_perm


def linear_slots(cfg: LMConfig, layouts: Mapping[PathT, LoraLayout]) -> list[LinearSlot]:
    """Every nn.Linear of the reference LMModel of `cfg`, in reference layout order."""
    slots = []
    for e in lm_ckpt.reference_layout(cfg):
        lay = layouts.get(e.path)
        if lay is None:
            if e.key.endswith(".low_rank.weight"):  # a Linear of the reference, not a LoRA target here
                out_size, in_size = e.ref_shape
                slots.append(LinearSlot(e.key.removesuffix(".weight"), e.path, e.index, False,
                                        np.arange(in_size), np.arange(out_size)))
            continue
        extra = lay.n_lead - len(e.index)  # lead axes inside the entry (the depformer's per-step projections)
        if extra not in (0, 1):
            raise ValueError(f"{e.key}: {extra} stacked axes inside one reference tensor")
        shape = lay.shape[len(e.index):]
        in_size, out_size = math.prod(lay.in_shape), math.prod(lay.out_shape)
        ref = np.asarray(e.to_ref(np.arange(math.prod(shape)).reshape(shape)))
        steps = shape[0] if extra else 1
        ref = ref.reshape(steps, ref.shape[0] // steps, ref.shape[1])
        for s in range(steps):
            in_perm, out_perm = _separable(ref[s] - s * in_size * out_size, out_size, e.key)
            slots.append(LinearSlot(_live_name(e.key, s, bool(extra)), e.path, e.index + ((s,) if extra else ()),
                                    True, in_perm, out_perm))
    return slots


def _leaf(tree: Any, path: PathT) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def iter_adapter(lora: Any, layouts: Mapping[PathT, LoraLayout], cfg: LMConfig, rank: int,
                 embeddings: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """(reference key, numpy array) of a moshi-finetune adapter: lora_A / lora_B of every reference Linear (zeros
    for Linears that are not LoRA targets here) and the trained embedding tables (`embeddings`: the trained base
    params tree, e.g. {"text_emb": ...}) under their base names."""
    for slot in linear_slots(cfg, layouts):
        if not slot.target:
            yield slot.name + ".lora_A.weight", np.zeros((rank, slot.in_perm.size), np.float32)
            yield slot.name + ".lora_B.weight", np.zeros((slot.out_perm.size, rank), np.float32)
            continue
        a = np.asarray(_leaf(lora, slot.path)["a"][slot.index])  # [*in, r]
        b = np.asarray(_leaf(lora, slot.path)["b"][slot.index])  # [r, *out]
        a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1)
        yield slot.name + ".lora_A.weight", np.ascontiguousarray(a2[slot.in_perm].T)
        yield slot.name + ".lora_B.weight", np.ascontiguousarray(b2[:, slot.out_perm].T)
    if embeddings:
        flat = traverse_util.flatten_dict(embeddings)
        for e in lm_ckpt.reference_layout(cfg):
            if e.path in flat:
                val = flat[e.path][e.index] if e.index else flat[e.path]
                yield e.key, np.ascontiguousarray(np.asarray(e.to_ref(np.asarray(val))))


def adapter_config(cfg: LMConfig, rank: int, scaling: float, base_config: Mapping[str, Any] | None = None) -> dict:
    """config.json of the adapter: the base's config (its file names etc. kept) with our LM kwargs and LoRA on."""
    return {**dict(base_config or {}), **cfg.to_reference_kwargs(), "lora": True, "lora_rank": int(rank),
            "lora_scaling": float(scaling)}


# ---------------------------------------------------------------------------------------------------- import


@dataclasses.dataclass
class Adapter:
    """A loaded adapter: the LoRA tree (float32, our layout), the embedding tables it replaces (JAX params tree,
    possibly empty), and its rank / scaling (scaling None when no config.json says it)."""

    lora: dict
    embeddings: dict
    rank: int
    scaling: float | None


def _read(src: str | Path | Mapping[str, Any]) -> dict[str, np.ndarray]:
    if isinstance(src, str | Path):
        from safetensors import safe_open

        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"LoRA adapter not found: {path}")
        with safe_open(str(path), framework="numpy") as f:
            return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
    return {k: np.asarray(lm_ckpt._to_numpy(v), np.float32) for k, v in src.items()}


def adapter_scaling(path: str | Path) -> float | None:
    """`lora_scaling` of the config.json beside an adapter file (moshi-finetune writes one), or None."""
    conf = Path(path).with_name("config.json")
    if not conf.is_file():
        return None
    raw = json.loads(conf.read_text())
    return float(raw["lora_scaling"]) if "lora_scaling" in raw else None


def load_adapter(src: str | Path | Mapping[str, Any], cfg: LMConfig, layouts: Mapping[PathT, LoraLayout],
                 abstract_params: Any = None) -> Adapter:
    """A reference / moshi-finetune adapter (safetensors path or state dict) -> our LoRA tree + embeddings, strictly:
    a missing factor of a LoRA target, an unknown key, a wrong shape or a non-zero update on a Linear we do not
    adapt raises AdapterError naming it."""
    raw = _read(src)
    slots = linear_slots(cfg, layouts)
    ranks = {v.shape[0] for k, v in raw.items() if k.endswith(".lora_A.weight")}
    if len(ranks) != 1:
        raise AdapterError(f"adapter has {'no lora_A weights' if not ranks else f'several ranks {sorted(ranks)}'}")
    rank = ranks.pop()
    want = {}
    for s in slots:
        want[s.name + ".lora_A.weight"] = (rank, s.in_perm.size)
        want[s.name + ".lora_B.weight"] = (s.out_perm.size, rank)
    emb_entries = {e.key: e for e in lm_ckpt.reference_layout(cfg)
                   if e.path not in layouts and e.ref_shape and _is_embedding_key(e.key)}
    missing = sorted(k for s in slots if s.target for k in (s.name + ".lora_A.weight", s.name + ".lora_B.weight")
                     if k not in raw)
    unexpected = sorted(k for k in raw if k not in want and k not in emb_entries)
    shapes = {**want, **{k: e.ref_shape for k, e in emb_entries.items()}}
    misshaped = [f"{k}: {raw[k].shape}, expected {shapes[k]}" for k in raw if k in shapes
                 and tuple(raw[k].shape) != tuple(shapes[k])]
    if missing or unexpected or misshaped:
        parts = [f"{name} ({len(v)}): {'; '.join(v[:8])}{' ...' if len(v) > 8 else ''}"
                 for name, v in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)) if v]
        raise AdapterError("LoRA adapter does not match the model: " + " | ".join(parts))

    flat: dict[PathT, np.ndarray] = {}
    for path, lay in layouts.items():
        flat[path + ("a",)] = np.zeros(lay.lead + lay.in_shape + (rank,), np.float32)
        flat[path + ("b",)] = np.zeros(lay.lead + (rank,) + lay.out_shape, np.float32)
    for s in slots:
        a_ref, b_ref = raw.get(s.name + ".lora_A.weight"), raw.get(s.name + ".lora_B.weight")
        if not s.target:
            if a_ref is not None and b_ref is not None and np.any(b_ref @ a_ref):
                raise AdapterError(f"{s.name}: the adapter updates this Linear, which moshi-jax's LoRA does not adapt")
            continue
        lay = layouts[s.path]
        a2 = np.empty((s.in_perm.size, rank), np.float32)
        a2[s.in_perm] = a_ref.T
        b2 = np.empty((rank, s.out_perm.size), np.float32)
        b2[:, s.out_perm] = b_ref.T
        flat[s.path + ("a",)][s.index] = a2.reshape(lay.in_shape + (rank,))
        flat[s.path + ("b",)][s.index] = b2.reshape((rank,) + lay.out_shape)

    emb_flat: dict[PathT, np.ndarray] = {}
    given = [e for k, e in emb_entries.items() if k in raw]
    if given:
        shapes_jax = traverse_util.flatten_dict(lm_ckpt.abstract_params(cfg) if abstract_params is None
                                                else abstract_params)
        for e in given:
            val = np.asarray(e.to_jax(raw[e.key]), np.float32)
            if not e.index:
                emb_flat[e.path] = val
                continue
            buf = emb_flat.setdefault(e.path, np.full(tuple(shapes_jax[e.path].shape), np.nan, np.float32))
            buf[e.index] = val
        partial = ["/".join(p) for p, v in emb_flat.items() if np.isnan(v).any()]
        if partial:
            raise AdapterError(f"adapter holds only some of the stacked embedding tables of {partial}")
    scaling = adapter_scaling(src) if isinstance(src, str | Path) else None
    return Adapter(traverse_util.unflatten_dict(flat), traverse_util.unflatten_dict(emb_flat) if emb_flat else {},
                   rank, scaling)


def _is_embedding_key(key: str) -> bool:
    return "emb" in key.split(".")[0]


def apply_embeddings(params: Any, embeddings: Any) -> Any:
    """`params` with the adapter's embedding tables in place (dtype kept)."""
    if not embeddings:
        return params
    import jax.numpy as jnp

    flat = traverse_util.flatten_dict(params)
    for path, val in traverse_util.flatten_dict(embeddings).items():
        if tuple(flat[path].shape) != tuple(val.shape):
            raise AdapterError(f"adapter embedding {'/'.join(path)}: {val.shape}, model {flat[path].shape}")
        flat[path] = jnp.asarray(val, flat[path].dtype)
    return traverse_util.unflatten_dict(flat)
