"""Grain input pipeline: tokenized datasets (see `records.py`) -> batches of LM token grids.

    ds = make_dataset(cfg.data, lm_cfg, train=True)      # grain IterDataset, infinite when train
    it = iter(ds)                                        # checkpointable: it.get_state() / it.set_state()
    batch = next(it)                     # {"codes": int32 [B, 1 + n_q, T], "source": int32 [B], "window": int32 [B]}

`codes` is UNdelayed (the LM applies its acoustic delays in its forward), -1 = no token (padding, missing
stream, missing alignment): the LM embeds it as zero and the loss ignores it. B is this host's share of
`data.batch_size` (global batch / process count), T = `data.seq_frames`.

Sampling (train): every record of every source is cut into ceil(L / T) windows (L its frames), so a file is
seen in proportion to its length, as moshi-finetune's fixed-duration chunks. The windows of each source are
shuffled with a seeded per-epoch permutation and repeated forever; the sources are interleaved
deterministically in proportion to their weights (`grain.MapDataset.mix`). Each drawn window is a random crop
of T frames of its record, with one offset for all streams (seeded by the element's position, so it is
reproducible and resumable); records shorter than T are padded with -1. Eval (`train=False`):
`data.eval_sources`, in order, every record cut into consecutive T-frame windows (the reference's chunking),
one pass, the last global batch padded with -1 rows (`source` and `window` -1).

Several processes (`jax.process_index()` / `jax.process_count()`): the stream above is cut into global batches
of `data.batch_size` and process p loads rows [p*B, (p+1)*B) of each (`distributed.process_batches`): the
processes' windows are disjoint and together cover every epoch, every process has the same number of eval
batches, and the global batches (so the training run) are the same whatever the process count. `window` is a
row's index in its source's window table (train) or in the eval sources' table (eval).

Stream layout: records store text + K codebooks per audio channel (see records.py). The LM wants
`1 + n_q` streams: Moshi (n_q = 2 * dep_q) takes dep_q codebooks of channel 0 (its voice) then dep_q of
channel 1 (the user); other models (n_q != 2 * dep_q, e.g. single-stream or ASR) take n_q codebooks of
channel 0. Mono records in a two-channel model leave the user streams at -1 (the reference would feed only
the model's streams). Text-only sources give grids whose audio streams are all -1.

Text/audio shift (`data.text_delay_frames = d`): d > 0 puts text d frames AFTER the audio it transcribes
(streaming ASR), d < 0 puts it |d| frames BEFORE (streaming TTS); the lagging stream group starts with |d|
frames of -1 and the record grows by |d| frames, so no token is cut off.

Input augmentation (train only, `data.input_time_masks` / `input_time_mask_frames` / `input_token_noise`): after
the crop, time spans of the audio streams the LM reads but does not predict become -1 and some of their tokens
are redrawn (`_InputAugment`, seeded like the crop). Loss targets (text, predicted audio) are never touched.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from moshi_jax.data.records import INDEX_NAME, RecordError, TokenizedDataset, decode_record

log = logging.getLogger(__name__)

PAD_VALUE = -1


class DataConfigError(ValueError):
    """A data source cannot feed this LM (missing, wrong vocabulary / codebooks, empty after sharding...)."""


def stream_layout(lm_cfg) -> tuple[int, int]:
    """(audio channels, codebooks per channel) the LM consumes: Moshi (n_q == 2 * dep_q) -> (2, dep_q)."""
    if lm_cfg.dep_q > 0 and lm_cfg.n_q == 2 * lm_cfg.dep_q:
        return 2, lm_cfg.dep_q
    return 1, lm_cfg.n_q


@dataclasses.dataclass(frozen=True)
class _Layout:
    """What a record must become: `1 + channels * codebooks` streams, text shifted by `text_delay`."""

    channels: int
    codebooks: int
    text_delay: int

    @property
    def num_streams(self) -> int:
        return 1 + self.channels * self.codebooks


def to_model_grid(codes: np.ndarray, kind: str, channels: int, layout: _Layout) -> np.ndarray:
    """One record -> the LM's streams [1 + n_q, L], int32.

    Audio records: codes [1 + C*K, F] with C = `channels` (K codebooks per channel). The grid has the text row,
    then `layout.codebooks` codebooks of each of the model's channels (-1 rows for a channel the record lacks),
    with text/audio shifted by `layout.text_delay` (L = F + |delay|). Text records: codes [1, F], L = F, every
    audio stream -1.
    """
    S, F = layout.num_streams, codes.shape[1]
    if kind == "text":
        grid = np.full((S, F), PAD_VALUE, np.int32)
        grid[0] = codes[0]
        return grid
    k_rec, kk = (codes.shape[0] - 1) // channels, layout.codebooks
    audio = np.full((S - 1, F), PAD_VALUE, np.int32)
    for c in range(min(channels, layout.channels)):
        audio[c * kk:(c + 1) * kk] = codes[1 + c * k_rec: 1 + c * k_rec + kk]
    d = layout.text_delay
    grid = np.full((S, F + abs(d)), PAD_VALUE, np.int32)
    text_at, audio_at = (d, 0) if d >= 0 else (0, -d)
    grid[0, text_at:text_at + F] = codes[0]
    grid[1:, audio_at:audio_at + F] = audio
    return grid


@dataclasses.dataclass
class _SourceInfo:
    """One opened source: its records' lengths (after the shift) and the metadata needed to read them."""

    path: str
    kind: str
    shards: list[str]
    lengths: np.ndarray  # int64 [R] frames of each record as a model grid
    channels: np.ndarray  # int32 [R] audio channels of each record (0 for text)


def _open_source(path: str, lm_cfg, layout: _Layout) -> _SourceInfo:
    p = Path(path)
    if not p.exists():
        raise DataConfigError(f"data source {path}: no such directory")
    if p.is_file() and p.suffix == ".jsonl":
        raise DataConfigError(f"data source {path} is a moshi-finetune manifest, not a tokenized dataset; "
                              f"run `moshi-jax data tokenize {path} -o OUT_DIR` and use OUT_DIR")
    try:
        ds = TokenizedDataset.open(p)
    except RecordError as e:
        raise DataConfigError(f"data source {path}: {e}") from e
    cfg = ds.index["config"]
    if len(ds) == 0:
        raise DataConfigError(f"data source {path} has no records (all files skipped? see its {INDEX_NAME})")
    text = cfg.get("text", {})
    vocab = text.get("vocab_size")
    if vocab is not None and vocab > lm_cfg.text_card:
        raise DataConfigError(f"data source {path}: text tokenizer has {vocab} pieces but the LM's text_card is "
                              f"{lm_cfg.text_card}; use the LM's own tokenizer")
    if ds.kind == "audio":
        if text.get("pad_id") is not None and (text["pad_id"], text["epad_id"]) != (
                lm_cfg.existing_text_padding_id, lm_cfg.existing_text_end_padding_id):
            raise DataConfigError(
                f"data source {path}: text stream uses PAD/EPAD ids {text['pad_id']}/{text['epad_id']}, the LM "
                f"expects {lm_cfg.existing_text_padding_id}/{lm_cfg.existing_text_end_padding_id}")
        mimi = cfg["mimi"]
        if mimi["codebook_size"] > lm_cfg.card:
            raise DataConfigError(f"data source {path}: Mimi codebook size {mimi['codebook_size']} exceeds the LM's "
                                  f"card {lm_cfg.card}")
        if mimi["num_codebooks"] < layout.codebooks:
            raise DataConfigError(f"data source {path} was tokenized with {mimi['num_codebooks']} codebooks per "
                                  f"channel; this LM needs {layout.codebooks} (re-tokenize with --num-codebooks "
                                  f"{layout.codebooks})")
    frames = np.array([r["num_frames"] for r in ds.records], np.int64)
    channels = np.array([r.get("channels", 0) for r in ds.records], np.int32)
    if ds.kind == "audio":
        frames = frames + abs(layout.text_delay)
        n_mono = int(np.sum(channels < layout.channels))
        if n_mono:
            log.warning("data source %s: %d of %d records have fewer audio channels (%d) than the LM's %d: their "
                        "missing streams are -1 (no input, no loss)", path, n_mono, len(ds), int(channels.min()),
                        layout.channels)
        if channels.max() > layout.channels:
            log.info("data source %s: the LM uses %d audio channel(s); extra channels of the records are ignored",
                     path, layout.channels)
    if frames.min() <= 0:
        raise DataConfigError(f"data source {path}: record {int(np.argmin(frames))} is empty")
    return _SourceInfo(str(p), ds.kind, ds.shard_paths, frames, channels)


class _Windows:
    """Index -> (source, record, window in record, index) for the windows of one or several sources
    (picklable); indices past the table, up to `size`, are padding: (-1, -1, -1, -1)."""

    def __init__(self, table: np.ndarray, size: int | None = None):
        self.table = table  # int64 [N, 3]
        self.size = len(table) if size is None else size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[int, int, int, int]:
        if i >= len(self.table):
            return -1, -1, -1, -1
        s, r, k = self.table[i]
        return int(s), int(r), int(k), int(i)


def _window_table(src_id: int, lengths: np.ndarray, T: int) -> np.ndarray:
    counts = -(-lengths // T)
    rec = np.repeat(np.arange(len(lengths)), counts)
    starts = np.cumsum(counts) - counts
    k = np.arange(len(rec)) - np.repeat(starts, counts)
    return np.stack([np.full(len(rec), src_id), rec, k], axis=1).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class _InputAugment:
    """Training-time noise on the grid rows `first_row`.. (the audio streams the LM reads but does not predict):
    `time_masks` spans of 1..`max_frames` frames set to -1, then tokens replaced by a uniform code in [0, card)
    with probability `token_noise`. Padding (-1) stays -1."""

    first_row: int
    time_masks: int
    max_frames: int
    token_noise: float
    card: int

    def __call__(self, window: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """window: int32 [S, T] -> a copy with the input rows augmented."""
        out = window.copy()
        rows = out[self.first_row:]  # a view: written in place
        T = out.shape[1]
        for _ in range(self.time_masks):
            width = int(rng.integers(1, self.max_frames + 1))
            start = int(rng.integers(0, max(T - width, 0) + 1))
            rows[:, start:start + width] = PAD_VALUE
        if self.token_noise > 0:
            hit = (rng.random(rows.shape) < self.token_noise) & (rows >= 0)
            rows[hit] = rng.integers(0, self.card, size=int(hit.sum()))
        return out


def _input_augment(data_cfg, lm_cfg) -> _InputAugment | None:
    """The configured augmentation of the LM's input-only audio streams, None when off. Raises DataConfigError
    when it is asked for and the LM predicts every stream it reads (nothing to augment without corrupting a
    loss target)."""
    masks = int(getattr(data_cfg, "input_time_masks", 0))
    noise = float(getattr(data_cfg, "input_token_noise", 0.0))
    if not masks and not noise:
        return None
    first = 1 + lm_cfg.dep_q  # text row, then the predicted audio streams, then the input-only ones
    if first > lm_cfg.n_q:
        raise DataConfigError(f"data.input_time_masks / input_token_noise augment the audio streams the LM reads "
                              f"but does not predict; this LM predicts all of its {lm_cfg.n_q} audio streams")
    return _InputAugment(first, masks, int(data_cfg.input_time_mask_frames), noise, lm_cfg.card)


class _MakeExample:
    """(source, record, window, index) -> {"codes": int32 [1 + n_q, T], "source": int32, "window": int32}; random
    crop when an rng is given (train), else the window's own T frames (eval; source -1: a padding row of -1).
    Record readers open lazily (per worker process)."""

    def __init__(self, sources: Sequence[_SourceInfo], layout: _Layout, T: int,
                 augment: _InputAugment | None = None):
        self.augment = augment  # train crops only
        self.kinds = [s.kind for s in sources]
        self.shards = [s.shards for s in sources]
        self.channels = [s.channels for s in sources]
        self.layout = layout
        self.T = T
        self._readers: list[Any] | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"] = None
        return state

    def _reader(self, s: int):
        if self._readers is None:
            self._readers = [grain.sources.ArrayRecordDataSource(sh) for sh in self.shards]
        return self._readers[s]

    def grid(self, s: int, r: int) -> np.ndarray:
        codes, _ = decode_record(self._reader(s)[r])
        return to_model_grid(codes, self.kinds[s], int(self.channels[s][r]), self.layout)

    def __call__(self, element: tuple[int, int, int, int], rng: np.random.Generator | None = None
                 ) -> dict[str, Any]:
        s, r, k, i = element
        if s < 0:
            return {"codes": np.full((self.layout.num_streams, self.T), PAD_VALUE, np.int32), "source": np.int32(-1),
                    "window": np.int32(-1)}
        grid = self.grid(s, r)
        L, T = grid.shape[1], self.T
        if rng is None:
            offset = k * T
        else:
            offset = int(rng.integers(0, max(L - T, 0) + 1))  # one offset for every stream
        window = grid[:, offset:offset + T]
        if window.shape[1] < T:
            window = np.pad(window, ((0, 0), (0, T - window.shape[1])), constant_values=PAD_VALUE)
        if rng is not None and self.augment is not None and self.kinds[s] == "audio":
            window = self.augment(window, rng)
        return {"codes": np.ascontiguousarray(window, np.int32), "source": np.int32(s), "window": np.int32(i)}


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def make_dataset(data_cfg, lm_cfg, train: bool, *, process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
    """The pipeline of `data_cfg` (moshi_jax.training.config.DataConfig) for `lm_cfg` (LMConfig).

    Yields {"codes": int32 [B, 1 + n_q, T], "source": int32 [B] (index of the source, -1 for eval padding),
    "window": int32 [B] (see the module doc)}, B = data_cfg.batch_size / process_count: this process's rows of
    each global batch. Train: infinite, shuffled, mixed by weight, random crops. Eval: data_cfg.eval_sources,
    one ordered pass. Raises DataConfigError for unusable sources.
    """
    import jax

    from moshi_jax.training import distributed

    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if data_cfg.batch_size % pc:
        raise DataConfigError(f"data.batch_size {data_cfg.batch_size} is not divisible by the {pc} processes")
    T = data_cfg.seq_frames
    channels, codebooks = stream_layout(lm_cfg)
    layout = _Layout(channels, codebooks, int(getattr(data_cfg, "text_delay_frames", 0)))
    sources = data_cfg.sources if train else data_cfg.eval_sources
    if not sources:
        raise DataConfigError(f"data.{'sources' if train else 'eval_sources'} is empty")
    infos = [_open_source(s.path, lm_cfg, layout) for s in sources]
    make = _MakeExample(infos, layout, T, _input_augment(data_cfg, lm_cfg) if train else None)
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)  # elements are this process's batches

    if not train:
        table = np.concatenate([_window_table(i, info.lengths, T) for i, info in enumerate(infos)])
        padded = -(-len(table) // data_cfg.batch_size) * data_cfg.batch_size  # whole global batches
        ds = grain.MapDataset.source(_Windows(table, padded)).map(make)
        ds = distributed.process_batches(ds, data_cfg.batch_size, pi, pc).to_iter_dataset(read)
        return _maybe_workers(ds, data_cfg)

    per_source = []
    for i, info in enumerate(infos):
        windows = grain.MapDataset.source(_Windows(_window_table(i, info.lengths, T)))
        # shuffle then repeat: grain reshuffles every epoch (epoch-dependent seed).
        per_source.append(windows.shuffle(seed=_seed(data_cfg.seed, i)).repeat(None))
    weights = [s.weight for s in sources]
    ds = per_source[0] if len(per_source) == 1 else grain.MapDataset.mix(per_source, [w / sum(weights)
                                                                                    for w in weights])
    ds = ds.random_map(make, seed=_seed(data_cfg.seed, 1 << 20))  # crop seeded by the global position
    ds = distributed.process_batches(ds, data_cfg.batch_size, pi, pc).to_iter_dataset(read)
    return _maybe_workers(ds, data_cfg)


def _maybe_workers(ds: grain.IterDataset, data_cfg) -> grain.IterDataset:
    if data_cfg.num_workers > 0:
        from absl import flags

        # grain 0.2.18 reads an absl flag in mp_prefetch and fails when the program never parsed absl flags
        # (grain issue #1355, fixed upstream by PR #1361): mark them parsed, keeping every default.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # Worker processes build batches ahead of the train step; grain checkpoints their positions too.
        return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers,
                                                           per_worker_buffer_size=2))
    return ds


def describe(data_cfg, lm_cfg) -> dict[str, Any]:
    """Summary of the training sources (records, frames, windows, hours) for logs and reports."""
    channels, codebooks = stream_layout(lm_cfg)
    layout = _Layout(channels, codebooks, int(getattr(data_cfg, "text_delay_frames", 0)))
    out = {}
    for s in data_cfg.sources:
        info = _open_source(s.path, lm_cfg, layout)
        out[s.path] = {"kind": info.kind, "weight": s.weight, "records": len(info.lengths),
                       "frames": int(info.lengths.sum()),
                       "windows": int(np.sum(-(-info.lengths // data_cfg.seq_frames))),
                       "hours": float(info.lengths.sum()) / 12.5 / 3600}
    return out


__all__ = ["DataConfigError", "PAD_VALUE", "describe", "make_dataset", "stream_layout", "to_model_grid"]
