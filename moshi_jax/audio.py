"""Audio file I/O: robust loading (any rate / channel count libsndfile reads) and float WAV saving.

Loading goes through libsndfile (`soundfile`) and resampling through libsoxr (`soxr`, HQ), the same
well-kept libraries the rest of the project relies on. Every way a file can be unusable (missing, not
audio, corrupt, truncated, empty, non-finite samples, wrong channel count) raises `AudioError` with
the file name and the problem, so callers (CLI, data pipeline) can report and skip/reject cleanly.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

log = logging.getLogger(__name__)

__all__ = ["AudioError", "load_audio", "save_audio", "resample"]


class AudioError(ValueError):
    """An audio file is missing, unreadable, corrupt, truncated, empty, non-finite or has the wrong layout."""


def _wav_truncation(path: Path) -> str | None:
    """For RIFF/WAVE files: describe a truncation (the data chunk declares more bytes than the file holds).

    libsndfile silently shortens such files to what is present; a half-copied file would then pass as a
    shorter one, so we check the header ourselves. Returns None when the file is fine or not a plain RIFF WAV.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        chunks = _riff_chunks(f)
    for chunk_id, offset, chunk_size in chunks:
        if chunk_id == b"data" and chunk_size != 0xFFFFFFFF:  # 0xFFFFFFFF: streaming writers, size unknown
            available = size - offset
            if chunk_size > available:
                return f"truncated file: data chunk declares {chunk_size} bytes but only {available} are present"
    return None


def _riff_chunks(f) -> list[tuple[bytes, int, int]]:
    """(chunk id, offset of its payload, declared payload size) for each chunk of an open RIFF/WAVE file."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return []
    out, pos = [], 12
    while pos + 8 <= size:
        f.seek(pos)
        chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
        out.append((chunk_id, pos + 8, chunk_size))
        if chunk_id == b"data":
            break
        pos += 8 + chunk_size + (chunk_size & 1)  # chunks are word-aligned
    return out


def resample(wav: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample [C, T] (or [T]) float audio with libsoxr HQ. Returns float32 of the same rank."""
    if from_rate == to_rate:
        return np.asarray(wav, np.float32)
    x = np.asarray(wav, np.float32)
    if x.ndim == 1:
        return soxr.resample(x, from_rate, to_rate, quality="HQ").astype(np.float32)
    # soxr wants [T, C] (frames first).
    return np.ascontiguousarray(soxr.resample(x.T, from_rate, to_rate, quality="HQ").T, dtype=np.float32)


LOUD_PEAK = 4.0  # a float file peaking above this is almost surely mis-scaled (warned about)


def load_audio(
    path: str | os.PathLike,
    sample_rate: int,
    mono: bool = True,
    *,
    require_channels: int | None = None,
) -> np.ndarray:
    """Read an audio file as float32 [C, T] at `sample_rate` ([1, T] when `mono`).

    Args:
      path: any format libsndfile reads (WAV, FLAC, OGG, ...).
      sample_rate: target rate; other rates are resampled with soxr HQ (logged).
      mono: average all channels into one (logged when the file has several).
      require_channels: if set, the file must have exactly this many channels (e.g. 2 for the
        moshi-finetune stereo layout), checked before any downmix.
    Raises:
      AudioError naming the file and the problem.
    """
    p = Path(path)
    if not p.exists():
        raise AudioError(f"{p}: audio file not found")
    if not p.is_file():
        raise AudioError(f"{p}: not a regular file")
    try:
        truncated = _wav_truncation(p)
    except OSError as e:
        raise AudioError(f"{p}: cannot read audio file: {e}") from e
    if truncated:
        raise AudioError(f"{p}: {truncated}")
    try:
        with sf.SoundFile(str(p)) as f:
            file_rate, channels, declared = f.samplerate, f.channels, f.frames
            data = f.read(dtype="float32", always_2d=True)  # [T, C]
    except (sf.SoundFileError, RuntimeError, OSError) as e:
        raise AudioError(f"{p}: cannot read audio (unreadable, corrupt or truncated file): {e}") from e
    if data.shape[0] < declared:
        raise AudioError(f"{p}: truncated file: header declares {declared} frames but only {data.shape[0]} decode")
    if require_channels is not None and channels != require_channels:
        raise AudioError(f"{p}: expected {require_channels} channels, got {channels}")
    if data.shape[0] == 0:
        raise AudioError(f"{p}: empty audio (0 samples)")
    if not np.all(np.isfinite(data)):
        bad = int(np.sum(~np.isfinite(data)))
        raise AudioError(f"{p}: {bad} non-finite samples (NaN or inf)")
    peak = float(np.max(np.abs(data)))
    if peak > LOUD_PEAK:
        log.warning("%s: peak amplitude %.3g is far above full scale (1.0): the audio is probably mis-scaled "
                    "(e.g. integer sample values stored as float); the models expect [-1, 1]", p, peak)
    wav = np.ascontiguousarray(data.T)  # [C, T]
    if mono and channels > 1:
        log.info("%s: downmixing %d channels to mono", p, channels)
        wav = wav.mean(axis=0, keepdims=True)
    if file_rate != sample_rate:
        log.info("%s: resampling %d Hz -> %d Hz (soxr HQ)", p, file_rate, sample_rate)
        wav = resample(wav, file_rate, sample_rate)
    return wav.astype(np.float32, copy=False)


def save_audio(path: str | os.PathLike, wav: np.ndarray, sample_rate: int) -> Path:
    """Write float audio [T] or [C, T] as a 32-bit float WAV (no clipping); creates parent directories."""
    x = np.asarray(wav)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise AudioError(f"{path}: audio to save must be [T] or [C, T], got shape {tuple(np.shape(wav))}")
    if x.shape[1] == 0:
        raise AudioError(f"{path}: refusing to save empty audio")
    if not np.all(np.isfinite(x)):
        raise AudioError(f"{path}: refusing to save audio with NaN/inf samples")
    from moshi_jax.io_atomic import OutputPathError, atomic_path

    p = Path(path)
    try:
        with atomic_path(p) as tmp:  # the file appears complete or not at all
            sf.write(str(tmp), np.ascontiguousarray(x.T.astype(np.float32)), int(sample_rate), subtype="FLOAT",
                     format="WAV")
            # libsndfile's PEAK chunk (float WAV) carries the wall-clock write time: zero it so that the same
            # audio always gives the same bytes (reproducible datasets, content hashes).
            with open(tmp, "r+b") as f:
                for chunk_id, offset, chunk_size in _riff_chunks(f):
                    if chunk_id == b"PEAK" and chunk_size >= 8:
                        f.seek(offset + 4)  # payload: version (u32), timestamp (u32), per-channel peaks
                        f.write(b"\0\0\0\0")
    except OutputPathError as e:
        raise AudioError(str(e)) from None
    return p
