"""Token sampling: temperature, top-k, greedy, optional additive log-prob bias (reference `utils/sampling.py`).

`sample_token(rng, logits [..., V], temp, top_k, use_sampling, bias) -> int32 [...]`.

Semantics follow the reference `sample_token`: with `use_sampling` and `temp > 0` the distribution is
`softmax(logits / temp)` computed in float32, restricted to its `top_k` most likely tokens (`top_k <= 0`
or `>= V`: no restriction); otherwise the token is the argmax of the logits. The reference draws with an
"exponential race" (argmax of p / Exp(1)); we draw with the Gumbel-max trick on the same tempered
log-probabilities, which samples the same categorical distribution (torch's RNG stream cannot be
reproduced anyway, so only distributions are comparable).

`bias` (broadcastable to `logits`) is added to the *tempered* log-probabilities, i.e. it multiplies the
unnormalised probability of each token by `exp(bias)` (the Rust server's `pad_mult` for the PAD token).
In greedy mode it is added to the raw logits. It is applied before the top-k cut, so a boosted token can
enter the top k.

Per-item settings (one conversation per batch row, e.g. the server's per-session settings):
`ItemSampling` holds temperatures, top-k, repetition penalty, seeds and RNG keys as RUNTIME arrays `[B]`,
so changing them never recompiles. `sample_token_items(keys [B, 2], logits [B, V], temp [B], top_k [B],
bias)` draws each row with its own key and settings (same distribution as `sample_token` for equal
settings, a different random stream); `apply_repetition_penalty` is the Rust server's text penalty.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array
MAX_REPETITION_CONTEXT = 256  # static size of the per-item recent-text window (its runtime length is <= this)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling settings (part of the compiled step: changing them recompiles).

    Defaults are the reference `LMGen` defaults."""

    use_sampling: bool = True
    temp: float = 0.8  # audio (depth transformer) temperature
    top_k: int = 250  # audio top-k
    temp_text: float = 0.7
    top_k_text: int = 25

    def __post_init__(self):
        # ints are fine (a repository's lm_gen_config may say `"temp": 1`); bools are not numbers here.
        for name in ("temp", "temp_text"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int | float):
                raise TypeError(f"SamplingConfig.{name} must be a number, got {getattr(self, name)!r}")
        for name in ("top_k", "top_k_text"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise TypeError(f"SamplingConfig.{name} must be an int, got {getattr(self, name)!r}")

    @classmethod
    def greedy(cls) -> SamplingConfig:
        return cls(use_sampling=False)

    @property
    def text_is_greedy(self) -> bool:
        return not self.use_sampling or self.temp_text <= 0

    @property
    def audio_is_greedy(self) -> bool:
        return not self.use_sampling or self.temp <= 0


def sample_token(rng: Array | None, logits: Array, temp: float, top_k: int, use_sampling: bool = True,
                 bias: Array | None = None) -> Array:
    """Sample one token per row of `logits` `[..., V]`; returns int32 `[...]`.

    `temp`, `top_k`, `use_sampling` are static Python values. `rng` may be None in greedy mode."""
    logits = logits.astype(jnp.float32)  # softmax and sampling in float32, as the reference does
    if not use_sampling or temp <= 0:
        if bias is not None:
            logits = logits + bias
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if rng is None:
        raise ValueError("sampling (use_sampling=True, temp > 0) needs a PRNG key")
    logp = logits / temp
    if bias is not None:
        logp = logp + bias
    V = logits.shape[-1]
    if 0 < top_k < V:
        # top-k of the tempered logits = top-k of the probabilities (softmax is monotonic).
        vals, idx = jax.lax.top_k(logp, top_k)
        choice = jax.random.categorical(rng, vals, axis=-1)
        return jnp.take_along_axis(idx, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)
    return jax.random.categorical(rng, logp, axis=-1).astype(jnp.int32)


def top_k_probs(logits: Array, temp: float, top_k: int, bias: Array | None = None) -> Array:
    """The distribution `sample_token` draws from, `[..., V]` float32 (zero outside the top k).

    Used by tests and by anyone who wants the exact sampling probabilities."""
    logp = logits.astype(jnp.float32) / temp
    if bias is not None:
        logp = logp + bias
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = jax.lax.top_k(logp, top_k)[0][..., -1:]
        logp = jnp.where(logp >= kth, logp, -jnp.inf)
    return jax.nn.softmax(logp, axis=-1)


# ----------------------------------------------------------------------------------------- per-item settings
def seed_key(seed: int) -> np.ndarray:
    """The raw threefry key [2] uint32 of a 64-bit seed (what `jax.random.PRNGKey(seed)` gives with x64 on):
    (seed >> 32, seed & 0xffffffff), computed on the host so any seed in [0, 2**64) works."""
    seed = int(seed)
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


@struct.dataclass
class ItemSampling:
    """Per-item sampling settings and RNG state of a batch (runtime arrays: changing them never recompiles).

    Temperatures <= 0 mean greedy (argmax); top-k <= 0 or >= V means no cut; repetition_penalty 1 is off."""

    text_temp: Array  # [B] float32
    text_top_k: Array  # [B] int32
    audio_temp: Array  # [B] float32
    audio_top_k: Array  # [B] int32
    repetition_penalty: Array  # [B] float32 (Rust server: text logits >= 0 divided by it, < 0 multiplied)
    repetition_context: Array  # [B] int32: the last N non-special text tokens are penalised (<= MAX_...)
    text_seed_key: Array  # [B, 2] uint32 the key a reset restarts from (seed_key(text_seed))
    audio_seed_key: Array  # [B, 2] uint32
    text_key: Array  # [B, 2] uint32 the current key (split once per step of the item)
    audio_key: Array  # [B, 2] uint32
    recent_text: Array  # [B, MAX_REPETITION_CONTEXT] int32 newest first, -1 = empty

    @classmethod
    def create(cls, batch_size: int, defaults: SamplingConfig) -> ItemSampling:
        """Every item with the settings of `defaults`, seeds 0..B-1 (text) and the same for audio."""
        B = batch_size
        t = 0.0 if not defaults.use_sampling else 1.0
        keys = jnp.asarray(np.stack([seed_key(b) for b in range(B)]))
        return cls(
            text_temp=jnp.full((B,), defaults.temp_text * t, jnp.float32),
            text_top_k=jnp.full((B,), defaults.top_k_text, jnp.int32),
            audio_temp=jnp.full((B,), defaults.temp * t, jnp.float32),
            audio_top_k=jnp.full((B,), defaults.top_k, jnp.int32),
            repetition_penalty=jnp.ones((B,), jnp.float32),
            repetition_context=jnp.zeros((B,), jnp.int32),
            text_seed_key=keys, audio_seed_key=keys, text_key=keys, audio_key=keys,
            recent_text=jnp.full((B, MAX_REPETITION_CONTEXT), -1, jnp.int32))

    def restart(self, mask: Array) -> ItemSampling:
        """Items where mask [B]: keys back to their seeds, recent text forgotten (a new conversation)."""
        m = mask[:, None]
        return self.replace(text_key=jnp.where(m, self.text_seed_key, self.text_key),
                            audio_key=jnp.where(m, self.audio_seed_key, self.audio_key),
                            recent_text=jnp.where(m, -1, self.recent_text))

    def remember_text(self, token: Array, special: tuple[int, ...]) -> ItemSampling:
        """Push this step's text token [B] into the recent window unless it is special (PAD, EPAD, start)."""
        keep = token >= 0
        for t in special:
            keep &= token != t
        pushed = jnp.concatenate([token[:, None].astype(jnp.int32), self.recent_text[:, :-1]], axis=1)
        return self.replace(recent_text=jnp.where(keep[:, None], pushed, self.recent_text))


def split_item_keys(keys: Array) -> tuple[Array, Array]:
    """[B, 2] keys -> (this step's keys [B, 2], the next keys [B, 2]), each item from its own key."""
    both = jax.vmap(jax.random.split)(keys)  # [B, 2, 2]
    return both[:, 0], both[:, 1]


def apply_repetition_penalty(logits: Array, recent: Array, context: Array, penalty: Array) -> Array:
    """The Rust server's text repetition penalty: every distinct token among the first `context[b]` entries of
    `recent[b]` (newest first, -1 empty) gets its raw logit divided by `penalty[b]` if >= 0, else multiplied.

    logits [B, V] float32, recent [B, H] int32, context [B] int32, penalty [B] float32 -> [B, V]."""
    B, V = logits.shape
    H = recent.shape[1]
    use = (jnp.arange(H)[None] < context[:, None]) & (recent >= 0)
    idx = jnp.where(use, recent, V)  # V: out of range, dropped
    hit = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], idx].set(True, mode="drop")
    p = penalty[:, None]
    return jnp.where(hit, jnp.where(logits >= 0, logits / p, logits * p), logits)


FAST_TOP_K = 256  # per-item top-k up to this is read off one lax.top_k instead of a sort of the whole vocabulary


def kth_largest(logp: Array, k: Array) -> Array:
    """The k[b]-th largest value of each row of logp [B, V] (k [B] int32 in [1, V]) -> [B, 1].

    The usual settings (text 25, audio 250, or no cut) take a partial top-k of FAST_TOP_K values; only a batch
    in which some item asks for a cut above it sorts the whole vocabulary (chosen at run time: one compiled
    step serves both)."""
    V = logp.shape[-1]
    fast = min(V, FAST_TOP_K)

    def by_top_k(logp):  # rows with k >= V keep everything: their k-th largest is the row's minimum
        kth = jnp.take_along_axis(jax.lax.top_k(logp, fast)[0], (jnp.minimum(k, fast) - 1)[:, None], axis=-1)
        return jnp.where((k >= V)[:, None], jnp.min(logp, axis=-1, keepdims=True), kth)

    def by_sort(logp):
        return jnp.take_along_axis(jnp.sort(logp, axis=-1), (V - k)[:, None], axis=-1)

    if fast == V:
        return by_top_k(logp)
    return jax.lax.cond(jnp.all((k <= fast) | (k >= V)), by_top_k, by_sort, logp)


def sample_token_items(keys: Array, logits: Array, temp: Array, top_k: Array, bias: Array | None = None) -> Array:
    """Per-item `sample_token`: row b of logits [B, V] with temp[b], top_k[b] (runtime [B] arrays) and its own
    key keys[b] ([B, 2]). Same distribution as `sample_token` with those settings (`top_k_probs`); temp <= 0
    is greedy (argmax of logits + bias). Returns int32 [B]."""
    logits = logits.astype(jnp.float32)
    V = logits.shape[-1]
    greedy = temp <= 0
    logp = logits / jnp.where(greedy, 1.0, temp)[:, None]
    if bias is not None:
        logp = logp + bias
    k = jnp.where((top_k <= 0) | (top_k > V), V, top_k)
    logp = jnp.where(logp >= kth_largest(logp, k), logp, -jnp.inf)
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, (V,), jnp.float32))(keys)
    sampled = jnp.argmax(logp + gumbel, axis=-1)
    raw = logits if bias is None else logits + bias
    return jnp.where(greedy, jnp.argmax(raw, axis=-1), sampled).astype(jnp.int32)
