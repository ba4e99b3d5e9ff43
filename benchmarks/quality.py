"""Audio and text quality measures for the benchmark suite (numpy; PESQ / STOI / jiwer when installed).

All audio is float32 mono at 24 kHz unless said otherwise.

- `log_mel(x)`: log10 mel spectrogram [frames, n_mels] (Hann STFT, Slaney-style triangular filters).
- `mel_distance(ref, est)`: mean absolute difference of log-mel spectrograms (the codec metric of the
  EnCodec / Mimi papers, single scale). Lengths are cut to the shorter signal.
- `si_snr(ref, est)`: scale-invariant signal-to-noise ratio in dB (zero-mean, projection onto ref).
- `dtw_mel_distance(ref, est)`: log-mel frames aligned by dynamic time warping, mean L1 per aligned frame
  (for TTS output vs a reference rendering of the same text, which need not be time-aligned).
- `pesq_wb(ref, est)` / `stoi(ref, est)`: from the `pesq` / `pystoi` packages (16 kHz / 10 kHz inside);
  None when the package is missing.
- `wer(refs, hyps)`: word error rate with jiwer after lower-casing and stripping punctuation (None when
  jiwer is missing).
"""

from __future__ import annotations

import functools
import re

import numpy as np

SAMPLE_RATE = 24_000


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None):
    """[n_fft // 2 + 1, n_mels] triangular filters on the HTK mel scale, each normalised to unit area."""
    fmax = fmax or sample_rate / 2
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fb = np.zeros((freqs.size, n_mels))
    for i in range(n_mels):
        lo, c, hi = edges[i], edges[i + 1], edges[i + 2]
        up = (freqs - lo) / max(c - lo, 1e-9)
        down = (hi - freqs) / max(hi - c, 1e-9)
        fb[:, i] = np.clip(np.minimum(up, down), 0, None) * 2.0 / max(hi - lo, 1e-9)
    return fb.astype(np.float32)


def log_mel(x: np.ndarray, sample_rate: int = SAMPLE_RATE, n_fft: int = 1024, hop: int = 256, n_mels: int = 80,
            eps: float = 1e-5) -> np.ndarray:
    """x [T] -> log10 mel magnitudes [frames, n_mels] (frames = 1 + (T - n_fft) // hop, zero-padded if short)."""
    x = np.asarray(x, np.float32).reshape(-1)
    if x.size < n_fft:
        x = np.pad(x, (0, n_fft - x.size))
    n = 1 + (x.size - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n)[:, None]
    frames = x[idx] * np.hanning(n_fft).astype(np.float32)[None]
    mag = np.abs(np.fft.rfft(frames, axis=-1)).astype(np.float32)
    return np.log10(np.maximum(mag @ mel_filterbank(sample_rate, n_fft, n_mels), eps))


def _cut(ref: np.ndarray, est: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, est = np.asarray(ref, np.float64).reshape(-1), np.asarray(est, np.float64).reshape(-1)
    n = min(ref.size, est.size)
    if n == 0:
        raise ValueError("empty signal")
    return ref[:n], est[:n]


def mel_distance(ref: np.ndarray, est: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Mean |log-mel(ref) - log-mel(est)| over time-aligned frames (0 = identical)."""
    ref, est = _cut(ref, est)
    return float(np.mean(np.abs(log_mel(ref, sample_rate) - log_mel(est, sample_rate))))


def si_snr(ref: np.ndarray, est: np.ndarray, eps: float = 1e-8) -> float:
    """Scale-invariant SNR (dB) of `est` against `ref` (higher is better; gain-independent)."""
    ref, est = _cut(ref, est)
    ref, est = ref - ref.mean(), est - est.mean()
    target = (np.dot(est, ref) / (np.dot(ref, ref) + eps)) * ref
    noise = est - target
    return float(10 * np.log10((np.dot(target, target) + eps) / (np.dot(noise, noise) + eps)))


def dtw_mel_distance(ref: np.ndarray, est: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Log-mel frames of ref and est aligned by DTW (steps (1,0), (0,1), (1,1)); mean L1 per path step."""
    a, b = log_mel(ref, sample_rate), log_mel(est, sample_rate)
    cost = np.abs(a[:, None, :] - b[None, :, :]).mean(-1)  # [Na, Nb]
    na, nb = cost.shape
    acc = np.full((na + 1, nb + 1), np.inf)
    steps = np.zeros((na + 1, nb + 1), np.int64)
    acc[0, 0] = 0.0
    for i in range(1, na + 1):  # row by row; vectorising the inner dependency is not worth it at these sizes
        row, prev = acc[i], acc[i - 1]
        srow, sprev = steps[i], steps[i - 1]
        for j in range(1, nb + 1):
            cands = (prev[j - 1], prev[j], row[j - 1])
            k = int(np.argmin(cands))
            row[j] = cost[i - 1, j - 1] + cands[k]
            srow[j] = (sprev[j - 1], sprev[j], srow[j - 1])[k] + 1
    return float(acc[na, nb] / steps[na, nb])


def _resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    import soxr

    return soxr.resample(np.asarray(x, np.float32), sr_in, sr_out, quality="HQ")


def pesq_wb(ref: np.ndarray, est: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float | None:
    """Wide-band PESQ (MOS-LQO, 1..4.64) at 16 kHz, or None when `pesq` is not installed / fails."""
    try:
        from pesq import pesq
    except ImportError:
        return None
    ref, est = _cut(ref, est)
    try:
        return float(pesq(16000, _resample(ref, sample_rate, 16000), _resample(est, sample_rate, 16000), "wb"))
    except Exception:  # e.g. "no utterances detected" on silence / noise
        return None


def stoi(ref: np.ndarray, est: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float | None:
    """Short-time objective intelligibility (0..1), or None when `pystoi` is not installed."""
    try:
        from pystoi import stoi as _stoi
    except ImportError:
        return None
    ref, est = _cut(ref, est)
    return float(_stoi(ref, est, sample_rate, extended=False))


def normalize_words(text: str) -> str:
    """Lower case, punctuation removed, single spaces (the usual WER normalisation)."""
    text = re.sub(r"[^\w\s']", " ", text.lower())
    return " ".join(text.split())


def wer(refs: list[str], hyps: list[str]) -> float | None:
    """Corpus word error rate (jiwer) after `normalize_words`; None when jiwer is missing."""
    try:
        import jiwer
    except ImportError:
        return None
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    refs = [normalize_words(r) for r in refs]
    hyps = [normalize_words(h) for h in hyps]
    if not any(refs):
        raise ValueError("all references are empty")
    # jiwer rejects empty hypotheses in some versions: an empty hypothesis is all deletions anyway
    return float(jiwer.wer(refs, [h if h else "<empty>" for h in hyps]))
