"""Streaming TTS word feeding: the reference `models/tts.py` `StateMachine`, vectorised over a batch and traced
inside the engine step (fixed-shape per-item queues, no host round trip per frame).

The model predicts the text stream; after each text sample the machine decides what is actually fed back:

- a prediction other than EPAD ("new word", id 0) or PAD (3) counts as PAD;
- while tokens of the current word are queued, or `forced_padding > 0`, the fed token is PAD-or-queued-token;
- when `remaining_padding` reaches 0 (``max_padding`` PADs in a row), a new word is forced;
- on "new word": the next entry is popped; a word entry queues its tokens (fed one per frame from the next
  frame on, in place of PADs), resets `remaining_padding` to ``max_padding`` and sets `forced_padding` to the
  entry's padding; a break entry (no tokens) only sets `forced_padding` and counts as a PAD; past the last
  entry the fed token is PAD and `end_step` is set (first time only);
- on PAD: both counters decrease (not below 0) and the fed token is the next queued token, or PAD.

A fresh item starts with `remaining_padding = forced_padding = initial_padding` (PADs before the first word).
Not supported: the look-ahead second text stream (`second_stream_ahead`, needs a demuxed second stream).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array

NEW_WORD, PAD = 0, 3  # reference TokenIds defaults (= the LM's existing_text_end_padding_id / padding_id)
MAIN_SPEAKER, OTHER_SPEAKER = 1, 2


@dataclasses.dataclass(frozen=True)
class Entry:
    """One word to feed: its token ids (empty for a break) and the PADs forced after it is popped."""

    tokens: tuple[int, ...]
    text: str
    padding: int = 0


_EVENT = re.compile(r"(?:<break\s+time=\"([0-9]+(?:.[0-9]*)?)s\"\s*/?>)|(?:\s+)")


def script_to_entries(encode, script: str | Sequence[str], frame_rate: float = 12.5, multi_speaker: bool = False,
                      padding_between: int = 0) -> list[Entry]:
    """Text -> entries with the reference's rules (`tts.script_to_entries`): turns are the items of `script`
    (main speaker first), words split on whitespace, ``’``/``:``/``(``/``)`` normalised, SSML-style
    ``<break time="0.5s"/>`` becomes a break of round(seconds * frame_rate) forced PADs; with `multi_speaker`
    a turn's first word is prefixed by the speaker token (1 main / 2 other) when the speaker changes;
    `padding_between` > 0 forces `padding_between + len(tokens) - 1` PADs after each word.
    `encode(word) -> list[int]` is the text tokenizer."""
    turns = [script] if isinstance(script, str) else list(script)
    entries: list[Entry] = []
    last_speaker = None
    for idx, line in enumerate(turns):
        first = True
        line = line.replace("\u2019", "'").replace(":", " ").replace("(", "").replace(")", "")
        pieces: list[tuple[str, float | None]] = []  # (word, None) or ("", break seconds)
        while line:
            m = _EVENT.search(line)
            if m is None:
                break
            if line[:m.start()]:
                pieces.append((line[:m.start()], None))
            line = line[m.end():]
            if m.group(1):
                pieces.append(("", float(m.group(1))))
        if line:
            pieces.append((line, None))
        for word, brk in pieces:
            if brk is not None:
                entries.append(Entry((), "", int(round(brk * frame_rate))))
                continue
            tokens = list(encode(word))
            if first:
                speaker = idx % 2
                if multi_speaker and last_speaker != speaker:
                    last_speaker = speaker
                    tokens.insert(0, (MAIN_SPEAKER, OTHER_SPEAKER)[speaker])
                first = False
            pad = max(0, padding_between + len(tokens) - 1) if padding_between > 0 else 0
            entries.append(Entry(tuple(int(t) for t in tokens), word, pad))
    return entries


@struct.dataclass
class TTSState:
    """Per-item word queue and counters (all leading axis B). W entries, L tokens of capacity."""

    tokens: Array  # [B, L] int32 all entries' tokens, concatenated
    word_start: Array  # [B, W] int32 offset of each entry's tokens in `tokens`
    word_len: Array  # [B, W] int32 (0 = break)
    word_pad: Array  # [B, W] int32 forced PADs after the entry
    n_words: Array  # [B] int32 entries loaded
    next_word: Array  # [B] int32 index of the next entry to pop
    q_pos: Array  # [B] int32 next queued token (queue = tokens[q_pos:q_end])
    q_end: Array  # [B] int32
    remaining: Array  # [B] int32 PADs still allowed before a new word is forced
    forced: Array  # [B] int32 PADs still forced
    end_step: Array  # [B] int32 step at which the model asked past the last entry (-1: not yet)
    consumed_at: Array  # [B, W] int32 step at which each entry was popped (-1: not yet)


def init_tts_state(batch_size: int, max_words: int, max_tokens: int, initial_padding: int) -> TTSState:
    z = jnp.zeros((batch_size,), jnp.int32)
    return TTSState(
        tokens=jnp.full((batch_size, max_tokens), PAD, jnp.int32),
        word_start=jnp.zeros((batch_size, max_words), jnp.int32),
        word_len=jnp.zeros((batch_size, max_words), jnp.int32),
        word_pad=jnp.zeros((batch_size, max_words), jnp.int32),
        n_words=z, next_word=z, q_pos=z, q_end=z,
        remaining=z + initial_padding, forced=z + initial_padding, end_step=z - 1,
        consumed_at=jnp.full((batch_size, max_words), -1, jnp.int32),
    )


def pack_entries(entries: Sequence[Entry], max_words: int, max_tokens: int) -> dict[str, np.ndarray]:
    """Host side: entries -> the arrays of one TTSState row (checked against the capacities)."""
    n_tok = sum(len(e.tokens) for e in entries)
    if len(entries) > max_words:
        raise ValueError(f"text has {len(entries)} words/breaks, more than the engine's tts_max_words={max_words}")
    if n_tok > max_tokens:
        raise ValueError(f"text has {n_tok} tokens, more than the engine's tts_max_tokens={max_tokens}")
    tokens = np.full((max_tokens,), PAD, np.int32)
    start = np.zeros((max_words,), np.int32)
    length = np.zeros((max_words,), np.int32)
    pad = np.zeros((max_words,), np.int32)
    pos = 0
    for i, e in enumerate(entries):
        start[i], length[i], pad[i] = pos, len(e.tokens), e.padding
        tokens[pos:pos + len(e.tokens)] = e.tokens
        pos += len(e.tokens)
    return {"tokens": tokens, "word_start": start, "word_len": length, "word_pad": pad,
            "n_words": np.int32(len(entries))}


def process(state: TTSState, step: Array, sampled: Array, max_padding: int) -> tuple[TTSState, Array]:
    """One frame of the state machine for every item: sampled text [B] -> (state, fed token [B]).
    `step` [B] is each item's frame index (for `end_step` / `consumed_at`)."""
    B = sampled.shape[0]
    rows = jnp.arange(B)
    queued = state.q_pos < state.q_end
    word = (sampled == NEW_WORD) & ~queued & (state.forced <= 0)
    word = word | (~queued & (state.forced <= 0) & (state.remaining <= 0))

    has_entry = state.next_word < state.n_words
    pop = word & has_entry
    idx = jnp.clip(state.next_word, 0, state.word_len.shape[1] - 1)
    e_len, e_start, e_pad = state.word_len[rows, idx], state.word_start[rows, idx], state.word_pad[rows, idx]
    is_text = pop & (e_len > 0)
    consumed_at = state.consumed_at.at[rows, idx].set(jnp.where(pop, step, state.consumed_at[rows, idx]))
    next_word = state.next_word + pop
    q_pos = jnp.where(is_text, e_start, state.q_pos)
    q_end = jnp.where(is_text, e_start + e_len, state.q_end)
    remaining = jnp.where(is_text, max_padding, state.remaining)
    forced = jnp.where(pop, e_pad, state.forced)
    end_step = jnp.where(word & ~has_entry & (state.end_step < 0), step, state.end_step)

    fed_word = is_text  # a break entry, or asking past the end, is fed as a PAD
    # PAD branch: counters decrease, the next queued token (if any) is fed instead of PAD
    remaining = jnp.where(~fed_word & (remaining > 0), remaining - 1, remaining)
    forced = jnp.where(~fed_word & (forced > 0), forced - 1, forced)
    has_q = ~fed_word & (q_pos < q_end)
    tok = state.tokens[rows, jnp.clip(q_pos, 0, state.tokens.shape[1] - 1)]
    out = jnp.where(fed_word, NEW_WORD, jnp.where(has_q, tok, PAD))
    q_pos = q_pos + has_q
    new = state.replace(next_word=next_word, q_pos=q_pos, q_end=q_end, remaining=remaining, forced=forced,
                        end_step=end_step, consumed_at=consumed_at)
    return new, out.astype(jnp.int32)
