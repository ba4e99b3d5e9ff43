"""The tokenize job: a moshi-finetune dataset (manifest + stereo audio + word alignments) -> ArrayRecord shards
of Mimi codes and the Inner Monologue text stream, so training never runs the codec.

    index = tokenize_dataset("data/train.jsonl", "data/train_tok", mimi_weights="tokenizer-...safetensors",
                             tokenizer="tokenizer_spm_32k_3.model")
    moshi-jax data tokenize data/train.jsonl -o data/train_tok --mimi-weights ... --tokenizer ...

Input (moshi-finetune layout): a `.jsonl` manifest of {"path", "duration"} (paths relative to the manifest's
directory), stereo audio (channel 0 = the model's voice -> streams 1..K, channel 1 = the user -> streams
K+1..2K), and next to each audio file a `.json` {"alignments": [[word, [start_s, end_s], speaker], ...]}.
As the reference: a file without alignment json gets a text stream of -1 (no text input, no text loss);
words of speakers other than the main one are dropped (keep_main_only). Mono files are rejected unless
`allow_mono` (then only the model's streams exist, as the reference's encode of a mono file gives).

Mimi runs batched and jitted over fixed-size chunks: B lanes, each streaming one channel of one file with
the codec's explicit state; a lane that finishes a channel is reset and takes the next one. Every call has
the same shapes, so the encoder compiles once, and the result equals encoding each channel on its own.

Bad data never becomes tokens: unreadable / truncated / empty audio, a sample rate other than Mimi's when
resampling is disabled, mono where stereo is required, more than two channels, a manifest duration that
disagrees with the audio, malformed alignment files, words outside the audio or with unknown speaker labels
are each reported with the file name and then skipped (`on_error="skip"`, listed in index.json) or fatal
(`on_error="fail"`, a `TokenizeError`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moshi_jax.data.records import INDEX_NAME, ShardWriter, TokenizedDataset, write_index

log = logging.getLogger(__name__)

ON_ERROR = ("skip", "fail")
MAIN_SPEAKER = "SPEAKER_MAIN"
TEXT_PAD_ID, TEXT_EPAD_ID = 3, 0  # the Moshi LM's existing_text_padding_id / existing_text_end_padding_id


class TokenizeError(ValueError):
    """Bad input data (names the file and the problem) or an unusable job configuration."""


class NothingProducedError(TokenizeError):
    """The job would produce an empty dataset (empty manifest, every entry bad): nothing is written."""


def check_output_dir(out: str | Path) -> Path:
    """A dataset output folder: creatable, and when it exists, a previous dataset (replaced as a whole) or
    empty; any other folder is refused rather than deleted. Raises TokenizeError."""
    from moshi_jax.io_atomic import OutputPathError, check_output_path

    try:
        out = check_output_path(out, "dir")
    except OutputPathError as e:
        raise TokenizeError(str(e)) from None
    if out.is_dir():
        foreign = [p.name for p in out.iterdir() if not (p.name in (INDEX_NAME, INDEX_NAME + ".tmp") or
                                                         p.name.startswith("shard-"))]
        if foreign:
            raise TokenizeError(f"{out} exists and is not a tokenized dataset (it holds {sorted(foreign)[:5]}); "
                                "refusing to replace it: give a new or empty folder")
    return out


def _report_bad_lines(manifest, bad: list[dict[str, Any]], limit: int = 20) -> None:
    """Malformed manifest lines on the console (index.json lists them all too)."""
    for b in bad[:limit]:
        log.warning("%s:%d: %s", manifest, b["line"], b["reason"])
    if len(bad) > limit:
        log.warning("... and %d more malformed manifest lines (all listed in the index's \"skipped\")",
                    len(bad) - limit)


@dataclasses.dataclass(frozen=True)
class TokenizeOptions:
    num_codebooks: int = 8  # Mimi codebooks per channel (Moshi: 8)
    batch_size: int = 8  # Mimi lanes (channels encoded together)
    chunk_frames: int = 25  # 80 ms frames per jitted encoder call (2 s)
    on_error: str = "skip"  # skip | fail
    allow_mono: bool = False  # accept mono files (user streams absent) instead of rejecting them
    resample: bool = True  # resample other rates to 24 kHz; False: such files are bad data
    main_speaker: str = MAIN_SPEAKER
    # Speaker labels accepted in alignments (others are bad data); None: only `main_speaker`.
    speakers: tuple[str, ...] | None = None
    records_per_shard: int = 1024
    progress: bool = True
    # A RANDOM Mimi's codebooks are far from its latents, so it gives (nearly) one code per level whatever the
    # audio. With this on, a random codec's codebooks are first fitted to this dataset's latent statistics
    # (see `calibrate_codebooks`) so the codes carry information. Never applied to loaded weights.
    calibrate_random: bool = True
    calibration_seconds: float = 60.0
    # Every word of the text stream opens with EPAD (interleaver.text_stream's `epad_every_word`): the layout
    # the TTS state machine feeds, for TTS training. Off: moshi-finetune's stream (an EPAD only after a PAD).
    epad_every_word: bool = False

    def __post_init__(self):
        if self.on_error not in ON_ERROR:
            raise TokenizeError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        for name in ("num_codebooks", "batch_size", "chunk_frames", "records_per_shard"):
            if getattr(self, name) < 1:
                raise TokenizeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise TokenizeError(f"batch_size must be >= 2 (one stereo file needs two lanes), got {self.batch_size}")

    @property
    def allowed_speakers(self) -> tuple[str, ...]:
        return tuple(self.speakers) if self.speakers else (self.main_speaker,)


# ----------------------------------------------------------------------------------------------- manifest


@dataclasses.dataclass(frozen=True)
class Entry:
    """One manifest line."""

    line: int  # 1-based line number in the manifest
    rel_path: str  # as written in the manifest
    path: Path  # resolved
    duration: float


def read_manifest(manifest: str | Path) -> tuple[list[Entry], list[dict[str, Any]]]:
    """Entries of a moshi-finetune `.jsonl` manifest, and the bad lines as {"path", "line", "reason"}."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise TokenizeError(f"manifest not found: {manifest}")
    entries, bad = [], []
    for i, raw in enumerate(manifest.read_text().splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{manifest}:{i}"
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as e:
            bad.append({"path": where, "line": i, "reason": f"manifest line is not JSON: {e}"})
            continue
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            bad.append({"path": where, "line": i, "reason": 'manifest line lacks a string "path"'})
            continue
        duration = item.get("duration")
        if not isinstance(duration, int | float) or isinstance(duration, bool) or not duration > 0:
            bad.append({"path": item["path"], "line": i,
                        "reason": f'manifest "duration" must be a positive number of seconds, got {duration!r}'})
            continue
        p = Path(item["path"])
        entries.append(Entry(i, item["path"], p if p.is_absolute() else manifest.parent / p, float(duration)))
    return entries, bad


# ----------------------------------------------------------------------------------------------- one file


@dataclasses.dataclass
class LoadedFile:
    entry: Entry
    wav: np.ndarray  # float32 [C, T] at the codec's rate
    num_frames: int
    text: np.ndarray  # int32 [num_frames] (-1 everywhere when there is no alignment file)
    has_text: bool  # a real text stream (alignment file present and a tokenizer given)
    has_alignment: bool
    num_words: int


class BadFile(Exception):
    def __init__(self, entry: Entry, reason: str):
        super().__init__(f"{entry.path}: {reason}")
        self.entry, self.reason = entry, reason


def _alignment_path(audio: Path) -> Path:
    return audio.with_suffix(".json")


def load_file(entry: Entry, *, sample_rate: int, frame_rate: float, opts: TokenizeOptions,
              word_tokens: Callable[[str], list[int]] | None) -> LoadedFile:
    """Read, check and prepare one manifest entry. Raises BadFile with the reason."""
    import soundfile as sf

    from moshi_jax.audio import AudioError, load_audio

    try:
        info = sf.info(str(entry.path))
    except (sf.SoundFileError, RuntimeError, OSError) as e:
        if not entry.path.exists():
            raise BadFile(entry, "audio file not found") from None
        raise BadFile(entry, f"cannot read audio (unreadable or corrupt file): {e}") from None
    if info.samplerate != sample_rate and not opts.resample:
        raise BadFile(entry, f"sample rate {info.samplerate} Hz, expected {sample_rate} Hz (resampling disabled)")
    if info.channels > 2:
        raise BadFile(entry, f"{info.channels} channels; expected stereo (channel 0 = model, channel 1 = user)")
    if info.channels == 1 and not opts.allow_mono:
        raise BadFile(entry, "mono audio where stereo is required (channel 0 = model, channel 1 = user); "
                             "pass --allow-mono to tokenize it with the model's streams only")
    try:
        wav = load_audio(entry.path, sample_rate, mono=False)
    except AudioError as e:
        raise BadFile(entry, str(e).removeprefix(f"{entry.path}: ")) from None
    actual = wav.shape[1] / sample_rate
    tolerance = max(0.1, 0.01 * entry.duration)
    if abs(actual - entry.duration) > tolerance:
        raise BadFile(entry, f"manifest duration {entry.duration:.3f} s but the audio lasts {actual:.3f} s "
                             "(truncated file or stale manifest)")
    frame_size = int(round(sample_rate / frame_rate))
    num_frames = -(-wav.shape[1] // frame_size)
    alignments = _read_alignments(entry)
    if alignments is None:
        text = np.full((num_frames,), -1, np.int32)
        return LoadedFile(entry, wav, num_frames, text, False, False, 0)
    alignments = _check_alignments(entry, alignments, actual, opts)
    if word_tokens is None:  # alignments but no tokenizer: the job logged this once; the text stays -1
        return LoadedFile(entry, wav, num_frames, np.full((num_frames,), -1, np.int32), False, True,
                          len(alignments))
    text = _text_stream(alignments, num_frames, word_tokens, frame_rate, opts)
    return LoadedFile(entry, wav, num_frames, text, True, True, len(alignments))


def _read_alignments(entry: Entry) -> list | None:
    """The raw "alignments" list of the sibling .json, or None when the file has none (no transcript)."""
    path = _alignment_path(entry.path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadFile(entry, f"alignment file {path.name} is not readable JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("alignments"), list):
        raise BadFile(entry, f'alignment file {path.name} has no "alignments" list')
    return data["alignments"]


def _check_alignments(entry: Entry, alignments: list, duration: float, opts: TokenizeOptions) -> list:
    """Well-formed entries inside the audio (one frame of slack), with known speaker labels -> clean tuples."""
    from moshi_jax.data import interleaver

    try:
        return interleaver.validate_alignments(alignments, duration, speakers=opts.allowed_speakers)
    except interleaver.AlignmentError as e:
        raise BadFile(entry, f"{_alignment_path(entry.path).name}: {e}") from None


def _text_stream(alignments: list, num_frames: int, word_tokens, frame_rate: float, opts: TokenizeOptions):
    from moshi_jax.data import interleaver

    return np.asarray(interleaver.text_stream(alignments, num_frames, word_tokens, frame_rate=frame_rate,
                                              pad_id=TEXT_PAD_ID, epad_id=TEXT_EPAD_ID,
                                              main_speaker=opts.main_speaker, keep_main_only=True,
                                              epad_every_word=opts.epad_every_word), np.int32)


# ----------------------------------------------------------------------------------------------- Mimi lanes


@dataclasses.dataclass
class _Job:
    file: LoadedFile
    channel: int
    done: int = 0  # frames encoded so far


class LaneEncoder:
    """Encodes many (file, channel) signals with B parallel streaming lanes of one jitted Mimi chunk call.

    Every call has shape [B, 1, chunk_frames * frame_size]. A lane that finished its signal is reset (the
    codec's per-lane state reset) and starts the next one at the next chunk; idle lanes encode silence
    that is thrown away.
    """

    def __init__(self, codec, params, batch_size: int, num_codebooks: int, chunk_frames: int):
        self.codec, self.params = codec, params
        self.B, self.K, self.n = batch_size, num_codebooks, chunk_frames
        self.frame = codec.cfg.frame_size

    def run(self, files: Iterator[LoadedFile], on_done: Callable[[LoadedFile, np.ndarray], None],
            progress: Callable[[int], None] | None = None) -> None:
        """Encode every channel of every file; `on_done(file, codes [C, K, F])` when a file is complete."""
        B, n, fs = self.B, self.n, self.frame
        lanes: list[_Job | None] = [None] * B
        pending: dict[int, list] = {}  # id(file) -> per-channel code chunks
        remaining: dict[int, int] = {}  # id(file) -> channels still encoding
        queue: collections.deque[_Job] = collections.deque()
        state = self.codec.init_state(B, self.K)
        exhausted = False
        while True:
            fresh = np.zeros((B,), bool)
            for i in range(B):
                if lanes[i] is not None:
                    continue
                while not queue and not exhausted:
                    f = next(files, None)
                    if f is None:
                        exhausted = True
                        break
                    pending[id(f)] = [[] for _ in range(f.wav.shape[0])]
                    remaining[id(f)] = f.wav.shape[0]
                    queue.extend(_Job(f, c) for c in range(f.wav.shape[0]))
                if queue:
                    lanes[i] = queue.popleft()
                    fresh[i] = True
            if all(job is None for job in lanes):
                return
            if fresh.any():
                state = self.codec.reset(state, fresh)
            chunk = np.zeros((B, 1, n * fs), np.float32)
            for i, job in enumerate(lanes):
                if job is not None:
                    seg = job.file.wav[job.channel, job.done * fs:(job.done + n) * fs]
                    chunk[i, 0, :seg.shape[0]] = seg
            state, codes = self.codec.encode_chunk(self.params, state, chunk)
            codes = np.asarray(codes)  # [B, K, n]
            for i, job in enumerate(lanes):
                if job is None:
                    continue
                f = job.file
                take = min(n, f.num_frames - job.done)
                pending[id(f)][job.channel].append(codes[i, :, :take])
                job.done += take
                if progress is not None:
                    progress(take)
                if job.done >= f.num_frames:
                    lanes[i] = None
                    remaining[id(f)] -= 1
                    if remaining[id(f)] == 0:
                        out = np.stack([np.concatenate(ch, axis=-1) for ch in pending.pop(id(f))])
                        del remaining[id(f)]
                        on_done(f, out)


# ----------------------------------------------------------------------------------------------- random codec


def calibration_audio(entries: Sequence[Entry], sample_rate: int, seconds: float = 60.0,
                      window: float = 10.0) -> np.ndarray | None:
    """Up to `seconds` of the manifest's audio (every channel, in manifest order) as fixed windows
    float32 [n, 1, window * sample_rate] (one compile); unreadable files are passed over (the tokenize
    pass reports them). None when no audio could be read."""
    from moshi_jax.audio import AudioError, load_audio

    win = int(window * sample_rate)
    budget = max(1, int(round(seconds / window)))
    out: list[np.ndarray] = []
    tail: list[np.ndarray] = []  # pieces shorter than a window, used only when nothing else is available
    for e in entries:
        try:
            wav = load_audio(e.path, sample_rate, mono=False)
        except AudioError:
            continue
        for ch in wav:
            for i in range(0, ch.shape[0], win):
                piece = ch[i:i + win]
                (out if piece.shape[0] == win else tail).append(piece)
        if len(out) >= budget:
            break
    if not out:
        out = [np.pad(p, (0, win - p.shape[0])) for p in tail[:budget]]
    return np.stack(out[:budget])[:, None].astype(np.float32) if out else None


def calibrate_codebooks(codec, params: dict, audio: np.ndarray, seed: int = 0) -> dict:
    """A random Mimi's params with codebooks fitted to its own latents on `audio` [n, 1, T].

    For each RVQ level (semantic, then acoustic), on the residual that reaches it: centroids = residual mean +
    per-dimension std * a random direction of norm sqrt(codebook_dim). Equal-norm random directions make the
    nearest centroid a function of the input's direction (random-hyperplane hashing) instead of always the
    smallest centroid; fitting each level to its residual keeps every level informative. Deterministic.
    """
    import jax.numpy as jnp

    latent = np.asarray(codec.encode_to_latent(params, audio), np.float64)  # [n, D, F]
    x = latent.transpose(0, 2, 1).reshape(-1, latent.shape[1])
    rng = np.random.default_rng(seed)
    quantizer = dict(params["quantizer"])
    for name in ("semantic", "acoustic"):
        rvq = dict(quantizer[name])
        # Per-level arrays `codebook_<i>` [bins, codebook_dim] (or one stacked `codebooks` [levels, ...]).
        keys = sorted((k for k in rvq if k.startswith("codebook_")), key=lambda k: int(k.split("_")[1]))
        books = [np.array(rvq[k], np.float64) for k in keys] if keys else list(np.array(rvq["codebooks"], np.float64))
        residual = x @ np.asarray(rvq["input_proj"], np.float64)
        for book in books:
            bins, cdim = book.shape
            z = rng.standard_normal((bins, cdim))
            z *= math.sqrt(cdim) / np.linalg.norm(z, axis=1, keepdims=True)
            book[:] = residual.mean(0) + (residual.std(0) + 1e-6) * z
            scores = np.sum(book ** 2, axis=1)[None] - 2.0 * residual @ book.T
            residual = residual - book[np.argmin(scores, axis=1)]
        if keys:
            rvq.update({k: jnp.asarray(b, jnp.float32) for k, b in zip(keys, books, strict=True)})
        else:
            rvq["codebooks"] = jnp.asarray(np.stack(books), jnp.float32)
        quantizer[name] = rvq
    return {**params, "quantizer": quantizer}


# ----------------------------------------------------------------------------------------------- the job


def mimi_config(preset: str):
    """MimiConfig of a preset: 'released' (the released codec) or 'tiny' (smoke tests)."""
    from moshi_jax.mimi.config import MimiConfig

    if preset not in ("released", "tiny"):
        raise TokenizeError(f"Mimi preset must be 'released' or 'tiny', got {preset!r}")
    return MimiConfig() if preset == "released" else MimiConfig.tiny()


def _codec_config(weights, preset: str):
    """A codec trained by `moshi-jax train mimi*` carries its config beside its weights; else the preset's."""
    from moshi_jax.mimi import checkpoint as mimi_ckpt

    try:
        return mimi_ckpt.config_beside(weights) or mimi_config(preset)
    except ValueError as e:
        raise TokenizeError(str(e)) from e


def load_mimi(weights: str | Path | None = None, preset: str = "released", seed: int = 0):
    """(codec, params, description dict). Without weights: a seeded random Mimi, with a loud warning."""
    from moshi_jax.mimi import checkpoint as mimi_ckpt
    from moshi_jax.mimi.model import MimiCodec

    cfg = _codec_config(weights, preset)
    codec = MimiCodec(cfg)
    try:
        params = mimi_ckpt.load_or_random(weights, cfg, seed, flag="--mimi-weights",
                                          consequence="the audio tokens are NOT the released codec's (smoke "
                                                      "tests and demos only)")
    except ValueError as e:
        raise TokenizeError(str(e)) from e
    desc = {"preset": preset, "weights": str(weights) if weights else None, "random": weights is None,
            "seed": seed if weights is None else None, "sample_rate": cfg.sample_rate, "frame_rate": cfg.frame_rate,
            "codebook_size": cfg.bins}
    return codec, params, desc


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_tokenizer(tokenizer) -> tuple[Any, dict[str, Any]]:
    """A TextTokenizer (from a path or as given) and its description for the index."""
    from moshi_jax.lm.tokenizer import TextTokenizer

    if isinstance(tokenizer, TextTokenizer):
        return tokenizer, {"path": None, "vocab_size": tokenizer.vocab_size}
    path = Path(tokenizer)
    try:
        tok = TextTokenizer.load(path)
    except ValueError as e:
        raise TokenizeError(str(e)) from e
    return tok, {"path": str(path), "sha256": _file_sha256(path), "vocab_size": tok.vocab_size}


def tokenize_dataset(manifest: str | Path, out_dir: str | Path, *, mimi_weights: str | Path | None = None,
                     mimi_preset: str = "released", mimi_seed: int = 0, tokenizer=None,
                     options: TokenizeOptions | None = None, mimi=None) -> Path:
    """Tokenize the dataset of `manifest` into `out_dir` (see the module docstring). Returns index.json's path.

    `tokenizer`: SentencePiece `.model` path or a `moshi_jax.lm.tokenizer.TextTokenizer` (None: every text
    stream is -1, with a warning). `mimi`: an already built (codec, params, description) to reuse.
    The dataset is written into a temporary sibling folder that replaces `out_dir` only when complete: a
    failure leaves an earlier dataset there intact. No usable entry at all is a NothingProducedError.
    """
    opts = options or TokenizeOptions()
    t0 = time.perf_counter()
    out = check_output_dir(out_dir)
    entries, skipped = read_manifest(manifest)
    _report_bad_lines(manifest, skipped)
    num_manifest_entries = len(entries) + len(skipped)
    if skipped and opts.on_error == "fail":
        s = skipped[0]
        raise TokenizeError(f"{s['path']} (manifest line {s['line']}): {s['reason']}")
    if not entries:
        raise NothingProducedError(f"{manifest}: no usable entries (" + (
            f"all {len(skipped)} lines are malformed" if skipped else "the manifest is empty") + "); nothing written")
    # the tokenizer first: a bad path fails before the (slow) codec is built
    word_tokens, text_desc = None, {"path": None, "vocab_size": None}
    if tokenizer is not None:
        tok, text_desc = _load_tokenizer(tokenizer)
        word_tokens = lambda w: tok.encode(w.strip())  # noqa: E731 - each word alone, no BOS (reference)
    else:
        log.warning("no text tokenizer given: every text stream will be -1 (no text input, no text loss)")
    try:
        (mimi[0].cfg if mimi is not None else _codec_config(mimi_weights, mimi_preset)
         ).check_num_codebooks(opts.num_codebooks)
    except ValueError as e:
        raise TokenizeError(f"--num-codebooks: {e}") from e
    codec, params, mimi_desc = mimi if mimi is not None else load_mimi(mimi_weights, mimi_preset, mimi_seed)
    cfg = codec.cfg
    if mimi_desc.get("random") and opts.calibrate_random:
        audio = calibration_audio(entries, cfg.sample_rate, opts.calibration_seconds)
        if audio is not None:
            params = calibrate_codebooks(codec, params, audio, mimi_desc.get("seed") or 0)
            mimi_desc = dict(mimi_desc, calibrated_codebooks={"seconds": audio.shape[0] * audio.shape[-1] /
                                                              cfg.sample_rate})
            log.info("random Mimi: codebooks fitted to %.0f s of this dataset's latents (codes now depend on "
                     "the audio)", audio.shape[0] * audio.shape[-1] / cfg.sample_rate)
    text_desc.update(pad_id=TEXT_PAD_ID, epad_id=TEXT_EPAD_ID, main_speaker=opts.main_speaker, keep_main_only=True,
                     speakers=list(opts.allowed_speakers), epad_every_word=opts.epad_every_word)

    from moshi_jax.io_atomic import atomic_dir

    if (out / INDEX_NAME).exists():
        log.info("replacing the tokenized dataset in %s once the new one is complete", out)
    with atomic_dir(out) as tmp:
        index = _tokenize_into(tmp, out, str(Path(manifest)), entries, skipped, opts, codec,
                               params, mimi_desc, text_desc, word_tokens, num_manifest_entries, t0)
    return out / index.name


def _tokenize_into(out: Path, final: Path, manifest: str, entries, skipped, opts: TokenizeOptions, codec,
                   params, mimi_desc, text_desc, word_tokens, num_manifest_entries: int, t0: float) -> Path:
    """The encoding pass of `tokenize_dataset`, writing shards + index into `out` (the temporary folder)."""
    cfg = codec.cfg
    total_frames = sum(-(-int(round(e.duration * cfg.sample_rate)) // cfg.frame_size) * 2 for e in entries)
    records: list[dict[str, Any]] = []
    stats = collections.Counter()
    from tqdm import tqdm

    bar = tqdm(total=total_frames, desc="tokenize", unit="frame", disable=not opts.progress, dynamic_ncols=True)

    def fail_or_skip(bad: BadFile) -> None:
        if opts.on_error == "fail":
            raise TokenizeError(f"{bad.entry.path}: {bad.reason}")
        log.warning("skipping %s: %s", bad.entry.path, bad.reason)
        skipped.append({"path": bad.entry.rel_path, "line": bad.entry.line, "reason": bad.reason})
        bar.update(-(-int(round(bad.entry.duration * cfg.sample_rate)) // cfg.frame_size) * 2)

    def loaded_files() -> Iterator[LoadedFile]:
        # Reading + resampling + alignment work overlaps the (GIL-free) Mimi calls on a background thread.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            futures = collections.deque()
            it = iter(entries)
            for e in itertools.islice(it, 2 * opts.batch_size):
                futures.append(pool.submit(_load_or_bad, e))
            while futures:
                result = futures.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    futures.append(pool.submit(_load_or_bad, nxt))
                if isinstance(result, BadFile):
                    fail_or_skip(result)
                    continue
                if result.wav.shape[0] == 1:
                    bar.update(result.num_frames)  # the missing second channel is never encoded
                yield result

    def _load_or_bad(e: Entry):
        try:
            return load_file(e, sample_rate=cfg.sample_rate, frame_rate=cfg.frame_rate, opts=opts,
                             word_tokens=word_tokens)
        except BadFile as b:
            return b

    writer = ShardWriter(out, opts.records_per_shard)

    def on_done(f: LoadedFile, codes: np.ndarray) -> None:
        C, K, F = codes.shape
        grid = np.concatenate([f.text[None], codes.reshape(C * K, F)], axis=0)
        writer.write(grid, {"path": f.entry.rel_path, "line": f.entry.line})
        records.append({"path": f.entry.rel_path, "duration": f.wav.shape[1] / cfg.sample_rate, "num_frames": F,
                        "channels": C, "has_text": f.has_text, "has_alignment": f.has_alignment,
                        "words": f.num_words})
        stats["files_without_alignments"] += int(not f.has_alignment)
        stats["mono_files"] += int(C == 1)

    encoder = LaneEncoder(codec, params, opts.batch_size, opts.num_codebooks, opts.chunk_frames)
    try:
        encoder.run(loaded_files(), on_done, progress=bar.update)
    finally:
        bar.close()
        shards = writer.close()
    if not records:
        first = f" (first: {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
        raise NothingProducedError(f"no file could be tokenized: all {num_manifest_entries} manifest entries are "
                                   f"bad{first}; nothing written")
    mimi_desc = dict(mimi_desc, num_codebooks=opts.num_codebooks, chunk_frames=opts.chunk_frames)
    config = {"manifest": manifest, "mimi": mimi_desc, "text": text_desc,
              "allow_mono": opts.allow_mono, "resample": opts.resample}
    counts = {"manifest_entries": num_manifest_entries, "hours": sum(r["duration"] for r in records) / 3600,
              "files_without_alignments": stats["files_without_alignments"], "mono_files": stats["mono_files"],
              "seconds_taken": round(time.perf_counter() - t0, 3)}
    index = write_index(out, kind="audio", config=config, shards=shards, records=records, skipped=skipped,
                        counts=counts)
    log.info("tokenized %d files (%.2f h) into %s; skipped %d%s", len(records), counts["hours"], final,
             len(skipped), f" (see {final / index.name})" if skipped else "")
    if stats["files_without_alignments"]:
        log.warning("%d files have no alignment .json: their text stream is -1 (no text loss)",
                    stats["files_without_alignments"])
    return index


# ----------------------------------------------------------------------------------------------- text only


def read_text_documents(paths: Sequence[str | Path]) -> Iterator[tuple[str, str]]:
    """(where, text) per document: `.jsonl` files give one document per line ({"text": ...}); other files
    give one document per non-empty line."""
    for p in map(Path, paths):
        if not p.is_file():
            raise TokenizeError(f"text file not found: {p}")
        for i, line in enumerate(p.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            if p.suffix == ".jsonl":
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TokenizeError(f"{p}:{i}: not JSON: {e}") from e
                if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                    raise TokenizeError(f'{p}:{i}: expected {{"text": "..."}}')
                yield f"{p}:{i}", item["text"]
            else:
                yield f"{p}:{i}", line.strip()


def tokenize_text(inputs: Sequence[str | Path], out_dir: str | Path, tokenizer, *, add_bos_eos: bool = True,
                  records_per_shard: int = 4096) -> Path:
    """Text-only source: each document -> one record [1, L] of text tokens (BOS/EOS around it when the
    tokenizer defines them). Used for text batches mixed into audio training. Returns index.json's path."""
    from moshi_jax.io_atomic import atomic_dir

    final = check_output_dir(out_dir)
    for p in map(Path, inputs):
        if not p.is_file():
            raise TokenizeError(f"text file not found: {p}")
    tok, text_desc = _load_tokenizer(tokenizer)
    with atomic_dir(final) as tmp:
        index = _tokenize_text_into(tmp, inputs, tok, text_desc, add_bos_eos, records_per_shard)
    return final / index.name


def _tokenize_text_into(out: Path, inputs, tok, text_desc, add_bos_eos: bool, records_per_shard: int) -> Path:
    records = []
    with ShardWriter(out, records_per_shard) as w:
        for where, text in read_text_documents(inputs):
            ids = tok.encode(text)
            if add_bos_eos:
                ids = ([tok.bos_id] if tok.bos_id >= 0 else []) + ids + ([tok.eos_id] if tok.eos_id >= 0 else [])
            if not ids:
                continue
            w.write(np.asarray(ids, np.int32)[None], {"path": where})
            records.append({"path": where, "num_frames": len(ids), "channels": 0})
        shards = w.shards
    if not records:
        raise NothingProducedError(f"no text documents in {list(map(str, inputs))}; nothing written")
    config = {"inputs": [str(p) for p in inputs], "text": dict(text_desc, add_bos_eos=add_bos_eos)}
    index = write_index(out, kind="text", config=config, shards=shards, records=records, skipped=[])
    log.info("tokenized %d text documents (%d tokens) into %s", len(records), sum(r["num_frames"] for r in records),
             out)
    return index


# ----------------------------------------------------------------------------------------------- built-in data


def train_sentencepiece(sentences: Iterable[str], path: str | Path, vocab_size: int = 512) -> Path:
    """A small unigram SentencePiece model with Moshi's special ids (unk 0 = EPAD slot, bos 1, eos 2, pad 3 =
    PAD), trained offline and deterministically. The vocabulary may come out smaller than `vocab_size` on a
    small corpus (never larger)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences)), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


BUILTIN_VERSION = 1  # bump when the built-in dataset's content changes
BUILTIN_ENTRIES = ("raw", "tokens", "text", "tokenizer.model", "builtin.json", "builtin.json.tmp")


def prepare_builtin_dataset(out_dir: str | Path, *, num_dialogues: int = 10, seconds: float = 15.0, seed: int = 0,
                            mimi_preset: str = "released", mimi_weights: str | Path | None = None,
                            mimi_seed: int = 0, num_codebooks: int = 8, vocab_size: int = 512,
                            batch_size: int = 8, chunk_frames: int = 25, progress: bool = True, mimi=None) -> Path:
    """The built-in training data, built offline: synthetic two-voice dialogues (eSpeak NG, moshi-finetune
    layout) in `out_dir/raw`, a SentencePiece model trained on their sentence corpus (`out_dir/tokenizer.model`,
    vocab <= `vocab_size`), the dialogues tokenized with Mimi (`out_dir/tokens`, returned) and a text-only
    source of the same corpus (`out_dir/text`). Without `mimi_weights` the codec is a seeded RANDOM Mimi
    (no weights can be downloaded here; logged loudly). Idempotent: a finished build with the same settings
    is reused as is. `mimi`: an already built (codec, params, description) from `load_mimi` to reuse (must
    match `mimi_preset` / `mimi_weights` / `mimi_seed`: they are what the reuse check compares).
    """
    from moshi_jax.data import speech_synth

    out = Path(out_dir)
    settings = {"version": BUILTIN_VERSION, "num_dialogues": num_dialogues, "seconds": seconds, "seed": seed,
                "mimi_preset": mimi_preset, "mimi_weights": str(mimi_weights) if mimi_weights else None,
                "mimi_seed": mimi_seed, "num_codebooks": num_codebooks, "vocab_size": vocab_size,
                "chunk_frames": chunk_frames}
    stamp = out / "builtin.json"
    tokens, text = out / "tokens", out / "text"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        try:
            TokenizedDataset.open(tokens), TokenizedDataset.open(text)
            log.info("built-in dataset already prepared in %s (reusing it)", out)
            return tokens
        except Exception as e:  # noqa: BLE001 - anything wrong with the old build: rebuild it
            log.info("rebuilding the built-in dataset in %s (%s)", out, e)
    from moshi_jax.io_atomic import OutputPathError, atomic_dir, check_output_path

    try:
        check_output_path(out, "dir")
    except OutputPathError as e:
        raise TokenizeError(str(e)) from None
    foreign = sorted(p.name for p in out.iterdir() if p.name not in BUILTIN_ENTRIES) if out.is_dir() else []
    if foreign:
        raise TokenizeError(f"{out} exists and is not a built-in dataset (it holds {foreign[:5]}); refusing to "
                            "replace it: give a new or empty folder")
    log.info("building the built-in dataset in %s: %d synthetic dialogues of %.0f s (eSpeak NG)", out,
             num_dialogues, seconds)
    if mimi_weights is None:
        log.info("no Mimi weights can be downloaded on this machine: the built-in dataset is tokenized with a "
                 "seeded random Mimi (%s config); pass mimi_weights for the released codec", mimi_preset)
    with atomic_dir(out) as tmp:  # an earlier build stays usable until this one is complete
        try:
            manifest = speech_synth.build_dialogue_dataset(tmp / "raw", num_dialogues, seconds, seed)
        except ValueError as e:  # bad sizes: checked there before any synthesis
            raise TokenizeError(str(e)) from None
        spm_path = train_sentencepiece(speech_synth.SENTENCES, tmp / "tokenizer.model", vocab_size)
        opts = TokenizeOptions(num_codebooks=num_codebooks, batch_size=batch_size, chunk_frames=chunk_frames,
                               on_error="fail", progress=progress)
        tokenize_dataset(manifest, tmp / "tokens", mimi_weights=mimi_weights, mimi_preset=mimi_preset,
                         mimi_seed=mimi_seed, tokenizer=spm_path, options=opts, mimi=mimi)
        corpus = tmp / "raw" / "sentences.txt"
        corpus.write_text("\n".join(speech_synth.SENTENCES) + "\n")
        tokenize_text([corpus], tmp / "text", spm_path)
        for index in (tmp / "tokens" / INDEX_NAME, tmp / "text" / INDEX_NAME):  # paths as they will be
            index.write_text(index.read_text().replace(json.dumps(str(tmp))[1:-1], json.dumps(str(out))[1:-1]))
        (tmp / "builtin.json").write_text(json.dumps(settings))
    return tokens
