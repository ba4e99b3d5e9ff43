"""Streaming generation (reference `LMGen`) as one pure, jitted step over an explicit state pytree.

    sparams = prepare_streaming_params(params, cfg)   # once
    state = init_gen_state(cfg, batch_size)
    state, out = step(sparams, state, user_codes, rng, cfg=cfg, sampling=SamplingConfig())
    # user_codes int32 [B, n_q - dep_q]: the user's Mimi codes of the latest 80 ms frame
    # out.text [B], out.audio [B, dep_q]: one time-aligned Moshi frame where out.valid [B]

One call = one 80 ms frame: write the user's codes into the delay cache, gather the model input column,
run the temporal transformer for one position (KV ring), sample the text token, then run the `dep_q`
depth-transformer steps (unrolled inside the same compiled step), each sampling one audio codebook
that feeds the next.

Speed: pass `prepare_streaming_params(params, cfg)` (converted once) instead of the raw params. It gives
every temporal layer and every depth step its own weight buffers, which the step then reads in place; with
raw params the step still works but slices the stacked weights (copies them) on every call.

The reference's alignment is kept exactly (spec section 2.9):

- the user frame passed at call `s` is time `s - 1` (the first call's user frame is never read);
- the text / semantic tokens sampled at call `s` are time `s`, the acoustic tokens (delay 1) time `s - 1`;
- the delay cache `[B, 1 + n_q, max_delay + 2]` holds tokens in the delayed domain; the output at call
  `s` gathers column `(s + 1 - max_delay + d_k) % (max_delay + 2)` for the `1 + dep_q` generated streams,
  i.e. the first call returns nothing valid and call `s >= 1` returns the Moshi frame of time `s - 1`.

Per-item sampling: a state made with `init_gen_state(..., item_sampling=SamplingConfig())` carries each
item's temperatures, top-k, repetition penalty, seeds and RNG keys as runtime arrays (`GenState.items`,
set with `set_item_sampling`); the step then samples every item with its own settings and key (its
`sampling` / `rng` arguments are unused), so an item's tokens depend only on its inputs, settings and seed.

Everything that changes over time is in `GenState` (fixed shapes), so the step compiles once and runs
forever: the temporal KV cache is a ring of `context` slots with absolute positions, so running past the
context window overwrites the oldest entries (as the reference does) without recompiling or growing.
The depth transformer's KV cache is re-created for every frame (the reference re-enters a fresh depformer
streaming context per frame), so it is not part of the state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from moshi_jax.lm import model as lm_model
from moshi_jax.lm.config import LMConfig
from moshi_jax.lm.model import StreamingParams, prepare_streaming_params
from moshi_jax.nn.sampling import (
    ItemSampling,
    SamplingConfig,
    apply_repetition_penalty,
    sample_token,
    sample_token_items,
    split_item_keys,
)
from moshi_jax.nn.transformer import TransformerState

Array = jax.Array
Params = Any
DEFAULT_SAMPLING = SamplingConfig()  # the reference LMGen defaults


@struct.dataclass
class GenState:
    """Streaming generation state for a batch of B independent conversations."""

    temporal: TransformerState  # temporal transformer KV rings ([L, B, context, H, Dh]) and offset [B]
    cache: Array  # [B, 1 + n_q, max_delay + 2] int32 delayed-domain tokens; -2 = not generated yet
    offsets: Array  # [B] int32: frames stepped since the last reset (the reference's `offsets`)
    pad_bias: Array  # [B] float32 added to the PAD token's log-prob when sampling text (0 = off)
    # Per-item sampling (runtime settings, own keys, repetition penalty), or None: the static `sampling`
    # argument and the step's `rng` decide for the whole batch (the default path).
    items: ItemSampling | None = None


@struct.dataclass
class StepOutput:
    """What one call returns. `text` / `audio` are the time-aligned Moshi frame (-2 where not valid)."""

    text: Array  # [B] int32 text token (PAD 3 / EPAD 0 most of the time)
    audio: Array  # [B, dep_q] int32 Mimi codes, ready for `mimi.decode`
    valid: Array  # [B] bool: False on the first call after init / reset (nothing aligned yet)
    sampled_text: Array  # [B] int32 the text token sampled at this call (delayed domain, time s)
    sampled_audio: Array  # [B, dep_q] int32 the audio tokens sampled at this call (delayed domain)
    text_logits: Array | None = None  # [B, text_out] float32 (only with return_logits=True)
    audio_logits: Array | None = None  # [B, dep_q, card] float32 (only with return_logits=True)

    @property
    def frame(self) -> Array:
        """[B, 1 + dep_q]: text then audio codes (the reference's `LMGen.step` output, squeezed)."""
        return jnp.concatenate([self.text[:, None], self.audio], axis=1)


def init_gen_state(cfg: LMConfig, batch_size: int, pad_bias: float | Array = 0.0,
                   item_sampling: SamplingConfig | None = None, kv_cache_dtype: str | None = None) -> GenState:
    """Fresh state for `batch_size` conversations (no parameters needed).

    `item_sampling`: per-item sampling (`GenState.items`) starting from these settings for every item; the
    step then ignores its `sampling` / `rng` arguments (see `set_item_sampling`). `kv_cache_dtype="int8"`:
    the temporal KV rings are int8 with per-(position, head) scales (half the state; the step follows the
    state's layout), None: the LM's compute dtype."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return GenState(
        temporal=lm_model.init_temporal_state(cfg, batch_size, per_layer=True, kv_cache_dtype=kv_cache_dtype),
        cache=jnp.full((batch_size, cfg.num_streams, cfg.max_delay + 2), cfg.ungenerated_token_id, jnp.int32),
        offsets=jnp.zeros((batch_size,), jnp.int32),
        pad_bias=jnp.broadcast_to(jnp.asarray(pad_bias, jnp.float32), (batch_size,)),
        items=None if item_sampling is None else ItemSampling.create(batch_size, item_sampling),
    )


def reset(state: GenState, mask: Array) -> GenState:
    """Restart the conversations where `mask` [B] bool is True; the others continue untouched.

    As in the reference, only offsets and KV positions are cleared: stale keys are masked out by their
    position (-1), stale delay-cache columns are overwritten before they are read."""
    mask = jnp.asarray(mask, bool)
    if mask.shape != state.offsets.shape:
        raise ValueError(f"reset mask must have shape {state.offsets.shape}, got {mask.shape}")
    t = state.temporal
    layers = tuple(c.replace(positions=jnp.where(mask[:, None], -1, c.positions)) for c in t.layers)
    return state.replace(
        temporal=TransformerState(offset=jnp.where(mask, 0, t.offset), layers=layers),
        cache=jnp.where(mask[:, None, None], -2, state.cache),
        offsets=jnp.where(mask, 0, state.offsets),
        items=None if state.items is None else state.items.restart(mask),  # keys back to the item's seeds
    )


def set_pad_bias(state: GenState, pad_bias: float | Array) -> GenState:
    """Set the PAD log-prob bias (scalar or per item [B]); a runtime value, so no recompilation."""
    return state.replace(pad_bias=jnp.broadcast_to(jnp.asarray(pad_bias, jnp.float32), state.offsets.shape))


def set_item_sampling(state: GenState, mask: Array, **values) -> GenState:
    """Set per-item settings where mask [B]: `values` name `ItemSampling` fields (scalars or [B] / [B, 2]
    arrays), e.g. text_temp=0.5, text_seed_key=seed_key(7). Runtime values: no recompilation. A changed
    seed key takes effect at the item's next reset."""
    if state.items is None:
        raise ValueError("this state has no per-item sampling: create it with init_gen_state(..., item_sampling=)")
    mask = jnp.asarray(mask, bool)
    items = state.items
    new = {}
    for name, v in values.items():
        old = getattr(items, name)
        v = jnp.broadcast_to(jnp.asarray(v, old.dtype), old.shape)
        new[name] = jnp.where(mask.reshape((-1,) + (1,) * (old.ndim - 1)), v, old)
    return state.replace(items=items.replace(**new))


def _check_inputs(cfg: LMConfig, state: GenState, user_codes: Array) -> None:
    B = state.offsets.shape[0]
    n_user = cfg.n_q - cfg.dep_q
    if user_codes.ndim != 2 or user_codes.shape[0] != B or user_codes.shape[1] < n_user:
        raise ValueError(f"user_codes must be [B={B}, >= {n_user}] (the user's Mimi codes of one frame), "
                         f"got shape {tuple(user_codes.shape)}")
    if state.cache.shape != (B, cfg.num_streams, cfg.max_delay + 2):
        raise ValueError(f"state.cache has shape {tuple(state.cache.shape)}, which does not match this LMConfig "
                         f"({(B, cfg.num_streams, cfg.max_delay + 2)})")


def _step(params: Params, state: GenState, user_codes: Array, rng: Array | None, *, cfg: LMConfig,
          sampling: SamplingConfig = DEFAULT_SAMPLING, forced_text: Array | None = None,
          forced_audio: Array | None = None, return_logits: bool = False,
          text_hook: Callable[[Array], Array] | None = None) -> tuple[GenState, StepOutput]:
    _check_inputs(cfg, state, user_codes)
    # Raw params work too (converted here, i.e. the stacks are sliced on every call): convert them once
    # with `prepare_streaming_params` for speed.
    sp = params if isinstance(params, StreamingParams) else lm_model.prepare_streaming_params(params, cfg)
    model = lm_model.LMModel(cfg)
    variables = {"params": sp.base}
    B = state.offsets.shape[0]
    dep_q, n_user = cfg.dep_q, cfg.n_q - cfg.dep_q
    CT = cfg.max_delay + 2
    delays = jnp.asarray(cfg.delays, jnp.int32)
    bidx = jnp.arange(B)[:, None]
    offsets = state.offsets
    cache = state.cache

    # 1. the user's codes go to their delayed column (offset + d) % CT
    user_streams = jnp.arange(1 + dep_q, cfg.num_streams)
    user_cols = (offsets[:, None] + delays[None, 1 + dep_q:]) % CT
    cache = cache.at[bidx, user_streams[None], user_cols].set(user_codes[:, :n_user].astype(jnp.int32))

    # 2. model input: column offset % CT; streams whose delay is not yet covered get the initial token
    inp = jnp.take_along_axis(cache, jnp.broadcast_to((offsets % CT)[:, None, None], (B, cfg.num_streams, 1)),
                              axis=2)[:, :, 0]
    initial = jnp.asarray([cfg.text_initial_token_id] + [cfg.initial_token_id] * cfg.n_q, jnp.int32)
    inp = jnp.where(offsets[:, None] <= delays[None], initial[None], inp)  # [B, 1 + n_q]

    # 3. temporal transformer, one position
    hidden, text_logits, temporal = model.apply(variables, inp[:, :, None], state.temporal, sp.temporal_layers,
                                                method="temporal")
    hidden, text_logits = hidden[:, 0], text_logits[:, 0]  # [B, dim], [B, text_out] float32
    items = state.items
    if rng is None:
        k_text = k_audio = None
    else:
        k_text, k_audio = jax.random.split(rng)
    pad_bias = jnp.zeros_like(text_logits).at[:, cfg.existing_text_padding_id].set(state.pad_bias)
    if items is None:
        text = sample_token(k_text, text_logits, sampling.temp_text, sampling.top_k_text, sampling.use_sampling,
                            pad_bias)
    else:  # per-item settings and keys: an item's draws depend only on its own settings and seed
        k_text, next_text_key = split_item_keys(items.text_key)
        k_audio, next_audio_key = split_item_keys(items.audio_key)
        penalised = apply_repetition_penalty(text_logits, items.recent_text, items.repetition_context,
                                             items.repetition_penalty)
        text = sample_token_items(k_text, penalised, items.text_temp, items.text_top_k, pad_bias)
    if forced_text is not None:
        text = jnp.where(forced_text >= 0, forced_text.astype(jnp.int32), text)
    if text_hook is not None:  # e.g. the TTS word-feeding state machine: sampled text [B] -> text fed on [B]
        text = text_hook(text).astype(jnp.int32)

    # 4. depth transformer: dep_q sequential steps, unrolled (each step reads its own weights in place)
    audio = jnp.zeros((B, dep_q), jnp.int32)
    audio_logits = None
    if dep_q:
        prev, dstate, toks, all_logits = text, lm_model.init_depth_state(cfg, B, per_layer=True), [], []
        for k in range(dep_q):
            logits, dstate = lm_model.depth_step_prepared(cfg, sp.depth_steps[k], hidden, prev, dstate)
            if items is None:
                key = None if k_audio is None else jax.random.fold_in(k_audio, k)
                tok = sample_token(key, logits, sampling.temp, sampling.top_k, sampling.use_sampling)
            else:
                keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(k_audio, k)
                tok = sample_token_items(keys, logits, items.audio_temp, items.audio_top_k)
            if forced_audio is not None:
                tok = jnp.where(forced_audio[:, k] >= 0, forced_audio[:, k].astype(jnp.int32), tok)
            toks.append(tok)
            all_logits.append(logits)
            prev = tok
        audio = jnp.stack(toks, axis=1)
        if return_logits:
            audio_logits = jnp.stack(all_logits, axis=1)  # float32 (depth_step_prepared)
    elif return_logits:
        audio_logits = jnp.zeros((B, 0, cfg.card), jnp.float32)

    # 5. advance; the sampled tokens go to column (offset + 1) % CT
    offsets = offsets + 1
    col = offsets % CT
    gen = jnp.concatenate([text[:, None], audio], axis=1)  # [B, 1 + dep_q]
    cache = cache.at[bidx, jnp.arange(1 + dep_q)[None], col[:, None]].set(gen)

    # 6. the time-aligned frame: stream k from column (offset - max_delay + d_k) % CT
    out_cols = (offsets[:, None] - cfg.max_delay + delays[None, : 1 + dep_q]) % CT
    out = cache[bidx, jnp.arange(1 + dep_q)[None], out_cols]
    valid = offsets > cfg.max_delay
    out = jnp.where(valid[:, None], out, cfg.ungenerated_token_id)

    if items is not None:
        special = (cfg.existing_text_padding_id, cfg.existing_text_end_padding_id, cfg.text_initial_token_id)
        items = items.replace(text_key=next_text_key, audio_key=next_audio_key).remember_text(text, special)
    new_state = state.replace(temporal=temporal, cache=cache, offsets=offsets, items=items)
    return new_state, StepOutput(
        text=out[:, 0], audio=out[:, 1:], valid=valid, sampled_text=text, sampled_audio=audio,
        text_logits=text_logits if return_logits else None, audio_logits=audio_logits)


_STATIC = ("cfg", "sampling", "return_logits")

#: `step(params, state, user_codes [B, n_q - dep_q], rng, *, cfg, sampling=SamplingConfig(),
#: forced_text=None [B], forced_audio=None [B, dep_q], return_logits=False) -> (state, StepOutput)`.
#: `rng` may be None for greedy sampling. `forced_*` (teacher forcing): entries >= 0 replace the sampled
#: token (and are fed to the next depth step / the next frame), negative entries are sampled.
step = jax.jit(_step, static_argnames=_STATIC)

#: Same as `step` but donates `state` (its buffers are reused in place: no second copy of the KV cache).
step_donated = jax.jit(_step, static_argnames=_STATIC, donate_argnames=("state",))


def _run(params: Params, state: GenState, user_codes: Array, rng: Array | None, *, cfg: LMConfig,
         sampling: SamplingConfig = DEFAULT_SAMPLING, forced_text: Array | None = None,
         forced_audio: Array | None = None, return_logits: bool = False) -> tuple[GenState, StepOutput]:
    T = user_codes.shape[-1]
    if not isinstance(params, StreamingParams):  # once per call, not once per frame
        params = prepare_streaming_params(params, cfg)
    xs = {"user": jnp.moveaxis(user_codes, -1, 0),
          "rng": None if rng is None else jax.random.split(rng, T),
          "text": None if forced_text is None else jnp.moveaxis(forced_text, -1, 0),
          "audio": None if forced_audio is None else jnp.moveaxis(forced_audio, -1, 0)}

    def body(state, x):
        return _step(params, state, x["user"], x["rng"], cfg=cfg, sampling=sampling, forced_text=x["text"],
                     forced_audio=x["audio"], return_logits=return_logits)

    state, outs = jax.lax.scan(body, state, xs)
    # time last, as in codes tensors: text [B, T], audio [B, dep_q, T], logits [B, T, V] / [B, dep_q, T, card]
    outs = StepOutput(
        text=outs.text.T, audio=jnp.moveaxis(outs.audio, 0, -1), valid=outs.valid.T,
        sampled_text=outs.sampled_text.T, sampled_audio=jnp.moveaxis(outs.sampled_audio, 0, -1),
        text_logits=None if outs.text_logits is None else jnp.moveaxis(outs.text_logits, 0, 1),
        audio_logits=None if outs.audio_logits is None else jnp.moveaxis(outs.audio_logits, 0, 2))
    return state, outs


#: `run(params, state, user_codes [B, n_q - dep_q, T], rng, *, cfg, ..., forced_text [B, T],
#: forced_audio [B, dep_q, T]) -> (state, StepOutput with a trailing time axis)`: T calls of `step` in
#: one `lax.scan` (offline generation over a file, teacher-forced scoring).
run = jax.jit(_run, static_argnames=_STATIC)


def teacher_forcing_inputs(cfg: LMConfig, codes: np.ndarray) -> dict[str, np.ndarray]:
    """Arguments for `run` that replay time-aligned `codes` [B, 1 + n_q, T] (text, Moshi audio, user audio).

    Call s reads the user frame of time s - 1 (so the user codes are shifted right by one) and samples
    text / semantic of time s and acoustic codebook k of time s - d_k, which are forced to the codes'
    values (-2, i.e. "sample", where the time is before 0). Then at call s the text logits are the training
    forward's text logits at time s, and audio codebook k's logits its logits at time s - d_k."""
    codes = np.asarray(codes)
    B, K, T = codes.shape
    if K != cfg.num_streams:
        raise ValueError(f"codes must have 1 + n_q = {cfg.num_streams} streams, got {K}")
    user = np.zeros((B, cfg.n_q - cfg.dep_q, T), np.int32)
    user[:, :, 1:] = codes[:, 1 + cfg.dep_q:, :-1]
    audio = np.full((B, cfg.dep_q, T), -2, np.int32)
    for k in range(cfg.dep_q):
        d = cfg.delays[1 + k]
        audio[:, k, d:] = codes[:, 1 + k, : T - d]
    return {"user_codes": user, "forced_text": codes[:, 0].astype(np.int32), "forced_audio": audio}


class LMGen:
    """Stateful convenience wrapper around the pure `step` (for scripts and the REPL).

        gen = LMGen(params, cfg, SamplingConfig(), batch_size=1, seed=42424242)
        frame = gen.step(user_codes)      # numpy [B, 1 + dep_q] or None on the first call (as the reference)
    """

    def __init__(self, params: Params, cfg: LMConfig, sampling: SamplingConfig = DEFAULT_SAMPLING,
                 batch_size: int = 1, seed: int = 0, pad_bias: float = 0.0):
        self.params = prepare_streaming_params(params, cfg)  # once: per-layer / per-step buffers
        self.cfg, self.sampling = cfg, sampling
        self.state = init_gen_state(cfg, batch_size, pad_bias)
        self.rng = jax.random.PRNGKey(seed)
        self._step = functools.partial(step_donated, cfg=cfg, sampling=sampling)

    def step_output(self, user_codes: np.ndarray | Array) -> StepOutput:
        self.rng, key = jax.random.split(self.rng)
        self.state, out = self._step(self.params, self.state, jnp.asarray(user_codes, jnp.int32), key)
        return out

    def step(self, user_codes: np.ndarray | Array) -> np.ndarray | None:
        """user_codes [B, n_q - dep_q] -> [B, 1 + dep_q] (rows of invalid items are -2), or None when no
        item has a frame yet."""
        out = self.step_output(user_codes)
        valid = np.asarray(out.valid)
        if not valid.any():
            return None
        return np.asarray(out.frame)

    def reset(self, mask: np.ndarray | None = None) -> None:
        B = self.state.offsets.shape[0]
        self.state = reset(self.state, np.ones(B, bool) if mask is None else mask)

    def set_pad_bias(self, pad_bias: float | np.ndarray) -> None:
        self.state = set_pad_bias(self.state, pad_bias)
