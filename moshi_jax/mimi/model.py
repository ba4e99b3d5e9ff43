"""Mimi codec: one-shot and streaming encode / decode as pure functions over params and state.

    codec = MimiCodec(MimiConfig())
    params = codec.init(key)                                 # or mimi.checkpoint.load_reference(...)
    codes = codec.encode(params, wav)                        # wav [B, 1, T] -> codes [B, K, ceil(T / 1920)]
    wav = codec.decode(params, codes)                        # -> [B, 1, 1920 * F]
    state = codec.init_state(batch_size)                     # explicit fixed-shape streaming state
    state, codes = codec.encode_step(params, state, frame)   # frame [B, 1, 1920] -> codes [B, K, 1]
    state, frame = codec.decode_step(params, state, codes)   # codes [B, K, 1] -> [B, 1, 1920]

Order of operations (reference `MimiModel`): SEANet encoder (25 Hz) -> encoder transformer -> learnt
stride-2 conv downsample (12.5 Hz, replicate left padding on the first call) -> split RVQ; decoding
runs the RVQ decode -> depthwise transposed-conv upsample (25 Hz) -> decoder transformer -> SEANet
decoder. Public tensors use the reference's layouts (wav `[B, 1, T]`, codes `[B, K, F]`, latent
`[B, D, F]`); inside, everything is channels-last.

Streaming state is one pytree (`MimiState`) with every conv buffer, both transformers' KV rings and
positions, the downsample's first-call flag, and the number of codebooks K (static metadata, so each K
compiles once). The streaming entry points consume the state they are given (its buffers are donated
and updated in place): always continue from the returned state. Each streamed 80 ms frame feeds the
transformers 2 steps at once, as the reference does; past the attention window this differs from
one-shot by the reference's ring quirk (both keys are written before attending), reproduced on purpose.
`encode_chunk` / `decode_chunk` are `lax.scan`s of the single-frame steps, so chunking never changes
the output.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from moshi_jax.mimi.config import MimiConfig
from moshi_jax.mimi.quantizer import SplitRVQ
from moshi_jax.mimi.seanet import SEANetDecoder, SEANetEncoder, init_decoder_state, init_encoder_state
from moshi_jax.mimi.transformer import MimiTransformer, StackState, init_stack_state
from moshi_jax.nn.conv import (
    ConvState,
    ConvTransposeState,
    StreamingConv1d,
    StreamingConvTranspose1d,
    init_conv_state,
    init_conv_transpose_state,
)

Array = jax.Array
Params = Any


@struct.dataclass
class MimiState:
    """Whole streaming state of the codec for a batch of B independent streams."""

    encoder: dict  # SEANet encoder conv buffers
    encoder_transformer: StackState  # per-layer KV rings (context slots) + offsets [B]
    downsample: ConvState  # 25 -> 12.5 Hz conv buffer + first-call flag (replicate padding)
    upsample: ConvTransposeState  # 12.5 -> 25 Hz overlap-add tail
    decoder_transformer: StackState
    decoder: dict  # SEANet decoder conv buffers and overlap-add tails
    num_codebooks: int = struct.field(pytree_node=False, default=8)  # K produced by encode_step

    @property
    def batch_size(self) -> int:
        return int(self.encoder_transformer.offset.shape[0])


class MimiModule(nn.Module):
    """The Linen module behind `MimiCodec` (channels-last; call its methods through `apply`)."""

    cfg: MimiConfig

    def setup(self):
        cfg = self.cfg
        D, S = cfg.dimension, cfg.resample_stride
        self.encoder = SEANetEncoder(cfg)
        self.encoder_transformer = MimiTransformer(cfg.transformer)
        self.downsample = StreamingConv1d(D, D, 2 * S, stride=S, use_bias=False, pad_mode="replicate")
        self.quantizer = SplitRVQ(cfg)
        # Depthwise: the reference's `upsample_channel_wise_bug=True`.
        self.upsample = StreamingConvTranspose1d(D, D, 2 * S, S, groups=D, use_bias=False)
        self.decoder_transformer = MimiTransformer(cfg.transformer)
        self.decoder = SEANetDecoder(cfg)

    def encode_latent(self, wav: Array, state: MimiState | None) -> tuple[Array, dict | None]:
        """wav `[B, T, 1]` (T a multiple of frame_size) -> unquantized latent `[B, T / frame_size, D]`."""
        s = state
        x, enc = self.encoder(wav, None if s is None else s.encoder)
        x, tenc = self.encoder_transformer(x, None if s is None else s.encoder_transformer)
        x, down = self.downsample(x, None if s is None else s.downsample)
        return x, (None if s is None else dict(encoder=enc, encoder_transformer=tenc, downsample=down))

    def quantize(self, latent: Array, k: int) -> Array:
        return self.quantizer.encode(latent, k)

    def dequantize(self, codes: Array) -> Array:
        return self.quantizer.decode(codes)

    def decode_latent(self, latent: Array, state: MimiState | None) -> tuple[Array, dict | None]:
        """Quantized latent `[B, F, D]` -> wav `[B, F * frame_size, 1]`."""
        s = state
        x, up = self.upsample(latent, None if s is None else s.upsample)
        x, tdec = self.decoder_transformer(x, None if s is None else s.decoder_transformer)
        x, dec = self.decoder(x, None if s is None else s.decoder)
        return x, (None if s is None else dict(upsample=up, decoder_transformer=tdec, decoder=dec))

    def __call__(self, wav: Array) -> Array:
        """One-shot round trip through all levels (used to create the parameters)."""
        latent, _ = self.encode_latent(wav, None)
        out, _ = self.decode_latent(self.dequantize(self.quantize(latent, self.cfg.n_q)), None)
        return out


def init_state(cfg: MimiConfig, batch_size: int, num_codebooks: int | None = None) -> MimiState:
    """Fresh streaming state (zero buffers, empty KV rings, first-call flag set); needs no params."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    k = cfg.check_num_codebooks(num_codebooks)
    D, S = cfg.dimension, cfg.resample_stride
    return MimiState(
        encoder=init_encoder_state(cfg, batch_size),
        encoder_transformer=init_stack_state(cfg.transformer, batch_size),
        downsample=init_conv_state(batch_size, D, 2 * S, S),
        upsample=init_conv_transpose_state(batch_size, D, 2 * S, S),
        decoder_transformer=init_stack_state(cfg.transformer, batch_size),
        decoder=init_decoder_state(cfg, batch_size),
        num_codebooks=k,
    )


def reset_state(state: MimiState, mask: Array) -> MimiState:
    """Reset the streams where `mask` `[B]` is True to the fresh state; the others are untouched."""
    mask = jnp.asarray(mask, jnp.bool_)

    def where(m: Array, fresh, old: Array) -> Array:
        return jnp.where(m.reshape(m.shape + (1,) * (old.ndim - m.ndim)), jnp.asarray(fresh, old.dtype), old)

    def reset(node):
        if isinstance(node, ConvState):
            return ConvState(previous=where(mask, 0, node.previous), first=where(mask, True, node.first))
        if isinstance(node, ConvTransposeState):
            return ConvTransposeState(partial=where(mask, 0, node.partial))
        if isinstance(node, StackState):
            # Empty slots are the ones with position -1; stale keys/values are then never attended to.
            layers = tuple(c.replace(positions=where(mask, -1, c.positions)) for c in node.layers)
            return StackState(offset=where(mask, 0, node.offset), layers=layers)
        return node

    leaf = (ConvState, ConvTransposeState, StackState)
    return jax.tree.map(reset, state, is_leaf=lambda n: isinstance(n, leaf))


def host_init(cfg: MimiConfig, key: Array) -> Params:
    """Random Mimi params drawn with numpy, leaf by leaf, from the same distributions as the modules'
    initializers: PyTorch's default uniform(+-1/sqrt(fan_in)) for convs (bias with its kernel's bound) and
    quantizer projections, truncated normal (+-3 std, std 1/sqrt(fan_in)) for transformer weights, ones /
    zeros for LayerNorm, `layer_scale` for LayerScale, N(0, 1) codebooks. Deterministic in `key`.
    A parameter without a rule is an error, so new modules cannot be silently mis-initialised."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    rng = np.random.default_rng(np.asarray(key).astype(np.uint64).ravel().tolist())
    flat = traverse_util.flatten_dict(_abstract_params(cfg))

    def conv_bound(path: tuple[str, ...]) -> float:
        kernel = flat[path[:-1] + ("kernel",)]
        shape, axes = kernel.value.shape, kernel.names
        fan_in = shape[0] * shape[1] if axes[0] == "conv_kernel" else shape[1] * shape[2]  # conv / convtr
        return 1.0 / np.sqrt(fan_in)

    def truncnorm(shape: tuple[int, ...], std: float) -> np.ndarray:
        x = rng.standard_normal(shape)
        bad = np.abs(x) > 3.0
        while bad.any():
            x[bad] = rng.standard_normal(int(bad.sum()))
            bad = np.abs(x) > 3.0
        return x * std

    out = {}
    for path in sorted(flat):
        shape, name, parent = flat[path].value.shape, path[-1], path[-2]
        if name in ("kernel", "bias") and (path[:-1] + ("kernel",)) in flat:
            b = conv_bound(path)
            value = rng.uniform(-b, b, shape)
        elif name == "in_proj":  # [d, 3, H, Dh]
            value = truncnorm(shape, 1.0 / np.sqrt(shape[0]))
        elif name == "out_proj" and parent == "self_attn":  # [H, Dh, d]
            value = truncnorm(shape, 1.0 / np.sqrt(shape[0] * shape[1]))
        elif name in ("linear1", "linear2"):  # [in, out]
            value = truncnorm(shape, 1.0 / np.sqrt(shape[0]))
        elif parent.startswith("norm") and name in ("scale", "bias"):
            value = np.full(shape, 1.0 if name == "scale" else 0.0)
        elif name.startswith("layer_scale_"):
            value = np.full(shape, cfg.layer_scale)
        elif name in ("input_proj", "output_proj"):
            value = rng.uniform(-1.0 / np.sqrt(shape[0]), 1.0 / np.sqrt(shape[0]), shape)
        elif name.startswith("codebook_"):
            value = rng.standard_normal(shape)
        else:
            raise ValueError(f"host_init: no initialisation rule for parameter {'/'.join(path)}")
        out[path] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(out)


class _Kernels:
    """The jitted entry points for one config. Cached per config (`_kernels`), so every `MimiCodec(cfg)`
    with an equal config shares one compilation cache."""

    def __init__(self, cfg: MimiConfig):
        self.cfg = cfg
        self.module = MimiModule(cfg)
        # K (and shapes) are the only compile keys.
        self.encode = jax.jit(self._encode_impl, static_argnames=("k", "quantize"))
        self.decode = jax.jit(self._decode_impl)
        self.decode_latent = jax.jit(self._dequantize_impl)
        # Streaming entry points consume (donate) the state they are given: the rings and buffers are then
        # updated in place instead of being copied every frame.
        self.encode_step = jax.jit(self._encode_frame, donate_argnums=1)
        self.decode_step = jax.jit(self._decode_frame, donate_argnums=1)
        self.encode_chunk = jax.jit(self._encode_chunk_impl, donate_argnums=1)
        self.decode_chunk = jax.jit(self._decode_chunk_impl, donate_argnums=1)
        self.reset = jax.jit(reset_state, donate_argnums=0)

    # ------------------------------------------------------------------ implementations (traced)
    def _apply(self, params: Params, *args, method):
        return self.module.apply({"params": params}, *args, method=method)

    def _encode_impl(self, params: Params, wav: Array, k: int, quantize: bool) -> Array:
        x = _pad_to_frames(wav, self.cfg.frame_size).transpose(0, 2, 1)  # [B, T, 1]
        latent, _ = self._apply(params, x, None, method=MimiModule.encode_latent)
        if not quantize:
            return latent.transpose(0, 2, 1)
        return self._apply(params, latent, k, method=MimiModule.quantize).transpose(0, 2, 1)

    def _dequantize_impl(self, params: Params, codes: Array) -> Array:
        return self._apply(params, codes.transpose(0, 2, 1), method=MimiModule.dequantize).transpose(0, 2, 1)

    def _decode_impl(self, params: Params, codes: Array) -> Array:
        latent = self._apply(params, codes.transpose(0, 2, 1), method=MimiModule.dequantize)
        wav, _ = self._apply(params, latent, None, method=MimiModule.decode_latent)
        return wav.transpose(0, 2, 1)

    def _encode_frame(self, params: Params, state: MimiState, frame: Array) -> tuple[MimiState, Array]:
        """frame `[B, 1, frame_size]` -> (state, codes `[B, K, 1]`)."""
        latent, new = self._apply(params, frame.transpose(0, 2, 1), state, method=MimiModule.encode_latent)
        codes = self._apply(params, latent, state.num_codebooks, method=MimiModule.quantize)
        return state.replace(**new), codes.transpose(0, 2, 1)

    def _decode_frame(self, params: Params, state: MimiState, codes: Array) -> tuple[MimiState, Array]:
        """codes `[B, K, 1]` -> (state, audio `[B, 1, frame_size]`)."""
        latent = self._apply(params, codes.transpose(0, 2, 1), method=MimiModule.dequantize)
        wav, new = self._apply(params, latent, state, method=MimiModule.decode_latent)
        return state.replace(**new), wav.transpose(0, 2, 1)

    def _encode_chunk_impl(self, params: Params, state: MimiState, wav: Array) -> tuple[MimiState, Array]:
        B, _, T = wav.shape
        frames = wav.reshape(B, 1, T // self.cfg.frame_size, self.cfg.frame_size).transpose(2, 0, 1, 3)
        state, codes = jax.lax.scan(functools.partial(self._encode_frame, params), state, frames)
        return state, codes[..., 0].transpose(1, 2, 0)  # [n, B, K] -> [B, K, n]

    def _decode_chunk_impl(self, params: Params, state: MimiState, codes: Array) -> tuple[MimiState, Array]:
        B = codes.shape[0]
        steps = codes.transpose(2, 0, 1)[..., None]  # [n, B, K, 1]
        state, wav = jax.lax.scan(functools.partial(self._decode_frame, params), state, steps)
        return state, wav[:, :, 0].transpose(1, 0, 2).reshape(B, 1, -1)  # [n, B, fs] -> [B, 1, n * fs]


class MimiCodec:
    """Mimi as pure, jitted functions of `(params, [state,] inputs)`. See the module docstring."""

    def __init__(self, cfg: MimiConfig | None = None):
        self.cfg = cfg or MimiConfig()
        self._k = _kernels(self.cfg)
        self.module = self._k.module

    # ------------------------------------------------------------------ params
    def init_boxed(self, key: Array) -> Params:
        """Parameters with their logical axis names (`nn.LogicallyPartitioned` leaves), from the modules'
        own initializers. Traceable (e.g. under `jax.jit(..., out_shardings=...)` for a sharded init), but
        slow to compile on CPU (one threefry per parameter)."""
        wav = jnp.zeros((1, self.cfg.frame_size, 1), jnp.float32)
        return self.module.init(key, wav)["params"]

    def init(self, key: Array) -> Params:
        """Random parameters (plain arrays) drawn on the host with the modules' initializer distributions
        (see `host_init`): instant, where the traced init compiles for about a minute on two CPU cores.
        Under a trace (`jax.eval_shape`, `jax.jit`) it is the modules' own (traceable) init."""
        if isinstance(key, jax.core.Tracer):
            return nn.unbox(self.init_boxed(key))
        return host_init(self.cfg, key)

    def param_axes(self) -> Params:
        """Abstract params (`nn.LogicallyPartitioned` of ShapeDtypeStruct): shapes and logical axis names."""
        return _abstract_params(self.cfg)

    # ------------------------------------------------------------------ one-shot
    def encode(self, params: Params, wav, num_codebooks: int | None = None) -> Array:
        """wav `[B, 1, T]` float -> codes `[B, K, ceil(T / frame_size)]` int32 (zero right-padding)."""
        k = self.cfg.check_num_codebooks(num_codebooks)
        return self._k.encode(params, self._check_wav(wav, any_length=True), k=k, quantize=True)

    def encode_to_latent(self, params: Params, wav) -> Array:
        """wav `[B, 1, T]` -> unquantized latent `[B, dimension, ceil(T / frame_size)]` (12.5 Hz)."""
        return self._k.encode(params, self._check_wav(wav, any_length=True), k=self.cfg.num_codebooks,
                                quantize=False)

    def decode(self, params: Params, codes) -> Array:
        """codes `[B, K, F]` (1 <= K <= n_q) -> wav `[B, 1, F * frame_size]` float32."""
        return self._k.decode(params, self._check_codes(codes))

    def decode_latent(self, params: Params, codes) -> Array:
        """codes `[B, K, F]` -> quantized latent `[B, dimension, F]` (RVQ decode only)."""
        return self._k.decode_latent(params, self._check_codes(codes))

    # ------------------------------------------------------------------ streaming
    def init_state(self, batch_size: int, num_codebooks: int | None = None) -> MimiState:
        return init_state(self.cfg, batch_size, num_codebooks)

    def reset(self, state: MimiState, mask) -> MimiState:
        """Reset the streams where `mask` `[B]` is True (e.g. a new call on a server slot); consumes `state`."""
        mask = jnp.asarray(mask, jnp.bool_)
        if mask.shape != (state.batch_size,):
            raise ValueError(f"reset mask must have shape ({state.batch_size},), got {mask.shape}")
        return self._k.reset(state, mask)

    def encode_step(self, params: Params, state: MimiState, frame) -> tuple[MimiState, Array]:
        """One 80 ms frame `[B, 1, frame_size]` -> (state, codes `[B, K, 1]`), K = state.num_codebooks.
        The given state is consumed (donated); continue from the returned one."""
        frame = self._check_wav(frame, batch=state.batch_size, frames=1)
        return self._k.encode_step(params, state, frame)

    def decode_step(self, params: Params, state: MimiState, codes) -> tuple[MimiState, Array]:
        """codes `[B, K, 1]` -> (state, audio `[B, 1, frame_size]`); the given state is consumed. Codes are
        not range-checked here (no host sync in a real-time loop): out-of-range values are clamped."""
        codes = self._check_codes(codes, batch=state.batch_size, frames=1, check_range=False)
        return self._k.decode_step(params, state, codes)

    def encode_chunk(self, params: Params, state: MimiState, wav) -> tuple[MimiState, Array]:
        """wav `[B, 1, n * frame_size]` -> (state, codes `[B, K, n]`): `lax.scan` of `encode_step`."""
        wav = self._check_wav(wav, batch=state.batch_size)
        return self._k.encode_chunk(params, state, wav)

    def decode_chunk(self, params: Params, state: MimiState, codes) -> tuple[MimiState, Array]:
        """codes `[B, K, n]` -> (state, wav `[B, 1, n * frame_size]`): `lax.scan` of `decode_step`."""
        codes = self._check_codes(codes, batch=state.batch_size, check_range=False)
        return self._k.decode_chunk(params, state, codes)

    def encode_stream(self, params: Params, wav, num_codebooks: int | None = None) -> Array:
        """Streaming encode of a whole signal from a fresh state (zero right-padding to whole frames):
        wav `[B, 1, T]` -> codes `[B, K, ceil(T / frame_size)]`, equal to feeding `encode_step` frame
        by frame."""
        wav = self._check_wav(wav, any_length=True)
        wav = _pad_to_frames(wav, self.cfg.frame_size)
        state = self.init_state(wav.shape[0], num_codebooks)
        return self._k.encode_chunk(params, state, wav)[1]

    def decode_stream(self, params: Params, codes) -> Array:
        """Streaming decode of codes `[B, K, F]` from a fresh state -> wav `[B, 1, F * frame_size]`."""
        codes = self._check_codes(codes)
        state = self.init_state(codes.shape[0], codes.shape[1])
        return self._k.decode_chunk(params, state, codes)[1]

    # ------------------------------------------------------------------ input checks (host side)
    def _check_wav(self, wav, batch: int | None = None, frames: int | None = None, any_length: bool = False):
        if not isinstance(wav, jax.Array):
            wav = np.asarray(wav)
            if not np.issubdtype(wav.dtype, np.floating):
                raise ValueError(f"audio must be floating point, got dtype {wav.dtype}")
        if wav.ndim != 3 or wav.shape[1] != self.cfg.channels:
            raise ValueError(f"audio must have shape [B, {self.cfg.channels}, T], got {tuple(wav.shape)}")
        B, _, T = wav.shape
        fs = self.cfg.frame_size
        if batch is not None and B != batch:
            raise ValueError(f"audio batch {B} does not match the streaming state's batch {batch}")
        if T == 0:
            raise ValueError("audio is empty (0 samples)")
        if not any_length and T % fs:
            raise ValueError(f"streaming audio length {T} is not a positive multiple of the frame size {fs}; "
                             "buffer whole frames before feeding Mimi")
        if frames is not None and T != frames * fs:
            raise ValueError(f"expected {frames} frame(s) of {fs} samples, got {T} samples")
        return _as_dtype(wav, np.float32)

    def _check_codes(self, codes, batch: int | None = None, frames: int | None = None, check_range: bool = True):
        concrete = not isinstance(codes, jax.core.Tracer)
        if not isinstance(codes, jax.Array):
            codes = np.asarray(codes)
        if not jnp.issubdtype(codes.dtype, jnp.integer):
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.ndim != 3:
            raise ValueError(f"codes must have shape [B, K, F], got {tuple(codes.shape)}")
        B, K, F = codes.shape
        self.cfg.check_num_codebooks(K)
        if F == 0:
            raise ValueError("codes have no frames")
        if batch is not None and B != batch:
            raise ValueError(f"codes batch {B} does not match the streaming state's batch {batch}")
        if frames is not None and F != frames:
            raise ValueError(f"expected {frames} code frame(s), got {F}")
        if check_range and concrete:
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= self.cfg.bins:
                raise ValueError(f"code values must be in [0, {self.cfg.bins - 1}], found range [{lo}, {hi}]")
        return _as_dtype(codes, np.int32)


def _as_dtype(x, dtype):
    """x in `dtype` without a needless device op: a per-frame streaming call is dispatch-bound enough that
    `jnp.asarray` (~0.5 ms) shows; numpy input stays numpy (jit transfers it in its C++ fast path)."""
    if x.dtype == dtype:
        return x
    return x.astype(dtype) if isinstance(x, jax.Array | jax.core.Tracer) else np.asarray(x, dtype)



@functools.lru_cache(maxsize=16)
def _kernels(cfg: MimiConfig) -> _Kernels:
    return _Kernels(cfg)


@functools.lru_cache(maxsize=16)
def _abstract_params(cfg: MimiConfig) -> Params:
    wav = jax.ShapeDtypeStruct((1, cfg.frame_size, 1), jnp.float32)
    return jax.eval_shape(MimiModule(cfg).init, jax.random.PRNGKey(0), wav)["params"]


def _pad_to_frames(wav, frame_size: int):
    """Zero right-pad the last axis to a whole number of frames (the reference's one-shot rule)."""
    T = wav.shape[-1]
    pad = -T % frame_size
    if not pad:
        return wav
    return jnp.pad(wav, [(0, 0)] * (wav.ndim - 1) + [(0, pad)])
