"""The Moshi LM (reference `moshi.models.lm.LMModel`): temporal transformer (Helium) over the sum of the
stream embeddings, text head, and the depth transformer (depformer) that predicts the `dep_q` audio
codebooks of each time step one after the other.

Params (names chosen to follow the reference's state-dict keys; see `moshi_jax.lm.checkpoint`):
  emb [n_q, card+1, dim]                 text_emb [text_card+1, dim]
  transformer/... (scanned layers)       out_norm/...          text_linear [dim, text_out]
  depformer_in [num_in, dim, dep_dim]    depformer_text_emb [text_card+1, dep_dim | r]
  depformer_emb [dep_q-1, card+1, dep_dim | r]   (+ *_low_rank [.., r, dep_dim] with low-rank embeddings)
  depformer/... (scanned layers, per-step weights on a `steps` axis)   linears [dep_q, dep_dim, card]
Per-step tensors carry a leading `steps` axis so `depth_step` can index them with a traced step k.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moshi_jax.lm import delays as dl
from moshi_jax.lm.config import LMConfig
from moshi_jax.nn import quant
from moshi_jax.nn.attention import fan_in_normal
from moshi_jax.nn.matmul import einsum
from moshi_jax.nn.norms import Norm
from moshi_jax.nn.transformer import (
    Transformer,
    TransformerState,
    init_state,
    select_step_weights,
    stream_layers,
    unstack_layers,
)

Array = jax.Array


@struct.dataclass
class LMOutput:
    """Training-forward outputs, undelayed (aligned with `codes`); masked positions hold finite junk (0)."""

    text_logits: Array  # [B, 1, T, text_out] float32
    text_mask: Array  # [B, 1, T] bool
    audio_logits: Array  # [B, dep_q, T, card] float32
    audio_mask: Array  # [B, dep_q, T] bool


def _stacked_init(init, n: int):
    """Independent draws of `init` for each entry of a leading stack axis of size `n`."""

    def stacked(key, shape, dtype=jnp.float32):
        if n == 0:  # an empty stack (the audio-token embeddings of a depformer with one codebook)
            return jnp.zeros(shape, dtype)
        return jnp.stack([init(k, shape[1:], dtype) for k in jax.random.split(key, n)])

    return stacked


def _uniform_fan_in(fan_in: int):
    """PyTorch's default nn.Linear init (kaiming_uniform a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _embed(table: Array, tokens: Array, dtype) -> Array:
    """Lookup with the reference's zero token: id -1 embeds to exactly 0 (ids are clamped at 0 first)."""
    y = jnp.take(table, jnp.maximum(tokens, 0), axis=0, mode="clip").astype(dtype)
    return jnp.where((tokens == -1)[..., None], jnp.zeros((), dtype), y)


def _embed_stacked(tables: Array, tokens: Array, dtype) -> Array:
    """tables `[n, V, dim]`, tokens `[B, n, T]` (row k looked up in table k) -> `[B, n, T, dim]`, as `_embed`.
    One gather from the flattened tables: per-table lookups would each make (in the backward pass) a
    full-size gradient of the whole stack, summed afterwards."""
    n, V, dim = tables.shape
    ids = jnp.clip(tokens, 0, V - 1) + (V * jnp.arange(n, dtype=jnp.int32))[:, None]
    y = jnp.take(tables.reshape(n * V, dim), ids, axis=0).astype(dtype)
    return jnp.where((tokens == -1)[..., None], jnp.zeros((), dtype), y)


class LMModel(nn.Module):
    """`__call__(codes [B, 1+n_q, T]) -> LMOutput` (training forward); `temporal`, `depth`, `depth_step` are
    the pieces generation uses (call them with `LMModel(cfg).apply({"params": p}, ..., method="temporal")`)."""

    cfg: LMConfig

    def setup(self):
        cfg = self.cfg
        t = cfg.temporal
        pdt = jnp.dtype(t.param_dtype)
        dim = t.d_model
        emb_init = fan_in_normal(dim)  # reference: truncated normal, std 1/sqrt(embedding_dim)
        self.emb = self.param("emb", nn.with_logical_partitioning(
            _stacked_init(emb_init, cfg.n_q), ("codebooks", "vocab", "embed")), (cfg.n_q, cfg.card + 1, dim), pdt)
        self.text_emb = self.param("text_emb", nn.with_logical_partitioning(emb_init, ("vocab", "embed")),
                                   (cfg.text_card + 1, dim), pdt)
        self.transformer = Transformer(t)
        self.out_norm = Norm(t.norm, dim, pdt)
        self.text_linear = self.param("text_linear", nn.with_logical_partitioning(
            fan_in_normal(dim), ("embed", "vocab")), (dim, cfg.text_out), pdt)
        if cfg.depth is None:
            return
        d = cfg.depth
        dpdt = jnp.dtype(d.param_dtype)
        dd = d.d_model
        self.depformer_in = self.param("depformer_in", nn.with_logical_partitioning(
            _stacked_init(_uniform_fan_in(dim), cfg.num_depformer_in), ("steps", "embed", "dep_embed")),
            (cfg.num_depformer_in, dim, dd), dpdt)
        r = cfg.depformer_low_rank_embeddings
        width = dd if r is None else r
        e_axes = ("vocab", "embed") if r is None else ("vocab", "low_rank")
        self.depformer_text_emb = self.param("depformer_text_emb", nn.with_logical_partitioning(
            fan_in_normal(width), e_axes), (cfg.text_card + 1, width), dpdt)
        n_emb = cfg.dep_q - 1  # the last codebook is never a depformer input
        self.depformer_emb = self.param("depformer_emb", nn.with_logical_partitioning(
            _stacked_init(fan_in_normal(width), n_emb), ("steps",) + e_axes), (n_emb, cfg.card + 1, width), dpdt)
        if r is not None:
            self.depformer_text_emb_low_rank = self.param(
                "depformer_text_emb_low_rank", nn.with_logical_partitioning(_uniform_fan_in(r), ("low_rank", "embed")),
                (r, dd), dpdt)
            self.depformer_emb_low_rank = self.param(
                "depformer_emb_low_rank", nn.with_logical_partitioning(
                    _stacked_init(_uniform_fan_in(r), n_emb), ("steps", "low_rank", "embed")), (n_emb, r, dd), dpdt)
        self.depformer = Transformer(d)
        self.linears = self.param("linears", nn.with_logical_partitioning(
            _stacked_init(fan_in_normal(dd), cfg.dep_q), ("steps", "embed", "vocab")), (cfg.dep_q, dd, cfg.card), dpdt)

    # ------------------------------------------------------------------ temporal transformer
    def temporal(self, tokens: Array, state: TransformerState | None = None, layers: tuple[Any, ...] | None = None
                 ) -> tuple[Array, Array, TransformerState | None]:
        """tokens `[B, 1+n_q, T]` int32, already the model input (delayed and shifted; -1 = zero embedding)
        -> (hidden `[B, T, dim]` after out_norm, text logits `[B, T, text_out]` float32, new state).
        `layers` (streaming only): the transformer's per-layer params (`StreamingParams.temporal_layers`),
        used instead of the stacked `transformer` params."""
        cfg = self.cfg
        if tokens.ndim != 3 or tokens.shape[1] != cfg.num_streams:
            raise ValueError(f"tokens must be [B, {cfg.num_streams}, T], got {tokens.shape}")
        dtype = jnp.dtype(cfg.temporal.dtype)
        x = _embed(self.text_emb, tokens[:, 0], dtype)
        if cfg.n_q:  # sum of the audio streams' embeddings, then the text's (the reference's order)
            x = _embed_stacked(self.emb, tokens[:, 1:], dtype).sum(axis=1, dtype=jnp.float32).astype(dtype) + x
        if layers is None:
            x, state = self.transformer(x, state)
        else:
            if state is None:
                raise ValueError("per-layer params (`layers`) are for streaming: pass a TransformerState")
            x, state = stream_layers(cfg.temporal, layers, x, state)
        hidden = self.out_norm(x)
        # In the compute dtype like the reference's Linear, then float32 for the softmax / sampling.
        text_logits = einsum("btd,dv->btv", hidden, self.text_linear.astype(dtype), jnp.float32)
        return hidden, text_logits, state

    # ------------------------------------------------------------------ depth transformer
    def _project_in(self, hidden: Array, index: Array) -> Array:
        d = self.cfg.depth
        w = self.depformer_in[index].astype(d.dtype)
        return jnp.einsum("...d,...de->...e", hidden.astype(d.dtype), w)

    def _dep_token_emb(self, tokens: Array, table: Array, low_rank: Array | None) -> Array:
        dtype = jnp.dtype(self.cfg.depth.dtype)
        y = _embed(table, tokens, dtype)
        if low_rank is not None:
            y = einsum("...r,rd->...d", y, low_rank.astype(dtype))
        return y

    def depth(self, hidden: Array, tokens: Array) -> Array:
        """Teacher-forced depformer: hidden `[B, T, dim]`, tokens `[B, dep_q, T]` (row 0 the text token of each
        position, row k the audio codebook k-1: the delayed grid's current-position tokens)
        -> audio logits `[B, dep_q, T, card]` float32."""
        cfg = self.cfg
        if cfg.depth is None:
            raise ValueError("this LM has no depth transformer (dep_q == 0)")
        B, T, _ = hidden.shape
        Ka = cfg.dep_q
        if tokens.shape != (B, Ka, T):
            raise ValueError(f"tokens must be [B, dep_q, T] = {(B, Ka, T)}, got {tokens.shape}")
        r = cfg.depformer_low_rank_embeddings
        idx = jnp.asarray([cfg.depformer_in_index(k) for k in range(Ka)], jnp.int32)
        dtype = jnp.dtype(cfg.depth.dtype)
        proj = einsum("btd,kde->btke", hidden.astype(dtype), self.depformer_in[idx].astype(dtype))
        text_e = self._dep_token_emb(tokens[:, 0], self.depformer_text_emb,
                                     None if r is None else self.depformer_text_emb_low_rank)[:, None]
        if Ka > 1:
            audio_e = _embed_stacked(self.depformer_emb, tokens[:, 1:], dtype)  # [B, Ka-1, T, width]
            if r is not None:
                audio_e = einsum("bktr,krd->bktd", audio_e, self.depformer_emb_low_rank.astype(dtype))
            text_e = jnp.concatenate([text_e, audio_e], axis=1)
        x = text_e.transpose(0, 2, 1, 3) + proj  # [B, T, Ka, dep_dim]
        y, _ = self.depformer(x.reshape(B * T, Ka, -1))
        logits = einsum("nkd,kdc->nkc", y, self.linears.astype(y.dtype), jnp.float32)
        return logits.reshape(B, T, Ka, -1).transpose(0, 2, 1, 3)

    def depth_step(self, hidden: Array, token: Array, k: Array, state: TransformerState
                   ) -> tuple[Array, TransformerState]:
        """One depformer step: hidden `[B, dim]` (temporal output of this time step), token `[B]` int32 (the
        text token for k == 0, else audio codebook k-1), k int32 scalar (may be traced; must equal the number
        of steps already in `state`) -> (logits `[B, card]` float32 for codebook k, new state)."""
        cfg = self.cfg
        if cfg.depth is None:
            raise ValueError("this LM has no depth transformer (dep_q == 0)")
        k = jnp.asarray(k, jnp.int32)
        r = cfg.depformer_low_rank_embeddings
        if cfg.depformer_multi_linear and cfg.depformer_weights_per_step_schedule:
            in_index = jnp.asarray(cfg.depformer_weights_per_step_schedule, jnp.int32)[k]
        elif cfg.depformer_multi_linear:
            in_index = k
        else:
            in_index = jnp.zeros((), jnp.int32)
        x = self._project_in(hidden, in_index)
        text_e = self._dep_token_emb(token, self.depformer_text_emb,
                                     None if r is None else self.depformer_text_emb_low_rank)
        if cfg.dep_q > 1:
            a = jnp.maximum(k - 1, 0)
            audio_e = self._dep_token_emb(token, self.depformer_emb[a],
                                          None if r is None else self.depformer_emb_low_rank[a])
            tok_e = jnp.where(k == 0, text_e, audio_e)
        else:
            tok_e = text_e
        y, state = self.depformer((tok_e + x)[:, None], state)
        logits = jnp.einsum("bd,dc->bc", y[:, 0], self.linears[k].astype(y.dtype)).astype(jnp.float32)
        return logits, state

    # ------------------------------------------------------------------ training forward
    def __call__(self, codes: Array) -> LMOutput:
        """codes `[B, 1+n_q, T]` int32 (-1 = no token) -> LMOutput aligned with `codes` (reference
        `LMModel.forward`: delay, initial column, temporal + teacher-forced depth, undelay, masks)."""
        cfg = self.cfg
        if codes.ndim != 3 or codes.shape[1] != cfg.num_streams:
            raise ValueError(f"codes must be [B, {cfg.num_streams}, T], got {codes.shape}")
        codes = codes.astype(jnp.int32)
        B, _, T = codes.shape
        initial = dl.initial_tokens(cfg.text_initial_token_id, cfg.initial_token_id, cfg.n_q)
        seq = dl.model_input(codes, cfg.delays, initial)  # [B, K, T + 1]
        hidden, text_logits, _ = self.temporal(seq[:, :, :-1])
        text_logits, text_mask = dl.undelay(text_logits[:, None], cfg.delays[:1])
        text_mask = text_mask & (codes[:, :1] != cfg.zero_token_id)
        if cfg.dep_q:
            audio = self.depth(hidden, seq[:, : cfg.dep_q, 1:])
        else:
            audio = jnp.zeros((B, 0, T, cfg.card), jnp.float32)
        audio_logits, audio_mask = dl.undelay(audio, cfg.delays[1: 1 + cfg.dep_q])
        audio_mask = audio_mask & (codes[:, 1: 1 + cfg.dep_q] != cfg.zero_token_id)
        return LMOutput(text_logits=text_logits, text_mask=text_mask, audio_logits=audio_logits,
                        audio_mask=audio_mask)


def forward(params, codes: Array, cfg: LMConfig) -> LMOutput:
    """Training forward as a pure function: `LMModel(cfg).apply({"params": params}, codes)`."""
    return LMModel(cfg).apply({"params": params}, codes)


def logits_drift(params, codes: Array, cfg: LMConfig, dtype: str = "bfloat16") -> dict[str, float]:
    """How far the forward logits move when params and compute are cast to `dtype` (norms and the attention
    softmax stay float32): max |low - f32| / max |f32| over masked-True positions, per head."""
    low_cfg = cfg.with_dtypes(dtype, dtype)
    low = jax.tree.map(lambda x: x.astype(dtype), params)
    fwd = jax.jit(forward, static_argnums=2)
    ref, out = fwd(params, codes, cfg), fwd(low, codes, low_cfg)
    res = {}
    for name in ("text", "audio"):
        mask = getattr(ref, f"{name}_mask")[..., None]
        a = jnp.where(mask, getattr(ref, f"{name}_logits"), 0.0)
        b = jnp.where(mask, getattr(out, f"{name}_logits"), 0.0)
        res[name] = float(jnp.abs(a - b).max() / jnp.maximum(jnp.abs(a).max(), 1e-30))
    return res


@struct.dataclass
class StreamingParams:
    """Params laid out for streaming generation (`prepare_streaming_params`): each layer and each depth step
    has its own buffers, so the jitted step reads weights in place instead of slicing (copying) stacks."""

    base: Any  # the top-level params (embeddings, heads, norms) without the two transformer stacks
    temporal_layers: tuple[Any, ...]  # per temporal layer: the layer's param tree
    depth_steps: tuple[dict[str, Any], ...]  # per depth step k: in [dim, dep_dim], emb, emb_low_rank, linear, layers


def prepare_streaming_params(params: Any, cfg: LMConfig, consume: bool = False,
                             weight_dtype: str | None = None) -> StreamingParams:
    """Convert (unboxed) LM params once, outside the jitted step, for `generate.step`. Copies the stacked
    weights (the original `params` can be dropped afterwards to save memory). `consume=True` (concrete arrays
    only): delete each leaf of the two transformer stacks of `params` as soon as it is copied out, so that the
    peak is the prepared params plus one stacked leaf, not two copies of the model; those leaves of `params`
    are unusable afterwards (the top-level ones are shared with the result and kept).

    `weight_dtype="int8"`: the temporal and depth transformers' kernels (attention in / out projections, MLP
    in / out) become weight-only int8 with per-output-channel scales (`nn.quant`), dequantized inside the
    matmul; embeddings, norms and the text / audio heads are kept. With `consume`, each temporal layer's
    kernel is quantized as it is copied out of the stack, so no bf16 copy of the prepared stack is kept."""
    quant.check_dtype_option("weight_dtype", weight_dtype, quant.WEIGHT_DTYPES)
    params = nn.unbox(params)
    qleaf = quant.quantize_layer_leaf if weight_dtype == "int8" else None
    if consume:
        def unstack(stacked, n):
            return _unstack_consuming(stacked, n, qleaf)
    else:
        def unstack(stacked, n):
            layers = unstack_layers(stacked, n)
            return layers if qleaf is None else quant.quantize_layer_params(layers)
    base = {k: v for k, v in params.items() if k not in ("transformer", "depformer")}
    temporal_layers = unstack(params["transformer"]["layers"], cfg.temporal.num_layers)
    steps: list[dict[str, Any]] = []
    if cfg.depth is not None:
        d = cfg.depth
        # quantized after `select_step_weights` (which slices the per-step kernels)
        dep_layers = (_unstack_consuming if consume else unstack_layers)(params["depformer"]["layers"], d.num_layers)
        low_rank = cfg.depformer_low_rank_embeddings is not None
        for k in range(cfg.dep_q):
            w = d.weights_per_step_schedule[k] if d.weights_per_step_schedule else k
            steps.append({
                "in": params["depformer_in"][cfg.depformer_in_index(k)],
                "emb": params["depformer_text_emb"] if k == 0 else params["depformer_emb"][k - 1],
                "emb_low_rank": None if not low_rank else (
                    params["depformer_text_emb_low_rank"] if k == 0 else params["depformer_emb_low_rank"][k - 1]),
                "linear": params["linears"][k],
                "layers": tuple(select_step_weights(p, w) for p in dep_layers) if d.mult else dep_layers,
            })
            if qleaf is not None:
                steps[-1]["layers"] = quant.quantize_layer_params(steps[-1]["layers"])
    return StreamingParams(base=base, temporal_layers=temporal_layers, depth_steps=tuple(steps))


def _unstack_consuming(stacked: Any, num_layers: int, leaf_fn=None) -> tuple[Any, ...]:
    """`unstack_layers`, deleting each stacked leaf once its per-layer copies exist; `leaf_fn(path, slice)`
    (e.g. `quant.quantize_layer_leaf`) is applied to each layer's slice as it is cut."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(stacked)
    per_leaf = []
    for path, a in leaves:
        per_leaf.append([a[i] if leaf_fn is None else leaf_fn(path, a[i]) for i in range(num_layers)])
        _delete(a, per_leaf[-1])
    return tuple(jax.tree.unflatten(treedef, [parts[i] for parts in per_leaf]) for i in range(num_layers))


def _delete(a: Any, copies: Any) -> None:
    """Free the buffer of array `a` once `copies` (made from it) are computed; tracers and None are left."""
    if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer) and not a.is_deleted():
        jax.block_until_ready(copies)
        a.delete()


def depth_step_prepared(cfg: LMConfig, step: dict[str, Any], hidden: Array, token: Array,
                        state: TransformerState) -> tuple[Array, TransformerState]:
    """`LMModel.depth_step` for a static step k, with `StreamingParams.depth_steps[k]`: hidden `[B, dim]`,
    token `[B]` -> (logits `[B, card]` float32, new state). Same maths; embeddings are row lookups."""
    d = cfg.depth
    dtype = jnp.dtype(d.dtype)
    x = jnp.einsum("bd,de->be", hidden.astype(dtype), step["in"].astype(dtype))
    e = _embed(step["emb"], token, dtype)
    if step["emb_low_rank"] is not None:
        e = e @ step["emb_low_rank"].astype(dtype)
    y, state = stream_layers(d, step["layers"], (e + x)[:, None], state, step_index=0 if d.mult else None)
    logits = jnp.einsum("bd,dc->bc", y[:, 0], step["linear"].astype(y.dtype)).astype(jnp.float32)
    return logits, state


def init_temporal_state(cfg: LMConfig, batch_size: int, per_layer: bool = False,
                        kv_cache_dtype: str | None = None) -> TransformerState:
    """Fresh streaming state of the temporal transformer (KV rings of `temporal.context` steps). `per_layer`:
    one ring per layer, for generation with `StreamingParams` (`stream_layers`); else stacked (`LMModel`).
    `kv_cache_dtype="int8"`: quantized rings (half the bytes of bf16; `nn.kv_cache`), None: the compute dtype."""
    quant.check_dtype_option("kv_cache_dtype", kv_cache_dtype, quant.KV_CACHE_DTYPES)
    return init_state(cfg.temporal, batch_size, dtype=None if kv_cache_dtype is None else jnp.int8,
                      per_layer=per_layer)


def init_depth_state(cfg: LMConfig, batch_size: int, per_layer: bool = False) -> TransformerState:
    """Fresh depformer state for one time step (KV rings of dep_q steps, offset 0); `per_layer` as for
    `init_temporal_state`."""
    if cfg.depth is None:
        raise ValueError("this LM has no depth transformer (dep_q == 0)")
    return init_state(cfg.depth, batch_size, per_layer=per_layer)


def init_params(cfg: LMConfig, key: Array, seq_len: int = 2):
    """Random params (boxed with logical axis names, as `LMModel(cfg).init(...)["params"]`)."""
    return LMModel(cfg).init(key, jnp.zeros((1, cfg.num_streams, seq_len), jnp.int32))["params"]


def param_count(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(params)))
