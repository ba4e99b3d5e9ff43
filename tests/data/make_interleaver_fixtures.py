"""Record moshi-finetune's own Interleaver outputs as fixture data for tests/data/test_interleaver.py.

    MOSHI_FINETUNE_DIR=/path/to/moshi-finetune python tests/data/make_interleaver_fixtures.py

Runs the reference `finetune/data/interleaver.py` (`Interleaver.prepare_item`, and `dicho` for the window
search) of a kyutai-labs/moshi-finetune checkout (needs torch and the `moshi` package it imports) on hand-picked
and random inputs: several speakers, BOS/EOS, audio delays, overlapping words, equal start times, times on
frame boundaries and at the audio's end. It writes tests/data/fixtures/interleaver_moshi_finetune.json with each
case's input, settings and the reference's tokens, so the comparison runs in CI without a checkout. The word
tokenizer is a fixed toy one (0..3 ids per word); the fixture stores each word's ids.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "fixtures" / "interleaver_moshi_finetune.json"
M, S1, S2 = "SPEAKER_MAIN", "SPEAKER_1", "SPEAKER_2"
FRAME_RATE, PAD, EPAD, ZERO, BOS, EOS = 12.5, 3, 0, -1, 1, 2
WORDS = ["a", "to", "the", "cats", "hello", "world", "x", "banana", " padded ", "um"]


def toy_word_ids(text: str) -> list[int]:
    """0..3 token ids >= 5 per word, a pure function of the word ("cats", "um": none)."""
    if text == "\n":
        return [4]
    return [5 + (ord(c) * 7 + i) % 90 for i, c in enumerate(text[: len(text) % 4])]


class ToySentencePiece:
    """The slice of SentencePieceProcessor the reference uses: encode(list[str]) -> list[list[int]], bos/eos."""

    def encode(self, texts):
        if isinstance(texts, str):
            return self.encode([texts])[0]
        return [toy_word_ids(t) for t in texts]

    def bos_id(self):
        return BOS

    def eos_id(self):
        return EOS


def _load_reference(root: str):
    path = Path(root) / "finetune" / "data" / "interleaver.py"
    if not path.is_file():
        raise SystemExit(f"{path} not found: set MOSHI_FINETUNE_DIR to a kyutai-labs/moshi-finetune checkout")
    spec = importlib.util.spec_from_file_location("_moshi_finetune_interleaver", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _hand_cases() -> list[tuple[str, list, float, dict]]:
    """(name, alignments, duration, settings): the situations a reviewer would pick."""
    f = 1 / FRAME_RATE  # one frame, 0.08 s
    main_all = dict(keep_main_only=False)
    bos_eos = dict(keep_main_only=False, use_bos_eos=True)
    return [
        ("equal start times, main only", [("hello", (0.2, 0.5), M), ("x", (0.2, 0.3), M), ("to", (0.6, 0.7), M)],
         1.0, {}),
        ("equal start times, the later in the input wins", [("x", (0.2, 0.3), M), ("hello", (0.2, 0.5), M)], 1.0, {}),
        ("equal start times of two speakers with BOS/EOS",
         [("hello", (0.2, 0.6), M), ("world", (0.2, 0.5), S1), ("a", (0.7, 0.8), M)], 1.2, bos_eos),
        ("equal start times with keep_and_shift",
         [("hello", (0.2, 0.6), M), ("banana", (0.2, 0.5), M), ("to", (0.2, 0.3), M)], 1.2,
         dict(keep_and_shift=True)),
        ("three speakers with BOS/EOS, another speaker opens",
         [("the", (0.1, 0.2), S1), ("x", (0.3, 0.4), S2), ("hello", (0.5, 0.7), M), ("a", (0.8, 0.9), S2),
          ("to", (1.0, 1.1), S1), ("world", (1.2, 1.4), M), ("banana", (1.5, 1.8), M)], 2.0, bos_eos),
        ("three speakers with BOS/EOS, main opens",
         [("hello", (0.0, 0.2), M), ("x", (0.3, 0.4), S2), ("the", (0.5, 0.6), S1), ("a", (0.7, 0.8), M)],
         1.0, bos_eos),
        ("three speakers without BOS/EOS", [("the", (0.1, 0.3), S1), ("x", (0.2, 0.4), S2), ("a", (0.5, 0.6), M)],
         0.8, main_all),
        ("three speakers, main only", [("the", (0.1, 0.3), S1), ("x", (0.2, 0.4), S2), ("a", (0.5, 0.6), M)],
         0.8, {}),
        ("word starting exactly on frame boundaries", [("to", (f, 2 * f), M), ("x", (3 * f, 5 * f), M)], 0.6, {}),
        ("word ending exactly on a frame boundary", [("hello", (0.1, 4 * f), M)], 0.6, dict(in_word_padding=7)),
        ("word ending at the audio's end", [("banana", (0.5, 1.0), M)], 1.0, dict(in_word_padding=7)),
        ("word ending past the audio's end", [("banana", (0.9, 1.3), M)], 1.0, dict(in_word_padding=7)),
        ("word starting in the last frame", [("hello", (0.97, 1.0), M)], 1.0, {}),
        ("word starting exactly at the audio's end", [("a", (0.2, 0.3), M), ("hello", (1.0, 1.1), M)], 1.0, {}),
        ("duration not a whole number of frames", [("hello", (0.9, 0.99), M)], 0.99, {}),
        ("audio delay equal to a word's end drops it", [("a", (0.1, 0.32), M), ("to", (0.4, 0.6), M)], 1.0,
         dict(audio_delay=0.32)),
        ("audio delay just below a word's end keeps it", [("a", (0.1, 0.32), M), ("to", (0.4, 0.6), M)], 1.0,
         dict(audio_delay=0.31)),
        ("audio delay moving a word before time 0", [("hello", (0.1, 0.9), M), ("x", (1.0, 1.2), M)], 1.5,
         dict(audio_delay=0.5, in_word_padding=7)),
        ("negative audio delay on frame boundaries", [("hello", (0.0, 0.16), M), ("x", (0.4, 0.5), M)], 1.0,
         dict(audio_delay=-0.32)),
        ("negative audio delay longer than the audio", [("hello", (0.0, 0.16), M)], 0.4, dict(audio_delay=-0.64)),
        ("negative audio delay pushing a word past the end", [("hello", (0.7, 0.9), M)], 1.0,
         dict(audio_delay=-0.4)),
        ("overlapping words cut each other", [("banana", (0.1, 0.9), M), ("world", (0.15, 0.3), M),
                                              ("x", (0.25, 0.5), M)], 1.0, dict(in_word_padding=7)),
        ("overlapping words with keep_and_shift", [("banana", (0.1, 0.9), M), ("world", (0.15, 0.3), M),
                                                   ("x", (0.25, 0.5), M)], 1.0, dict(keep_and_shift=True)),
        ("zero and negative durations", [("a", (0.2, 0.2), M), ("to", (0.4, 0.3), M), ("x", (0.5, 0.6), M)],
         1.0, {}),
        ("words without tokens", [("cats", (0.1, 0.3), M), ("um", (0.4, 0.6), M), ("x", (0.7, 0.8), M)], 1.0,
         dict(in_word_padding=7)),
        ("stripped words", [(" padded ", (0.1, 0.3), M)], 0.5, {}),
        ("no alignments", None, 0.7, {}),
        ("empty alignments", [], 0.7, {}),
        ("negative start", [("hello", (-0.2, 0.1), M)], 0.5, dict(in_word_padding=7)),
    ]


def _random_cases(n: int, seed: int = 0) -> list[tuple[str, list, float, dict]]:
    rng = np.random.default_rng(seed)
    cases = []
    for trial in range(n):
        al = []
        for _ in range(int(rng.integers(0, 12))):
            r = rng.random()
            if r < 0.2:  # on the frame grid
                s = round(float(rng.integers(0, 30)) / FRAME_RATE, 2)
            elif r < 0.35 and al:  # the same start as an earlier word
                s = al[int(rng.integers(0, len(al)))][1][0]
            else:
                s = float(rng.uniform(-0.3, 3.0))
            e = s + float(rng.choice([rng.uniform(-0.1, 0.0), 0.0, rng.uniform(0.0, 1.2)]))
            al.append((str(rng.choice(WORDS)), (s, e), str(rng.choice([M, M, S1, S2]))))
        duration = float(rng.choice([rng.uniform(0.8, 3.5), round(float(rng.integers(8, 40)) / FRAME_RATE, 2)]))
        kw = dict(
            keep_main_only=bool(rng.random() < 0.4),
            use_bos_eos=bool(rng.random() < 0.6),
            keep_and_shift=bool(rng.random() < 0.3),
            in_word_padding=int(rng.choice([3, 7])),
            audio_delay=float(rng.choice([0.0, 0.3, 0.64, -0.32, -0.5, 0.08])),
        )
        cases.append((f"random {trial}", None if trial % 50 == 49 else al, duration, kw))
    return cases


def _window_cases(ref, n: int = 40, seed: int = 1) -> list[dict]:
    """The reference's binary search (`dicho`) picks a window's words by start time."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        starts = sorted(round(float(x), 2) for x in rng.uniform(0, 10, int(rng.integers(0, 15))))
        if starts and rng.random() < 0.5:
            starts.insert(int(rng.integers(0, len(starts))), starts[0])
            starts.sort()
        al = [(str(rng.choice(WORDS)), (s, s + 0.3), M) for s in starts]
        start = float(rng.choice([rng.uniform(0, 9), starts[0] if starts else 0.0]))
        duration = float(rng.choice([2.0, 3.2, 0.5]))
        lo, hi = ref.dicho(al, start), ref.dicho(al, start + duration)
        out.append({"alignments": al, "start_sec": start, "duration_sec": duration, "first": lo, "end": hi})
    return out


def main() -> int:
    root = os.environ.get("MOSHI_FINETUNE_DIR")
    if not root:
        raise SystemExit("set MOSHI_FINETUNE_DIR to a kyutai-labs/moshi-finetune checkout")
    ref = _load_reference(root)
    sp = ToySentencePiece()
    cases, vocab = [], {}
    for name, al, duration, kw in _hand_cases() + _random_cases(250):
        settings = dict(keep_main_only=True, use_bos_eos=False, keep_and_shift=False, in_word_padding=PAD,
                        audio_delay=0.0) | kw
        inter = ref.Interleaver(sp, FRAME_RATE, PAD, EPAD, ZERO, main_speaker_label=M, device="cpu", **settings)
        tokens = inter.prepare_item(al, duration).view(-1).tolist()
        # A negative delay longer than the audio makes the reference's list longer than ceil(duration * rate)
        # (its slice assignment extends it); its InterleavedTokenizer then cuts it back to the frame count.
        assert len(tokens) >= math.ceil(duration * FRAME_RATE)
        for w, _, _ in al or []:
            vocab[w.strip()] = ref.tokenize(sp, w.strip(), bos=False)
        cases.append({"name": name, "alignments": al, "duration": duration, "settings": settings,
                      "tokens": tokens})
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    data = {
        "about": "Outputs of kyutai-labs/moshi-finetune finetune/data/interleaver.py (Interleaver.prepare_item, "
                 "dicho), recorded by tests/data/make_interleaver_fixtures.py",
        "moshi_finetune_commit": commit,
        "frame_rate": FRAME_RATE, "pad_id": PAD, "epad_id": EPAD, "zero_id": ZERO, "bos_id": BOS, "eos_id": EOS,
        "main_speaker": M,
        "vocab": dict(sorted(vocab.items())),
        "cases": cases,
        "windows": _window_cases(ref),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=None, separators=(",", ":")).replace('{"name"', '\n{"name"') + "\n")
    print(f"wrote {len(cases)} cases, {len(data['windows'])} windows to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
