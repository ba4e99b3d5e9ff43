"""Inner Monologue text stream: word alignments -> one text token per audio frame (12.5 Hz).

A faithful re-statement of moshi-finetune's `finetune/data/interleaver.py` (`Interleaver.prepare_item` and
`build_token_stream`), whose rules are:

1. words sorted by start time (stable); each word is tokenized on its own (`tokenize(word.strip())`, no BOS);
2. `keep_main_only`: only the main speaker's words are kept; otherwise, with `use_bos_eos`, BOS is prepended
   to a main-speaker word that follows another speaker (or opens the stream) and EOS to another speaker's word
   that follows the main speaker;
3. words with end <= start are dropped; with `audio_delay` != 0 all times move by -audio_delay and words
   ending at or before `audio_delay` (original times) are dropped;
4. stream of `num_frames` PAD; at frame t every remaining word with start * frame_rate < t + 1 is loaded into
   the token queue, REPLACING what is left of the previous word (or appended to it with `keep_and_shift`);
   when the queue is non-empty, frame t - 1 becomes EPAD if it holds PAD (or in-word PAD) and frame t gets the
   next token; frames without a token up to the last loaded word's end frame (int(end * frame_rate)) get the
   in-word PAD (= PAD by default);
   With `epad_every_word` (not in moshi-finetune; the layout the TTS state machine of `engine/tts.py` feeds):
   every word is queued as [EPAD, *tokens] after what is left of the previous word (nothing is dropped); a
   word loaded into an empty queue right after a PAD frame puts that EPAD on the PAD frame (t - 1), as above;
5. negative `audio_delay`: the first int(frame_rate * -audio_delay) frames become `zero_id` (-1);
6. no alignments at all (None): the whole stream is `zero_id` (no text loss, zero embedding).

The reference's code, not its docstrings, defines these rules (e.g. another speaker opening the stream gets
no EOS).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Alignment",
    "AlignmentError",
    "MAIN_SPEAKER",
    "num_frames_for",
    "text_stream",
    "validate_alignments",
    "window_alignments",
]

Alignment = tuple[str, tuple[float, float], str]  # (word, (start_s, end_s), speaker label)
MAIN_SPEAKER = "SPEAKER_MAIN"


class AlignmentError(ValueError):
    """An alignment entry is malformed, outside the audio, reversed in time or has an unknown speaker."""


def num_frames_for(duration: float, frame_rate: float = 12.5) -> int:
    """Frames the reference gives a segment of `duration` seconds: ceil(duration * frame_rate)."""
    return math.ceil(duration * frame_rate)


def _is_time(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool) and math.isfinite(x)


def validate_alignments(
    alignments: Any,
    duration: float,
    *,
    speakers: Collection[str] | None = (MAIN_SPEAKER,),
    frame_rate: float = 12.5,
    tolerance: float | None = None,
) -> list[Alignment]:
    """Check word alignments against an audio of `duration` seconds; return them as clean tuples.

    Each entry must be [word: str, [start, end]: finite numbers, speaker: str] with start <= end (zero-length
    words are legal: the interleaver drops them, as the reference does), 0 - tol <= start and end <= duration
    + tol (tol defaults to one frame, 1 / frame_rate, for timestamp rounding), and, if `speakers` is given,
    a speaker label from it. Raises AlignmentError naming the entry, the word and its times.
    """
    if not isinstance(alignments, list | tuple):
        raise AlignmentError(f"alignments must be a list of [word, [start, end], speaker], got {type(alignments)}")
    tol = 1.0 / frame_rate if tolerance is None else tolerance
    out: list[Alignment] = []
    for i, a in enumerate(alignments):
        ok = (
            isinstance(a, list | tuple) and len(a) == 3 and isinstance(a[0], str)
            and isinstance(a[1], list | tuple) and len(a[1]) == 2 and isinstance(a[2], str)
        )
        if not ok:
            raise AlignmentError(f"alignment {i} is not [word, [start, end], speaker]: {a!r}")
        word, (start, end), speaker = a
        if not (_is_time(start) and _is_time(end)):
            raise AlignmentError(f"alignment {i} ({word!r}): times must be finite numbers, got [{start!r}, {end!r}]")
        start, end = float(start), float(end)
        if start > end:
            raise AlignmentError(f"alignment {i} ({word!r}): start {start:.3f} s > end {end:.3f} s")
        if start < -tol or end > duration + tol:
            raise AlignmentError(
                f"alignment {i} ({word!r}) at [{start:.3f}, {end:.3f}] s lies outside the audio (0 .. {duration:.3f} s)"
            )
        if speakers is not None and speaker not in speakers:
            raise AlignmentError(
                f"alignment {i} ({word!r} at [{start:.3f}, {end:.3f}] s): unknown speaker label {speaker!r} "
                f"(expected one of {sorted(speakers)})"
            )
        out.append((word, (start, end), speaker))
    return out


def window_alignments(alignments: Sequence[Alignment], start_sec: float, duration_sec: float) -> list[Alignment]:
    """The words of a [start_sec, start_sec + duration_sec) window, times relative to the window.

    As the reference's InterleavedTokenizer (binary search on start times, `dicho`): a word belongs to the
    window iff its START lies inside it (a word straddling the window start is dropped; one straddling the
    end is kept and clipped later by the frame count). `alignments` must be sorted by start time.
    """
    starts = [a[1][0] for a in alignments]
    if any(b < a for a, b in zip(starts, starts[1:], strict=False)):
        raise AlignmentError("window_alignments needs alignments sorted by start time")
    lo = _first_at_or_after(starts, start_sec)
    hi = _first_at_or_after(starts, start_sec + duration_sec)
    return [(w, (s - start_sec, e - start_sec), spk) for w, (s, e), spk in alignments[lo:hi]]


def _first_at_or_after(starts: list[float], value: float) -> int:
    lo, hi = 0, len(starts)
    while lo < hi:
        mid = (lo + hi) // 2
        if starts[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


def text_stream(
    alignments: Sequence[Alignment] | None,
    num_frames: int,
    tokenize: Callable[[str], list[int]],
    *,
    frame_rate: float = 12.5,
    pad_id: int = 3,
    epad_id: int = 0,
    zero_id: int = -1,
    in_word_pad_id: int | None = None,
    main_speaker: str = MAIN_SPEAKER,
    keep_main_only: bool = True,
    keep_and_shift: bool = False,
    epad_every_word: bool = False,
    use_bos_eos: bool = False,
    bos_id: int | None = None,
    eos_id: int | None = None,
    audio_delay: float = 0.0,
) -> np.ndarray:
    """Frame-aligned Inner Monologue text tokens, int32 [num_frames] (rules in the module docstring).

    Args:
      alignments: [(word, (start_s, end_s), speaker)], any order; None = no transcript (all `zero_id`).
      num_frames: length of the stream (the audio's frame count; the reference uses ceil(duration * rate)).
      tokenize: word -> token ids (e.g. SentencePiece encode without BOS).
      pad_id / epad_id: PAD (3) and end-of-padding (0) ids; in_word_pad_id: filler inside a word's span
        (defaults to pad_id, as in moshi-finetune).
      keep_main_only: keep only `main_speaker`'s words (moshi-finetune's setting). Else `use_bos_eos` inserts
        `bos_id` / `eos_id` at speaker changes.
      keep_and_shift: queue a new word's tokens after the unfinished previous word instead of replacing it.
      epad_every_word: every word opens with EPAD (implies keep_and_shift): the stream a TTS model is driven
        with, where a word is only fed after the model asks for it with EPAD.
      audio_delay: seconds the text runs AHEAD of the audio (> 0: TTS-like); < 0 also blanks the first
        |delay| seconds of text with `zero_id`.
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    if alignments is None:
        return np.full((num_frames,), zero_id, np.int32)
    if use_bos_eos and not keep_main_only and (bos_id is None or eos_id is None):
        raise ValueError("use_bos_eos needs bos_id and eos_id")
    in_word = pad_id if in_word_pad_id is None else in_word_pad_id

    # prepare_item: sort, tokenize each word alone, speaker handling, drop empty durations, delay.
    words = sorted(alignments, key=lambda a: a[1][0])
    tokenized: list[tuple[list[int], tuple[float, float], str]] = [
        (list(tokenize(w.strip())), (float(s), float(e)), spk) for w, (s, e), spk in words
    ]
    if keep_main_only:
        tokenized = [a for a in tokenized if a[2] == main_speaker]
    elif use_bos_eos:
        marked = []
        last_speaker = None
        for toks, ts, spk in tokenized:
            if spk == last_speaker:
                pass
            elif spk == main_speaker:
                toks = [bos_id, *toks]
            elif last_speaker == main_speaker:
                toks = [eos_id, *toks]
            last_speaker = spk
            marked.append((toks, ts, spk))
        tokenized = marked
    tokenized = [a for a in tokenized if a[1][0] < a[1][1]]
    if audio_delay != 0:
        tokenized = [(t, (s - audio_delay, e - audio_delay), spk) for t, (s, e), spk in tokenized if e > audio_delay]

    # build_token_stream.
    out = [pad_id] * num_frames
    queue: deque[int] = deque()
    i = 0
    last_word_end = -1

    def after_pad(t: int) -> bool:  # frame t - 1 holds PAD (or the in-word filler): EPAD goes there
        return t > 0 and out[t - 1] in (pad_id, in_word)

    for t in range(num_frames):
        while i < len(tokenized) and tokenized[i][1][0] * frame_rate < t + 1:
            toks, (_, end), _ = tokenized[i]
            last_word_end = int(end * frame_rate)  # truncation toward zero, as the reference's int()
            if epad_every_word:  # the EPAD rule below covers a word starting after a PAD frame
                queue.extend(toks if not queue and after_pad(t) else [epad_id, *toks])
            elif keep_and_shift:
                queue.extend(toks)
            else:
                queue = deque(toks)
            i += 1
        if queue:
            if after_pad(t):
                out[t - 1] = epad_id
            out[t] = queue.popleft()
        elif t <= last_word_end:
            out[t] = in_word
    if audio_delay < 0:
        prefix = int(frame_rate * -audio_delay)
        out[:prefix] = [zero_id] * min(prefix, num_frames)
    return np.asarray(out, np.int32)
