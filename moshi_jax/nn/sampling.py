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
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


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
