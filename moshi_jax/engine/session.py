"""Per-session sampling settings of `moshi-jax serve`, read from the websocket URL's query string.

    defaults = SessionSettings.from_sampling(engine.cfg.sampling, engine.cfg.pad_bias)
    settings = parse_query(request.query.items(), defaults)     # raises SettingsError naming the parameter
    state = engine.set_item_sampling(state, slot, **settings.engine_values())

The parameter names are the reference web client's (and the Rust server's): text_temperature, text_topk,
audio_temperature, audio_topk, pad_mult, text_seed, audio_seed, repetition_penalty,
repetition_penalty_context. Their meaning follows the Rust server (`moshi-core/lm_generate_multistream.rs`):
- temperatures: 0 = greedy; top-k: 0 = no cut;
- pad_mult: the PAD token's probability is multiplied by exp(pad_mult) (= our PAD log-prob bias);
- repetition_penalty over the last `repetition_penalty_context` text tokens that are not PAD / EPAD:
  each distinct token's raw logit is divided by it when >= 0, multiplied when < 0 (1 = off);
- seeds: the session's text and audio random streams (a missing seed is drawn at random and reported in the
  0x04 metadata, so any session can be replayed).
Out-of-range or malformed values raise `SettingsError`; unknown parameters are ignored (and reported).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Iterable

from moshi_jax.nn.sampling import MAX_REPETITION_CONTEXT, SamplingConfig, seed_key

MAX_SEED = (1 << 64) - 1
MAX_TOP_K = 1 << 20
# name -> (type, lowest, highest) accepted; the bounds are inclusive
LIMITS: dict[str, tuple[type, float, float]] = {
    "text_temperature": (float, 0.0, 10.0),
    "text_topk": (int, 0, MAX_TOP_K),
    "audio_temperature": (float, 0.0, 10.0),
    "audio_topk": (int, 0, MAX_TOP_K),
    "pad_mult": (float, -20.0, 20.0),
    "text_seed": (int, 0, MAX_SEED),
    "audio_seed": (int, 0, MAX_SEED),
    "repetition_penalty": (float, 0.1, 10.0),
    "repetition_penalty_context": (int, 0, MAX_REPETITION_CONTEXT),
}


class SettingsError(ValueError):
    """A query parameter is malformed or out of range (the message names it)."""


@dataclasses.dataclass(frozen=True)
class SessionSettings:
    """One session's sampling settings (field names = the query parameters)."""

    text_temperature: float = 0.7
    text_topk: int = 25
    audio_temperature: float = 0.8
    audio_topk: int = 250
    pad_mult: float = 0.0
    text_seed: int | None = None  # None: drawn at random when the session starts
    audio_seed: int | None = None
    repetition_penalty: float = 1.0
    repetition_penalty_context: int = 64
    ignored: tuple[str, ...] = ()  # unknown query parameters (reported in the metadata)

    @classmethod
    def from_sampling(cls, sampling: SamplingConfig, pad_bias: float = 0.0) -> SessionSettings:
        """The server's defaults: the engine's static sampling settings."""
        greedy = not sampling.use_sampling
        return cls(text_temperature=0.0 if greedy else float(sampling.temp_text), text_topk=int(sampling.top_k_text),
                   audio_temperature=0.0 if greedy else float(sampling.temp), audio_topk=int(sampling.top_k),
                   pad_mult=float(pad_bias))

    def with_seeds(self) -> SessionSettings:
        """Missing seeds drawn at random (from the OS), so the metadata can report every seed."""
        return dataclasses.replace(
            self, text_seed=secrets.randbits(32) if self.text_seed is None else self.text_seed,
            audio_seed=secrets.randbits(32) if self.audio_seed is None else self.audio_seed)

    def engine_values(self) -> dict:
        """Keyword arguments of `Engine.set_item_sampling` (seeds must be set: see `with_seeds`)."""
        if self.text_seed is None or self.audio_seed is None:
            raise ValueError("seeds are not set: call with_seeds() first")
        return {"pad_bias": self.pad_mult, "text_temp": self.text_temperature, "text_top_k": self.text_topk,
                "audio_temp": self.audio_temperature, "audio_top_k": self.audio_topk,
                "repetition_penalty": self.repetition_penalty,
                "repetition_context": self.repetition_penalty_context,
                "text_seed_key": seed_key(self.text_seed), "audio_seed_key": seed_key(self.audio_seed)}

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in LIMITS}


def _parse_value(name: str, raw: str):
    kind, lo, hi = LIMITS[name]
    text = raw.strip()
    try:
        value = float(text)
        if kind is int:
            if not value.is_integer():
                raise ValueError
            value = int(text) if text.lstrip("+-").isdigit() else int(value)  # exact for 64-bit seeds
    except (ValueError, OverflowError):
        raise SettingsError(f"bad setting {name}={raw[:32]!r}: expected {'an integer' if kind is int else 'a number'}"
                            f" in [{lo:g}, {hi:g}]") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise SettingsError(f"bad setting {name}={raw[:32]!r}: out of range [{lo:g}, {hi:g}]")
    return value


def parse_query(pairs: Iterable[tuple[str, str]], defaults: SessionSettings | None = None) -> SessionSettings:
    """Settings from the query string's (name, value) pairs (e.g. aiohttp's `request.query.items()`), on top
    of `defaults`. Raises SettingsError for a malformed, out-of-range or repeated parameter."""
    values: dict = {}
    ignored: list[str] = []
    for name, raw in pairs:
        if name not in LIMITS:
            ignored.append(name[:40])
            continue
        if name in values:
            raise SettingsError(f"bad setting {name}: given more than once")
        values[name] = _parse_value(name, raw)
    return dataclasses.replace(defaults or SessionSettings(), **values, ignored=tuple(ignored))


__all__ = ["LIMITS", "SessionSettings", "SettingsError", "parse_query"]
