"""Real-time full-duplex engine: Mimi encode -> LM streaming step -> Mimi decode, one compiled step per 80 ms.

    engine, params = Engine.load(weights_dir)            # or Engine.load(None, preset="tiny"): random + warning
    state = engine.init_state(batch_size)
    state, out = engine.step(params, state, user_pcm, active)   # user_pcm [B, 1920] f32, active [B] bool
    out.pcm [B, 1920], out.text_token [B], out.valid [B] ...    # engine.text_piece(token) -> str | None
    state = engine.reset(state, mask)                     # restart selected conversations only
    state = engine.set_item_sampling(state, b, pad_bias, text_temp=..)  # EngineConfig(item_sampling=True)

Everything that changes during a conversation (both Mimi streaming states, the LM's KV rings and delay cache,
the RNG key, per-item frame counters, the ASR code history, the TTS word queues) is one `EngineState` pytree
with fixed shapes, so `step` is traced and compiled once per (config, batch size) and never again: pausing,
resetting, a new TTS text, a new PAD bias or running past the attention context are all runtime values.

Batch items are independent conversations. `active[b] = False` pauses item b: its whole state is kept as is
(the step still computes it, then discards it). `reset(state, mask)` restarts the masked items. One RNG key
is split per step for the whole batch; each item's draws come from its own rows of the noise, so an item's
outputs do not depend on what the other items do (the tests check this bit for bit).

Modes (`EngineConfig.mode`), all the same LM step with different feeding, following the training data layout
of `moshi_jax.data.pipeline` (`text_delay_frames = d`: d > 0 text lags the audio it transcribes, d < 0 text
leads the audio it describes):

- "dialogue" (reference `server.py`): the user's frame -> Mimi -> the LM's user streams; the LM's time-aligned
  Moshi frame (text + dep_q codes) -> Mimi decode. First-frame rule of the server: the first frame of a
  conversation is encoded, then the Mimi state is reset (the next frame gets the first-call padding again) and
  the LM ignores it (its first call never reads the user input), so the first output comes at the second frame.
  Moshi's frame of time t (emitted at frame t + 1) is aligned with the user's frame t + 1.
- "asr": the input audio is the model's own voice stream (forced into streams 1..dep_q, the reference's
  teacher forcing; a model without depformer reads it from its input streams, one frame later so that no
  frame is lost), the user streams get the zero token (-1, a mono recording). The text sampled at frame s
  is text time s, which transcribes audio frame s - d; frames s < d are invalid and (`asr_zero_text_prefix`)
  their text is replaced by -1 (zero embedding) in the LM's cache, as the training data has no text there.
- "tts": a text script per item (`load_text`) is fed by the reference's word state machine (`tts.py`) in place
  of the sampled text; the audio the LM samples is decoded; audio frames of time < |d| (audio lags text by
  |d| frames) are replaced by -1 in the LM's cache (reference `on_audio_hook`) and produce no output;
  `FrameOut.done` turns True `final_padding` frames after the audio of the last word.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from moshi_jax.engine import tts as tts_sm
from moshi_jax.lm import generate as gen
from moshi_jax.lm.config import LMConfig
from moshi_jax.mimi.config import MimiConfig
from moshi_jax.mimi.model import MimiCodec, MimiState
from moshi_jax.mimi.model import reset_state as mimi_reset_state
from moshi_jax.mimi.transformer import RingCache
from moshi_jax.nn import quant
from moshi_jax.nn.kv_cache import KVCache
from moshi_jax.nn.sampling import SamplingConfig

log = logging.getLogger(__name__)
Array = jax.Array
Params = Any
MODES = ("dialogue", "asr", "tts")
PRESETS = ("tiny", "bench_111m", "moshi_7b")
SERVER_SEED = 42424242  # reference server.py seed
STALE_OK = -2  # `_batch_axes` code: a leaf that a masked-out item may leave stale (KV ring data)
_RINGS = (KVCache, RingCache)  # KV rings that write a step's slots (position % capacity) before attending


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static engine settings (part of the compiled step; the PAD bias can also change at runtime)."""

    mode: str = "dialogue"
    sampling: SamplingConfig = SamplingConfig()  # reference LMGen defaults: text 0.7 / 25, audio 0.8 / 250
    pad_bias: float = 0.0  # added to PAD's log-prob when sampling text (> 0: more silence / slower speech)
    text_delay_frames: int = 0  # the data pipeline's shift: > 0 ASR (text lags), < 0 TTS (text leads)
    seed: int = SERVER_SEED
    item_sampling: bool = False  # per-item runtime sampling settings + seeds (the server's sessions), see
    #                              `set_item_sampling`; False: `sampling` and one key for the whole batch
    asr_zero_text_prefix: bool = True  # ASR: the first d text frames -> zero token (our data pipeline's layout);
    #                                    False: the model's own text is kept (the reference STT inference)
    tts_max_padding: int = 6  # reference StateMachine defaults
    tts_initial_padding: int = 2
    tts_final_padding: int = 4  # frames generated after the last word's audio (reference TTSModel)
    tts_max_words: int = 256  # per-item capacity of the TTS queue (static shapes)
    tts_max_tokens: int = 1024
    # Serving memory options (nn/quant.py): "int8" KV rings (half the state per session) and weight-only int8
    # transformer kernels (applied by `prepare_params`); None keeps the LM's dtype. Quality cost against bf16:
    # `python -m benchmarks.int8_quality`.
    kv_cache_dtype: str | None = None
    weight_dtype: str | None = None

    def __post_init__(self):
        quant.check_dtype_option("EngineConfig.kv_cache_dtype", self.kv_cache_dtype, quant.KV_CACHE_DTYPES)
        quant.check_dtype_option("EngineConfig.weight_dtype", self.weight_dtype, quant.WEIGHT_DTYPES)
        if self.mode not in MODES:
            raise ValueError(f"EngineConfig.mode must be one of {MODES}, got {self.mode!r}")
        d = self.text_delay_frames
        if self.mode == "dialogue" and d != 0:
            raise ValueError(f"text_delay_frames must be 0 in dialogue mode, got {d}")
        if self.mode == "asr" and d < 0:
            raise ValueError(f"ASR needs text after audio: text_delay_frames >= 0, got {d}")
        if self.mode == "tts" and d > 0:
            raise ValueError(f"TTS needs text before audio: text_delay_frames <= 0, got {d}")
        if not isinstance(self.sampling, SamplingConfig):
            raise TypeError(f"EngineConfig.sampling must be a SamplingConfig, got {type(self.sampling).__name__}")
        for name in ("tts_max_padding", "tts_initial_padding", "tts_final_padding"):
            if getattr(self, name) < 0:
                raise ValueError(f"EngineConfig.{name} must be >= 0")
        if self.tts_max_words < 1 or self.tts_max_tokens < 1:
            raise ValueError("EngineConfig.tts_max_words / tts_max_tokens must be >= 1")


@struct.dataclass
class EngineState:
    """The whole state of B conversations (see the module docstring)."""

    mimi: MimiState  # encoder + decoder streaming state
    lm: gen.GenState  # KV rings, delay cache, offsets, PAD bias
    rng: Array  # PRNG key shared by the batch (split every step)
    frame: Array  # [B] int32 frames processed by each conversation since its reset
    history: Array  # [B, K, H] int32 the last H encoded frames (index 0 = newest), for ASR feeding
    tts: tts_sm.TTSState


@struct.dataclass
class FrameOut:
    """What one step returns for each item. Invalid entries: pcm 0, text_token -1."""

    pcm: Array  # [B, frame_size] float32 Moshi's audio (dialogue / tts), zeros where `audio_valid` is False
    text_token: Array  # [B] int32: dialogue: text aligned with `pcm`; asr: text of audio frame `frame - d`;
    #                    tts: the token fed to the LM this frame (word token / PAD / EPAD)
    valid: Array  # [B] bool: `text_token` is meaningful (False while warming up, paused or d frames into ASR)
    audio_valid: Array  # [B] bool: `pcm` is meaningful
    frame: Array  # [B] int32 index of this frame in its conversation (-1 for paused items)
    done: Array  # [B] bool: TTS finished (the last word's audio plus final padding was emitted)
    codes: Array  # [B, dep_q] int32 the Mimi codes behind `pcm` (-1 where `audio_valid` is False)


# ---------------------------------------------------------------------------------------------- helpers


def _batch_axes(make_state, batch_size: int = 2):
    """Per leaf of the state pytree: the batch axis (found by comparing shapes at two batch sizes), -1 if none,
    STALE_OK for KV ring keys / values (see below)."""
    a = jax.eval_shape(lambda: make_state(batch_size))
    b = jax.eval_shape(lambda: make_state(batch_size + 1))

    def axis(x, y):
        diff = [i for i, (m, n) in enumerate(zip(x.shape, y.shape, strict=True)) if m != n]
        if len(diff) > 1:
            raise AssertionError(f"state leaf {x.shape} has several batch-dependent axes")
        return diff[0] if diff else -1

    axes = jax.tree.map(axis, a, b)
    # KV ring data: a paused / undecoded step wrote only the slots of positions offset.. (its restored offset),
    # and the next real step rewrites exactly those slots before attending, so the stale values are never read.
    # Restoring positions and offsets is enough, and skips a copy of every KV cache per step.
    # (An int8 ring's scales are written at the same slots: the same holds for them.)
    data = ("keys", "values", "key_scales", "value_scales")

    def stale(n):
        return n.replace(**{f: STALE_OK for f in data if getattr(n, f, None) is not None})

    return jax.tree.map(lambda n: stale(n) if isinstance(n, _RINGS) else n, axes,
                        is_leaf=lambda n: isinstance(n, _RINGS))


def _select(mask: Array, new, old, axes):
    """Per item: `new` where mask [B] else `old`, for every leaf with a batch axis (others, and KV data: `new`)."""

    def sel(ax, n, o):
        if ax < 0:
            return n
        shape = [1] * n.ndim
        shape[ax] = mask.shape[0]
        return jnp.where(mask.reshape(shape), n, o)

    return jax.tree.map(sel, axes, new, old)


def random_lm_params(cfg: LMConfig, seed: int) -> Params:
    """Seeded random LM params drawn on the host (instant, no init compile): N(0, 1) embeddings, unit norm
    scales, N(0, 1/fan_in) projections. For smoke tests and benchmarks only: the outputs are meaningless."""
    import flax.linen as nn

    from moshi_jax.lm import model as lm_model

    shapes = nn.unbox(jax.eval_shape(lambda k: lm_model.init_params(cfg, k), jax.random.PRNGKey(0)))
    r = np.random.default_rng(seed)
    dim, ddim = cfg.dim, (cfg.depth.d_model if cfg.depth is not None else cfg.dim)
    dtype = jnp.dtype(cfg.param_dtype)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "alpha" in name or "'scale'" in name:
            x = np.ones(leaf.shape, np.float32)
        elif "emb" in name and "depformer_in" not in name:
            x = r.standard_normal(leaf.shape, np.float32)
        elif "'bias'" in name:
            x = np.zeros(leaf.shape, np.float32)
        else:
            fan = ddim if ("depformer" in name or "linears" in name) and "depformer_in" not in name else dim
            if "linear_out" in name:
                fan = leaf.shape[-2]
            x = r.standard_normal(leaf.shape, np.float32) / np.float32(np.sqrt(fan))
        return jnp.asarray(x, dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def preset_configs(preset: str) -> tuple[MimiConfig, LMConfig]:
    """(Mimi, LM) configs of a preset: "tiny" (a small Mimi whose codebook size the tiny LM uses), "bench_111m"
    (released Mimi + the 111.6M LM), "moshi_7b" (released Mimi + 7B LM)."""
    if preset == "tiny":
        mimi = MimiConfig.tiny()
        return mimi, dataclasses.replace(LMConfig.tiny(), card=mimi.bins)
    if preset == "bench_111m":
        return MimiConfig(), LMConfig.bench_111m()
    if preset == "moshi_7b":
        return MimiConfig(), LMConfig.moshi_7b()
    raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")


def default_tokenizer(text_card: int, vocab_size: int = 512):
    """A small SentencePiece model trained on the built-in sentence corpus (for random models, which come
    without a tokenizer): Moshi's special ids (0 EPAD/unk, 1 bos, 2 eos, 3 PAD), vocabulary <= text_card."""
    import tempfile

    from moshi_jax.data.speech_synth import SENTENCES
    from moshi_jax.data.tokenize import train_sentencepiece
    from moshi_jax.lm.tokenizer import TextTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = train_sentencepiece(list(SENTENCES) * 2, Path(tmp) / "tok.model", min(vocab_size, text_card))
        return TextTokenizer.load(path)


# ---------------------------------------------------------------------------------------------- engine


class Engine:
    """Codec + LM + engine config; pure functions of (params, state). See the module docstring.

    params = {"mimi": Mimi params, "lm": LM params}."""

    def __init__(self, mimi_cfg: MimiConfig, lm_cfg: LMConfig, cfg: EngineConfig | None = None, tokenizer=None):
        self.mimi_cfg, self.lm_cfg = mimi_cfg, lm_cfg
        self.cfg = cfg or EngineConfig()
        self.tokenizer = tokenizer
        self.codec = MimiCodec(mimi_cfg)
        c = self.cfg
        if c.mode == "dialogue" and lm_cfg.dep_q == 0:
            raise ValueError("dialogue mode needs a model that speaks (dep_q > 0); this LM has dep_q == 0")
        if c.mode == "tts" and lm_cfg.dep_q == 0:
            raise ValueError("TTS mode needs a model with a depth transformer (dep_q > 0)")
        if lm_cfg.card > mimi_cfg.bins:
            raise ValueError(f"LM audio card {lm_cfg.card} exceeds the Mimi codebook size {mimi_cfg.bins}")
        if lm_cfg.dep_q > mimi_cfg.n_q:
            raise ValueError(f"LM dep_q {lm_cfg.dep_q} exceeds Mimi's {mimi_cfg.n_q} codebooks")
        self.num_codebooks = self._input_codebooks()
        mimi_cfg.check_num_codebooks(self.num_codebooks)
        self._axes = _batch_axes(self._fresh_state)
        self.step = jax.jit(self._step_impl)
        #: Same as `step` but donates `state` (its buffers are reused: no second copy of the KV caches).
        self.step_donated = jax.jit(self._step_impl, donate_argnums=(1,))
        self._reset = jax.jit(self._reset_impl)
        self._load = jax.jit(self._load_impl)
        self._set_items = jax.jit(self._set_items_impl)

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, weights_dir: str | Path | None = None, *, preset: str = "tiny", cfg: EngineConfig | None = None,
             seed: int = 0, dtype: str | None = None, tokenizer: str | Path | None = None,
             apply_repo_sampling: bool = True, mimi_cfg: MimiConfig | None = None) -> tuple[Engine, Params]:
        """An engine and its params.

        `weights_dir`: a downloaded Kyutai repository (config.json, the LM safetensors, the Mimi safetensors,
        the SentencePiece model; names from config.json or the released defaults). Its `lm_gen_config`
        sampling overrides are applied when `cfg` keeps the default sampling and `apply_repo_sampling`.
        None: a seeded random model of `preset` (logged loudly: outputs are meaningless) with a small tokenizer
        trained on the built-in sentences. `dtype` (e.g. "bfloat16") sets the LM's param and compute dtype.
        `mimi_cfg`: the codec of a repository (default: the released Mimi, which every Kyutai repository uses)."""
        from moshi_jax.lm import checkpoint as lm_ckpt
        from moshi_jax.lm.tokenizer import TextTokenizer
        from moshi_jax.mimi import checkpoint as mimi_ckpt

        cfg = cfg or EngineConfig()
        if weights_dir is None:
            mimi_cfg, lm_cfg = preset_configs(preset)
            if dtype is not None:
                lm_cfg = lm_cfg.with_dtypes(dtype, dtype)
            log.warning("=" * 78)
            log.warning("NO WEIGHTS GIVEN: a RANDOMLY INITIALISED %s model (seed %d). Its speech and text are", preset,
                        seed)
            log.warning("meaningless noise; pass --weights-dir DIR (a downloaded Kyutai Moshi repository).")
            log.warning("=" * 78)
            params = {"mimi": MimiCodec(mimi_cfg).init(jax.random.PRNGKey(seed)),
                      "lm": random_lm_params(lm_cfg, seed)}
            tok = TextTokenizer.load(tokenizer) if tokenizer is not None else default_tokenizer(lm_cfg.text_card)
            return cls(mimi_cfg, lm_cfg, cfg, tok), params
        repo = Path(weights_dir)
        if not repo.is_dir():
            raise FileNotFoundError(f"--weights-dir {repo} is not a directory (expected a downloaded Kyutai "
                                    "repository with config.json, model.safetensors, the Mimi and tokenizer files)")
        info = lm_ckpt.read_repo(repo)
        for what, path in (("LM weights", info.moshi_weights), ("Mimi weights", info.mimi_weights)):
            if not path.is_file():
                raise FileNotFoundError(f"{what} not found: {path}")
        lm_cfg, lm_params = lm_ckpt.load_pretrained(repo, dtype=dtype)
        mimi_cfg = mimi_cfg or MimiConfig()
        log.info("loading Mimi from %s", info.mimi_weights)
        mimi_params = mimi_ckpt.load_reference(str(info.mimi_weights), mimi_cfg)
        tok_path = Path(tokenizer) if tokenizer is not None else info.tokenizer
        tok = TextTokenizer.load(tok_path)
        if apply_repo_sampling and cfg.sampling == SamplingConfig() and info.lm_gen_config:
            known = {f.name for f in dataclasses.fields(SamplingConfig)}
            over = {k: v for k, v in info.lm_gen_config.items() if k in known}
            if over:
                log.info("sampling settings from the repository's lm_gen_config: %s", over)
                cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, **over))
        return cls(mimi_cfg, lm_cfg, cfg, tok), {"mimi": mimi_params, "lm": lm_params}

    def prepare_params(self, params: Params, consume: bool = False) -> Params:
        """Lay the LM params out for streaming once, outside the step (`lm.model.prepare_streaming_params`:
        per-layer / per-depth-step buffers that the compiled step reads in place instead of copying slices of
        the stacked weights every frame). `step` accepts raw or prepared params with identical results; drop
        the raw ones afterwards to save memory. `consume=True` frees the raw transformer stacks while copying
        them (peak: the model once plus one stacked leaf, instead of twice); `params["lm"]` is spent after.
        `EngineConfig.weight_dtype="int8"`: the transformers' kernels are quantized here (per layer, as copied)."""
        return {"mimi": params["mimi"], "lm": gen.prepare_streaming_params(params["lm"], self.lm_cfg, consume,
                                                                            self.cfg.weight_dtype)}

    def _input_codebooks(self) -> int:
        """Mimi codebooks encoded per input frame: the user streams (dialogue), the model's own audio streams
        (asr), or 1 (tts encodes nothing; a minimal encoder state is kept for a uniform state layout)."""
        lm = self.lm_cfg
        if self.cfg.mode == "dialogue":
            return lm.n_q - lm.dep_q
        if self.cfg.mode == "asr":
            return lm.dep_q if lm.dep_q > 0 else lm.n_q
        return self.mimi_cfg.n_q_semantic

    @property
    def frame_size(self) -> int:
        return self.mimi_cfg.frame_size

    @property
    def sample_rate(self) -> int:
        return self.mimi_cfg.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.mimi_cfg.frame_rate

    @property
    def delay(self) -> int:
        """|text_delay_frames|."""
        return abs(self.cfg.text_delay_frames)

    # ------------------------------------------------------------------ state
    def _fresh_state(self, batch_size: int, key: Array | None = None) -> EngineState:
        c, lm = self.cfg, self.lm_cfg
        words, toks = (c.tts_max_words, c.tts_max_tokens) if c.mode == "tts" else (1, 1)
        return EngineState(
            mimi=self.codec.init_state(batch_size, self.num_codebooks),
            lm=gen.init_gen_state(lm, batch_size, c.pad_bias, c.sampling if c.item_sampling else None,
                                  kv_cache_dtype=c.kv_cache_dtype),
            rng=jax.random.PRNGKey(c.seed) if key is None else key,
            frame=jnp.zeros((batch_size,), jnp.int32),
            # at least 2 frames: the STT feeding reads index 1 (an index past the end would be clamped to the
            # newest frame by jax, silently feeding the audio one frame early)
            history=jnp.zeros((batch_size, self.num_codebooks, max(lm.max_delay + 1, 2)), jnp.int32),
            tts=tts_sm.init_tts_state(batch_size, words, toks, c.tts_initial_padding),
        )

    def init_state(self, batch_size: int, seed: int | None = None) -> EngineState:
        """Fresh state for `batch_size` conversations (RNG seeded by `seed`, default `cfg.seed`)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        state = self._fresh_state(batch_size, jax.random.PRNGKey(self.cfg.seed if seed is None else seed))
        # distinct buffers for every leaf (init helpers may share one zeros array): `step_donated` needs it
        return jax.tree.map(lambda x: jnp.array(x, copy=True), state)

    def _reset_impl(self, state: EngineState, mask: Array) -> EngineState:
        fresh = self._fresh_state(state.frame.shape[0], state.rng)
        fresh = fresh.replace(mimi=mimi_reset_state(state.mimi, mask), lm=gen.reset(state.lm, mask))
        return _select(mask, fresh, state, self._axes)

    def reset(self, state: EngineState, mask) -> EngineState:
        """Restart the conversations where `mask` [B] bool is True (fresh codec / LM / counters / TTS text;
        the PAD bias is kept); the others are untouched. Jitted, no recompilation."""
        mask = jnp.asarray(mask, bool)
        if mask.shape != state.frame.shape:
            raise ValueError(f"reset mask must have shape {tuple(state.frame.shape)}, got {tuple(mask.shape)}")
        return self._reset(state, mask)

    def set_pad_bias(self, state: EngineState, pad_bias) -> EngineState:
        """PAD log-prob bias, scalar or per item [B] (runtime value: no recompilation)."""
        return state.replace(lm=gen.set_pad_bias(state.lm, pad_bias))

    def _set_items_impl(self, state: EngineState, index: Array, pad_bias: Array, values: dict) -> EngineState:
        mask = jnp.arange(state.frame.shape[0]) == index
        lm_state = gen.set_item_sampling(state.lm, mask, **values)
        return state.replace(lm=lm_state.replace(pad_bias=jnp.where(mask, pad_bias, lm_state.pad_bias)))

    def set_item_sampling(self, state: EngineState, index: int, pad_bias: float, **values) -> EngineState:
        """Sampling settings of conversation `index` (an engine with `EngineConfig(item_sampling=True)`):
        `pad_bias` and `values` naming `nn.sampling.ItemSampling` fields (text_temp, text_top_k, audio_temp,
        audio_top_k, repetition_penalty, repetition_context, text_seed_key, audio_seed_key). Runtime values
        (no recompilation); the seeds take effect at the item's next `reset`."""
        if state.lm.items is None:
            raise ValueError("per-item sampling needs an engine built with EngineConfig(item_sampling=True)")
        B = state.frame.shape[0]
        if not 0 <= index < B:
            raise ValueError(f"item index {index} outside the batch [0, {B})")
        values = {k: jnp.asarray(v, getattr(state.lm.items, k).dtype) for k, v in values.items()}
        return self._set_items(state, jnp.int32(index), jnp.float32(pad_bias), values)

    # ------------------------------------------------------------------ TTS text
    def entries(self, text: str | Sequence[str], padding_between: int = 0) -> list[tts_sm.Entry]:
        """Text (or a list of turns) -> TTS entries with the reference's rules (see `tts.script_to_entries`)."""
        if self.tokenizer is None:
            raise ValueError("this engine has no text tokenizer")
        return tts_sm.script_to_entries(self.tokenizer.encode, text, self.frame_rate, False, padding_between)

    def _load_impl(self, state: EngineState, index: Array, row: dict) -> EngineState:
        mask = jnp.arange(state.frame.shape[0]) == index
        state = self._reset_impl(state, mask)
        t = state.tts
        t = t.replace(**{k: getattr(t, k).at[index].set(v) for k, v in row.items()})
        return state.replace(tts=t)

    def load_text(self, state: EngineState, index: int, text: str | Sequence[str] | Sequence[tts_sm.Entry],
                  padding_between: int = 0) -> EngineState:
        """TTS: restart conversation `index` with a new text to speak (a string, a list of turns, or entries).
        Jitted with fixed shapes, so loading new texts never recompiles."""
        if self.cfg.mode != "tts":
            raise ValueError(f"load_text is for mode 'tts', this engine is in mode {self.cfg.mode!r}")
        B = state.frame.shape[0]
        if not 0 <= index < B:
            raise ValueError(f"item index {index} outside the batch [0, {B})")
        if isinstance(text, str) or (len(text) and isinstance(text[0], str)):
            entries = self.entries(text, padding_between)
        else:
            entries = list(text)
        bad = [t for e in entries for t in e.tokens if not 0 <= t < self.lm_cfg.text_card]
        if bad:
            raise ValueError(f"text tokens {bad[:5]} outside the LM's text vocabulary [0, {self.lm_cfg.text_card})")
        row = tts_sm.pack_entries(entries, self.cfg.tts_max_words, self.cfg.tts_max_tokens)
        return self._load(state, jnp.int32(index), {k: jnp.asarray(v) for k, v in row.items()})

    # ------------------------------------------------------------------ the step
    def _step_impl(self, params: Params, state: EngineState, user_pcm: Array, active: Array
                   ) -> tuple[EngineState, FrameOut]:
        c, lm = self.cfg, self.lm_cfg
        B = state.frame.shape[0]
        s = state.frame  # [B] this frame's index in each conversation
        d = self.delay
        rng, key = jax.random.split(state.rng)
        mimi = state.mimi
        history = state.history

        # 1. encode the input frame (not in TTS)
        if c.mode != "tts":
            mimi, codes = self.codec.encode_step(params["mimi"], mimi, user_pcm[:, None, :].astype(jnp.float32))
            codes = codes[:, :, 0]  # [B, K]
            history = jnp.concatenate([codes[:, :, None], history[:, :, :-1]], axis=2)
        if c.mode == "dialogue":
            # server.py: the first frame is encoded, then Mimi is reset (the LM never reads it anyway)
            mimi = mimi_reset_state(mimi, s == 0)

        # 2. LM step with the mode's feeding
        n_user = lm.n_q - lm.dep_q
        zero_user = jnp.full((B, n_user), lm.zero_token_id, jnp.int32)
        forced_audio, hook, hook_out = None, None, {}
        if c.mode == "dialogue":
            user = codes[:, :n_user]
        elif c.mode == "asr" and lm.dep_q > 0:
            user = zero_user
            # codebook k at call s is its time s - delay_k: the frame delay_k steps back (-2 = sample, unused)
            cols = jnp.asarray(lm.delays[1:1 + lm.dep_q], jnp.int32)
            past = history[:, :lm.dep_q, :][:, jnp.arange(lm.dep_q), cols]  # [B, dep_q]
            forced_audio = jnp.where(s[:, None] >= cols[None], past, lm.ungenerated_token_id)
        elif c.mode == "asr":
            user = history[:, :n_user, 1]  # the previous frame = the LM's time s - 1: no frame is lost
        else:  # tts
            user = zero_user

            def hook(sampled):
                new_tts, fed = tts_sm.process(state.tts, s, sampled, c.tts_max_padding)
                hook_out["tts"] = new_tts
                return fed

        lm_params = params["lm"]
        if c.weight_dtype is not None and not isinstance(lm_params, gen.StreamingParams):
            lm_params = gen.prepare_streaming_params(lm_params, lm, weight_dtype=c.weight_dtype)  # same maths
        lm_state, out = gen._step(lm_params, state.lm, user, key, cfg=lm, sampling=c.sampling,
                                  forced_audio=forced_audio, text_hook=hook)
        tts = hook_out.get("tts", state.tts)

        # 3. zero-token prefixes of the lagging stream group (written in the column this call filled)
        CT = lm.max_delay + 2
        col = lm_state.offsets % CT
        rows = jnp.arange(B)
        cache = lm_state.cache
        if c.mode == "asr" and d > 0 and c.asr_zero_text_prefix:
            cur = cache[rows, 0, col]
            cache = cache.at[rows, 0, col].set(jnp.where(s < d, lm.zero_token_id, cur))
        if c.mode == "tts" and d > 0:
            streams = jnp.arange(1, 1 + lm.dep_q)
            cur = cache[rows[:, None], streams[None], col[:, None]]
            dk = jnp.asarray(lm.delays[1:1 + lm.dep_q], jnp.int32)
            cache = cache.at[rows[:, None], streams[None], col[:, None]].set(
                jnp.where(s[:, None] < dk[None] + d, lm.zero_token_id, cur))
        lm_state = lm_state.replace(cache=cache)

        # 4. outputs and decode
        pcm = jnp.zeros((B, self.frame_size), jnp.float32)
        done = jnp.zeros((B,), bool)
        if c.mode == "dialogue":
            text, valid = out.text, out.valid
            audio_valid = valid
        elif c.mode == "asr":
            text, valid = out.sampled_text, s >= d
            audio_valid = jnp.zeros((B,), bool)
        else:
            text, valid = out.sampled_text, jnp.ones((B,), bool)
            audio_valid = out.valid & (s - lm.max_delay >= d)
            done = (tts.end_step >= 0) & (s - lm.max_delay >= tts.end_step + d + c.tts_final_padding)
        if c.mode != "asr":
            codes_out = jnp.where(audio_valid[:, None], out.audio, 0)[:, :, None]
            decoded, frame_pcm = self.codec.decode_step(params["mimi"], mimi, codes_out)
            mimi = _select(audio_valid, decoded, mimi, self._axes.mimi)
            pcm = jnp.where(audio_valid[:, None], frame_pcm[:, 0].astype(jnp.float32), 0.0)

        new = EngineState(mimi=mimi, lm=lm_state, rng=rng, frame=s + 1, history=history, tts=tts)
        new = _select(active, new, state, self._axes)  # paused items keep their state (the key always advances)
        valid, audio_valid = valid & active, audio_valid & active
        return new, FrameOut(
            pcm=jnp.where(audio_valid[:, None], pcm, 0.0), text_token=jnp.where(valid, text, -1), valid=valid,
            audio_valid=audio_valid, frame=jnp.where(active, s, -1), done=done & active,
            codes=jnp.where(audio_valid[:, None], out.audio, -1))

    def check_inputs(self, state: EngineState, user_pcm, active) -> tuple[Array, Array]:
        """Host-side shape checks with clear errors (the jitted step would fail with a shape trace)."""
        B = state.frame.shape[0]
        user_pcm = jnp.asarray(user_pcm, jnp.float32)
        if user_pcm.shape != (B, self.frame_size):
            raise ValueError(f"user_pcm must be [B={B}, {self.frame_size}] float32 (one 80 ms frame per "
                             f"conversation), got {tuple(user_pcm.shape)}")
        active = jnp.asarray(active, bool)
        if active.shape != (B,):
            raise ValueError(f"active must be [B={B}] bool, got {tuple(active.shape)}")
        return user_pcm, active

    # ------------------------------------------------------------------ text
    def text_piece(self, token: int) -> str | None:
        """The text shown for one token, like the reference server: None for PAD / EPAD / invalid (-1)."""
        token = int(token)
        if token < 0 or token in (self.lm_cfg.existing_text_padding_id, self.lm_cfg.existing_text_end_padding_id):
            return None
        if self.tokenizer is None or token >= self.tokenizer.vocab_size:
            return f"<{token}>"
        return self.tokenizer.decode_piece(token)
