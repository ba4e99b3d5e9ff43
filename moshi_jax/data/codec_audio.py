"""Audio for codec (Mimi) training: the built-in synthesized speech set, teachers, and the Grain pipeline.

    root = build_codec_dataset(run_dir / "codec_data")           # train/ and heldout/ folders of WAVs (cached)
    ds = make_codec_dataset(cfg.data, mimi_cfg, cfg.codec, train=True)   # grain IterDataset, checkpointable
    batch = next(iter(ds))   # {"wav": float32 [B, 1, T], "teacher": float32 [B, F, teacher_dim]}

A source (`data.sources` / `data.eval_sources`) is a folder of audio files (any format libsndfile reads,
resampled to 24 kHz mono). Train: every file of every source, shuffled per epoch and repeated, sources mixed
by weight, each draw a random crop of `seq_frames` 80 ms frames starting on a frame boundary (seeded by the
element's position: reproducible and resumable); shorter files are zero-padded. Eval: the first crop of
every file, in order,
whole global batches. Several processes: the global batches are the same whatever the process count (see
`make_codec_dataset`).

Teachers (semantic distillation targets, pooled to Mimi's 12.5 Hz, one row per code frame):
- `logmel` (default, offline): `logmel_teacher`, a fixed deterministic feature of the whole utterance
  (16 kHz log-mel, 25 ms / 10 ms, per-utterance mean-variance normalised, averaged over each 80 ms). It
  is a STAND-IN for WavLM: it carries phonetic/spectral-envelope content, not learnt semantics.
- `precomputed`: `<audio stem>.teacher.npy` beside each audio file, float [frames, teacher_dim] at any
  frame rate spanning the file (e.g. WavLM-large layer features at 50 Hz, computed offline on 16 kHz
  audio: `np.save("utt.teacher.npy", wavlm(utt_16k).last_hidden_state[0].numpy())`). The rate is
  inferred from the frame count and the audio length, and frames are averaged over each 80 ms window.

Built-in set: eSpeak NG renders every sentence of `speech_synth.SENTENCES` with each of 12 voices (rate and
pitch jittered per utterance); 10 voices are for training, 2 voices are HELD OUT (never trained on).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import grain
import numpy as np

from moshi_jax.audio import load_audio, resample, save_audio

log = logging.getLogger(__name__)

TRAIN_VOICES = ("en-us", "en-us+f3", "en-gb+m3", "en-us+m7", "en-gb+f4", "en-us+m1", "en-gb-x-rp+f2", "en-us+m4",
                "en-us+f1", "en-gb+m2")
HELDOUT_VOICES = ("en-us+m5", "en-gb+f5")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
_VERSION = 1


class CodecDataError(ValueError):
    """An unusable codec data source (missing folder, no audio, teacher features missing or mis-shaped)."""


# ----------------------------------------------------------------------------------------------- built-in set


def build_codec_dataset(out_dir: str | Path, seed: int = 0, sentences: int | None = None) -> Path:
    """Synthesize the built-in set into out_dir/{train,heldout}/*.wav (reused when already built with the same
    settings). `sentences` limits the sentences per voice (tests). Returns out_dir."""
    from moshi_jax.data import speech_synth as synth

    out = Path(out_dir)
    texts = synth.SENTENCES[:sentences] if sentences else synth.SENTENCES
    meta = {"version": _VERSION, "seed": seed, "sentences": len(texts), "train_voices": list(TRAIN_VOICES),
            "heldout_voices": list(HELDOUT_VOICES)}
    done = out / "dataset.json"
    if done.is_file() and json.loads(done.read_text()).get("settings") == meta:
        return out
    rng = np.random.default_rng(seed)
    seconds = {"train": 0.0, "heldout": 0.0}
    with synth.SpeechEngine() as engine:
        for split, voices in (("train", TRAIN_VOICES), ("heldout", HELDOUT_VOICES)):
            for v, voice in enumerate(voices):
                for s, text in enumerate(texts):
                    rate, pitch = int(rng.integers(140, 200)), int(rng.integers(30, 70))
                    audio = engine.synthesize(text, voice, rate_wpm=rate, pitch=pitch).audio
                    save_audio(out / split / f"v{v:02d}_s{s:03d}.wav", audio, synth.SAMPLE_RATE)
                    seconds[split] += len(audio) / synth.SAMPLE_RATE
    done.write_text(json.dumps({"settings": meta, "seconds": seconds}, indent=2))
    log.info("built-in codec set: %.0f s train (%d voices), %.0f s held out (%d voices) in %s", seconds["train"],
             len(TRAIN_VOICES), seconds["heldout"], len(HELDOUT_VOICES), out)
    return out


# ----------------------------------------------------------------------------------------------- teachers


def pool_to_frames(features: np.ndarray, duration_s: float, n_frames: int, frame_rate: float) -> np.ndarray:
    """Average feature rows [N, D] spanning `duration_s` into `n_frames` windows of 1 / frame_rate s:
    [n_frames, D] (windows past the features' end are zero)."""
    n = features.shape[0]
    if n == 0:
        raise CodecDataError("teacher features have no frames")
    t = (np.arange(n) + 0.5) * duration_s / n  # centre time of each feature row
    idx = np.floor(t * frame_rate).astype(np.int64)
    out = np.zeros((n_frames, features.shape[1]), np.float64)
    cnt = np.zeros((n_frames,), np.float64)
    keep = idx < n_frames
    np.add.at(out, idx[keep], features[keep])
    np.add.at(cnt, idx[keep], 1.0)
    return (out / np.maximum(cnt, 1.0)[:, None]).astype(np.float32)


def logmel_teacher(wav: np.ndarray, sample_rate: int, n_frames: int, frame_rate: float, n_mels: int) -> np.ndarray:
    """The built-in distillation target: [n_frames, n_mels] normalised 16 kHz log-mel of the whole utterance,
    averaged per code frame (see the module doc; deterministic, offline, a stand-in for WavLM)."""
    from moshi_jax.training.codec_loss import mel_filterbank

    x = resample(np.asarray(wav, np.float32), sample_rate, 16000) if sample_rate != 16000 else wav
    win, hop = 400, 160
    x = np.pad(x, (win // 2, win // 2))
    n = max(1, 1 + (len(x) - win) // hop)
    frames = np.lib.stride_tricks.sliding_window_view(x, win)[::hop][:n]
    spec = np.abs(np.fft.rfft(frames * np.hanning(win), n=512, axis=-1)) ** 2
    mel = np.log(spec @ mel_filterbank(16000, 512, n_mels).astype(np.float64) + 1e-6)
    mel = (mel - mel.mean(0)) / (mel.std(0) + 1e-5)
    return pool_to_frames(mel, len(wav) / sample_rate, n_frames, frame_rate)


def teacher_path(audio: Path) -> Path:
    return audio.with_name(audio.stem + ".teacher.npy")


def precomputed_teacher(audio: Path, duration_s: float, n_frames: int, frame_rate: float, dim: int) -> np.ndarray:
    path = teacher_path(audio)
    if not path.is_file():
        raise CodecDataError(f"codec.teacher=precomputed but {path} is missing (features [frames, {dim}] of {audio})")
    feats = np.load(path)
    if feats.ndim != 2 or feats.shape[1] != dim:
        raise CodecDataError(f"{path}: teacher features must be [frames, {dim}] (codec.teacher_dim), got "
                             f"{feats.shape}")
    if not np.all(np.isfinite(feats)):
        raise CodecDataError(f"{path}: teacher features contain NaN/inf")
    return pool_to_frames(feats.astype(np.float32), duration_s, n_frames, frame_rate)


# ----------------------------------------------------------------------------------------------- pipeline


def list_audio(folder: str | Path) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise CodecDataError(f"codec data source {root} is not a folder of audio files")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise CodecDataError(f"codec data source {root} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
    return files


class _MakeExample:
    """(file path, crop) -> {"wav": [1, T], "teacher": [F, D]}; picklable (grain workers)."""

    def __init__(self, frame_size: int, frames: int, frame_rate: float, sample_rate: int, teacher: str, dim: int):
        self.frame_size, self.frames, self.frame_rate, self.sample_rate = frame_size, frames, frame_rate, sample_rate
        self.teacher, self.dim = teacher, dim

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one small entry per file, process lifetime
    def _utterance(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        wav = load_audio(path, self.sample_rate)[0]
        n_frames = -(-len(wav) // self.frame_size)
        dur = len(wav) / self.sample_rate
        if self.teacher == "precomputed":
            feats = precomputed_teacher(Path(path), dur, n_frames, self.frame_rate, self.dim)
        else:
            feats = logmel_teacher(wav, self.sample_rate, n_frames, self.frame_rate, self.dim)
        return wav, feats

    def __call__(self, path: str, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        wav, feats = self._utterance(str(path))
        n_frames = feats.shape[0]
        start = int(rng.integers(0, max(1, n_frames - self.frames + 1))) if rng is not None else 0
        T = self.frames * self.frame_size
        seg = wav[start * self.frame_size:start * self.frame_size + T]
        out_wav = np.zeros((1, T), np.float32)
        out_wav[0, :len(seg)] = seg
        f = feats[start:start + self.frames]
        out_f = np.zeros((self.frames, self.dim), np.float32)
        out_f[:len(f)] = f
        return {"wav": out_wav, "teacher": out_f}


def make_codec_dataset(data_cfg, mimi_cfg, codec_cfg, train: bool, *, process_index: int | None = None,
                       process_count: int | None = None) -> grain.IterDataset:
    """Grain pipeline of audio crops (see the module doc): this process's rows of each global batch,
    {"wav": float32 [B, 1, T], "teacher": float32 [B, F, teacher_dim]}, B = data.batch_size / process count.

    The examples are laid out in one global order, the same for every process count, and cut into global batches
    of `data.batch_size` by `distributed.process_batches` (as the LM pipeline): process p loads rows
    [p*B, (p+1)*B) of each. So the global batches (and the run) do not depend on the process count, and every
    process has the same number of eval batches (the eval pass ends with its last whole global batch)."""
    import jax

    from moshi_jax.training import distributed

    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if data_cfg.batch_size % pc:
        raise CodecDataError(f"data.batch_size {data_cfg.batch_size} is not divisible by the {pc} processes")
    sources = data_cfg.sources if train else data_cfg.eval_sources
    if not sources:
        raise CodecDataError(f"data.{'sources' if train else 'eval_sources'} is empty")
    make = _MakeExample(mimi_cfg.frame_size, data_cfg.seq_frames, mimi_cfg.frame_rate, mimi_cfg.sample_rate,
                        codec_cfg.teacher, codec_cfg.teacher_dim)
    per_source = []
    for i, s in enumerate(sources):
        ds = grain.MapDataset.source([str(p) for p in list_audio(s.path)])
        per_source.append(ds.shuffle(seed=data_cfg.seed + 7919 * i).repeat(None) if train else ds)
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)  # elements are this process's batches
    if not train:
        ds = per_source[0] if len(per_source) == 1 else grain.MapDataset.concatenate(per_source)
        if len(ds) < data_cfg.batch_size:
            raise CodecDataError(f"data.eval_sources hold {len(ds)} audio files, fewer than one global batch "
                                 f"(data.batch_size {data_cfg.batch_size}): no eval batch")
        return distributed.process_batches(ds.map(make), data_cfg.batch_size, pi, pc).to_iter_dataset(read)
    weights = [s.weight for s in sources]
    ds = per_source[0] if len(per_source) == 1 else grain.MapDataset.mix(per_source, [w / sum(weights)
                                                                                    for w in weights])
    ds = ds.random_map(make, seed=data_cfg.seed + 104729)  # crop seeded by the global position
    return distributed.process_batches(ds, data_cfg.batch_size, pi, pc).to_iter_dataset(read)
