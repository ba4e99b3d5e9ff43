"""Word error rate and a DTW log-mel distance: how the learning benchmark scores ASR transcripts and TTS audio.

    wer(["the red box"], ["the box"])          -> 1/3 (one deletion over three reference words)
    mel_dtw_distance(audio_a, audio_b, 24000)  -> mean |log-mel| distance along the best monotonic alignment
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np


def normalize(text: str) -> list[str]:
    """Lower-case words without punctuation (both sides of a WER are normalised the same way)."""
    return re.findall(r"[a-z0-9']+", text.lower())


@dataclasses.dataclass(frozen=True)
class WordErrors:
    substitutions: int
    deletions: int
    insertions: int
    reference_words: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    def __add__(self, other: WordErrors) -> WordErrors:
        return WordErrors(self.substitutions + other.substitutions, self.deletions + other.deletions,
                          self.insertions + other.insertions, self.reference_words + other.reference_words)


def word_errors(reference: str | Sequence[str], hypothesis: str | Sequence[str]) -> WordErrors:
    """Word-level Levenshtein alignment (unit costs) of a hypothesis against a reference transcript; strings are
    normalised with `normalize`. Among alignments of minimal cost, the counts of one of them."""
    ref = normalize(reference) if isinstance(reference, str) else list(reference)
    hyp = normalize(hypothesis) if isinstance(hypothesis, str) else list(hypothesis)
    n, m = len(ref), len(hyp)
    # cost[i][j] = (errors, subs, dels, ins) aligning ref[:i] with hyp[:j]; tuples compare errors first.
    prev = [(j, 0, 0, j) for j in range(m + 1)]
    for i in range(1, n + 1):
        cur = [(i, 0, i, 0)]
        for j in range(1, m + 1):
            e, s, d, ins = prev[j - 1]
            if ref[i - 1] == hyp[j - 1]:
                best = (e, s, d, ins)
            else:
                best = (e + 1, s + 1, d, ins)
            e, s, d, ins = prev[j]
            best = min(best, (e + 1, s, d + 1, ins))
            e, s, d, ins = cur[j - 1]
            best = min(best, (e + 1, s, d, ins + 1))
            cur.append(best)
        prev = cur
    _, s, d, ins = prev[m]
    return WordErrors(s, d, ins, n)


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus word error rate: total errors / total reference words (can exceed 1 with insertions)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    total = WordErrors(0, 0, 0, 0)
    for r, h in zip(references, hypotheses, strict=True):
        total = total + word_errors(r, h)
    if total.reference_words == 0:
        raise ValueError("the references have no words")
    return total.errors / total.reference_words


# --- spectral distance --------------------------------------------------------------------------------------------
def _mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular mel filterbank [n_mels, n_fft // 2 + 1] (HTK mel scale)."""
    def mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(0.0), mel(sample_rate / 2), n_mels + 2))
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / np.maximum(mid - lo, 1e-9)
    down = (hi - freqs[None]) / np.maximum(hi - mid, 1e-9)
    return np.maximum(0.0, np.minimum(up, down))


def log_mel(audio: np.ndarray, sample_rate: int, n_fft: int = 1024, hop: int = 256, n_mels: int = 64) -> np.ndarray:
    """float32 [T] audio -> log-mel frames [F, n_mels] (Hann window, natural log of power + 1e-5)."""
    x = np.asarray(audio, np.float64).reshape(-1)
    if x.shape[0] < n_fft:
        x = np.pad(x, (0, n_fft - x.shape[0]))
    n = 1 + (x.shape[0] - n_fft) // hop
    idx = np.arange(n_fft)[None] + hop * np.arange(n)[:, None]
    spec = np.abs(np.fft.rfft(x[idx] * np.hanning(n_fft)[None], axis=1)) ** 2
    return np.log(spec @ _mel_filters(sample_rate, n_fft, n_mels).T + 1e-5).astype(np.float32)


def dtw_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-step Euclidean distance along the minimal-cost monotonic alignment of feature sequences a [N, D]
    and b [M, D] (steps (1,0), (0,1), (1,1)), divided by the path length."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError("DTW of an empty sequence")
    cost = np.sqrt(np.maximum(0.0, (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None] - 2.0 * a @ b.T))
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    steps = np.zeros((n + 1, m + 1))
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            options = (acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])
            k = int(np.argmin(options))
            prev = ((i - 1, j - 1), (i - 1, j), (i, j - 1))[k]
            acc[i, j] = cost[i - 1, j - 1] + options[k]
            steps[i, j] = steps[prev] + 1
    return float(acc[n, m] / steps[n, m])


def mel_dtw_distance(a: np.ndarray, b: np.ndarray, sample_rate: int) -> float:
    """DTW distance between the log-mel spectrograms of two recordings (a timing-independent spectral distance)."""
    return dtw_distance(log_mel(a, sample_rate), log_mel(b, sample_rate))
