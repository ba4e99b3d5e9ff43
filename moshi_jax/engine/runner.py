"""File-level drivers of the engine (what `moshi-jax chat / asr / tts` run): one conversation fed frame by frame
exactly as a live client would (one `engine.step` per 80 ms frame, optionally paced at real time), text
printed as it comes, and per-frame latency statistics.

    result = chat_file(engine, params, wav)            # wav [T] float32 at engine.sample_rate
    result = transcribe_file(engine, params, wav)
    result = synthesize(engine, params, "some text")
    print(format_latency(result.latencies_ms))
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import jax
import numpy as np

from moshi_jax.engine.engine import Engine

log = logging.getLogger(__name__)
Printer = Callable[[str], None]


@dataclasses.dataclass
class RunResult:
    """What a file run produced. `words`: (text piece, time in seconds) as shown to a user."""

    pcm: np.ndarray  # [T] float32 output audio (empty for ASR)
    text: str  # the concatenated text pieces (PAD / EPAD skipped)
    words: list[tuple[str, float]]
    latencies_ms: np.ndarray  # [frames] wall time of each engine step (to its outputs on the host)
    compile_s: float  # time of the first (compiling) call, done on a throwaway state before the run
    frames: int

    @property
    def real_time_factor(self) -> float:
        """Processing time / audio time (< 1: faster than real time)."""
        return float(self.latencies_ms.sum() / (self.frames * 80.0)) if self.frames else float("nan")


def _warmup(engine: Engine, params) -> float:
    """Compile the step on a throwaway state (so the first live frame is not charged with compilation)."""
    t = time.perf_counter()
    state = engine.init_state(1)
    zeros = np.zeros((1, engine.frame_size), np.float32)
    _, out = engine.step_donated(params, state, zeros, np.ones(1, bool))  # the function the loop uses
    jax.block_until_ready(out)
    return time.perf_counter() - t


def _frames(wav: np.ndarray, frame_size: int, extra: int = 0) -> np.ndarray:
    """[T] -> [F, frame_size] (zero right-padding to whole frames, plus `extra` silent frames)."""
    wav = np.asarray(wav, np.float32).reshape(-1)
    if wav.size == 0:
        raise ValueError("input audio is empty")
    n = -(-wav.size // frame_size)
    out = np.zeros((n + extra, frame_size), np.float32)
    out.reshape(-1)[:wav.size] = wav
    return out


def _loop(engine: Engine, params, state, inputs: np.ndarray | None, n: int, on_out, realtime: bool,
          stop: Callable | None = None) -> np.ndarray:
    """Step `n` frames (inputs [n, frame_size] or silence); `on_out(i, out)` per frame. Returns latencies."""
    lat = []
    zeros = np.zeros((1, engine.frame_size), np.float32)
    active = np.ones(1, bool)
    t0 = time.perf_counter()
    for i in range(n):
        if realtime:  # pace as a live microphone: frame i is available at t0 + 80 ms * (i + 1)
            wait = t0 + (i + 1) * engine.frame_size / engine.sample_rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        t = time.perf_counter()
        frame = zeros if inputs is None else inputs[i][None]
        state, out = engine.step_donated(params, state, frame, active)
        out = jax.device_get(out)  # the host has the frame's audio and text: what a server would send
        lat.append((time.perf_counter() - t) * 1000.0)
        on_out(i, out)
        if stop is not None and stop(out):
            break
    return np.asarray(lat)


def _text_sink(engine: Engine, printer: Printer | None, time_of: Callable[[int, object], float]):
    pieces: list[str] = []
    words: list[tuple[str, float]] = []

    def add(i: int, out) -> None:
        if not bool(out.valid[0]):
            return
        piece = engine.text_piece(int(out.text_token[0]))
        if piece is None:
            return
        pieces.append(piece)
        words.append((piece, time_of(i, out)))
        if printer is not None:
            printer(piece)

    return pieces, words, add


def chat_file(engine: Engine, params, wav: np.ndarray, printer: Printer | None = None, realtime: bool = False
              ) -> RunResult:
    """Full duplex over a file: the user's audio frame by frame, Moshi's audio out (same length as the input:
    the frame Moshi says while the user's frame i arrives is at frame i; the first frame is silence)."""
    if engine.cfg.mode != "dialogue":
        raise ValueError(f"chat needs an engine in dialogue mode, got {engine.cfg.mode!r}")
    compile_s = _warmup(engine, params)
    frames = _frames(wav, engine.frame_size)
    out_pcm = np.zeros_like(frames)
    pieces, words, add_text = _text_sink(engine, printer, lambda i, o: i * 0.08)

    def on_out(i, out):
        out_pcm[i] = out.pcm[0]
        add_text(i, out)

    lat = _loop(engine, params, engine.init_state(1), frames, len(frames), on_out, realtime)
    return RunResult(out_pcm.reshape(-1), "".join(pieces), words, lat, compile_s, len(frames))


def transcribe_file(engine: Engine, params, wav: np.ndarray, printer: Printer | None = None,
                    realtime: bool = False, flush_frames: int | None = None, prefix_frames: int = 0) -> RunResult:
    """Streaming ASR over a file. `flush_frames` of silence follow the audio so the last words come out
    (default: the text delay + 12 frames, ~1 s, like the reference STT's end padding); `prefix_frames` of
    silence precede it (the reference's `audio_silence_prefix_seconds`). Word times are in the input file."""
    if engine.cfg.mode != "asr":
        raise ValueError(f"asr needs an engine in asr mode, got {engine.cfg.mode!r}")
    if prefix_frames < 0:
        raise ValueError(f"prefix_frames must be >= 0, got {prefix_frames}")
    compile_s = _warmup(engine, params)
    extra = engine.delay + 12 if flush_frames is None else flush_frames
    frames = _frames(wav, engine.frame_size, extra)
    frames = np.concatenate([np.zeros((prefix_frames, engine.frame_size), np.float32), frames])
    d = engine.delay + prefix_frames
    pieces, words, add_text = _text_sink(engine, printer, lambda i, o: (i - d) * 0.08)
    lat = _loop(engine, params, engine.init_state(1), frames, len(frames), add_text, realtime)
    return RunResult(np.zeros(0, np.float32), "".join(pieces), words, lat, compile_s, len(frames))


def synthesize(engine: Engine, params, text: str, printer: Printer | None = None, max_frames: int = 375,
               padding_between: int = 1, realtime: bool = False) -> RunResult:
    """Streaming TTS of `text`: frames until the state machine has fed every word and the audio of the last
    one (plus final padding) came out, or `max_frames`. Returns the audio frames that carry speech."""
    if engine.cfg.mode != "tts":
        raise ValueError(f"tts needs an engine in tts mode, got {engine.cfg.mode!r}")
    if not text.strip():
        raise ValueError("nothing to say: the text is empty")
    compile_s = _warmup(engine, params)
    state = engine.load_text(engine.init_state(1), 0, text, padding_between)
    chunks: list[np.ndarray] = []
    pieces, words, add_text = _text_sink(engine, printer, lambda i, o: i * 0.08)

    def on_out(i, out):
        if bool(out.audio_valid[0]):
            chunks.append(np.asarray(out.pcm[0]))
        add_text(i, out)

    lat = _loop(engine, params, state, None, max_frames, on_out, realtime, stop=lambda o: bool(o.done[0]))
    if len(lat) == max_frames:
        log.warning("TTS stopped at --max-frames %d before the end of the text", max_frames)
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return RunResult(pcm, "".join(pieces), words, lat, compile_s, len(lat))


def latency_percentiles(lat_ms: np.ndarray) -> dict[str, float]:
    lat = np.asarray(lat_ms, np.float64)
    return {"median": float(np.median(lat)), "p90": float(np.percentile(lat, 90)),
            "p99": float(np.percentile(lat, 99)), "max": float(lat.max()), "mean": float(lat.mean())}


def format_latency(lat_ms: np.ndarray, frame_ms: float = 80.0, bins: int = 10, width: int = 40) -> str:
    """Percentiles and a text histogram of per-frame latencies; frames over the 80 ms budget are counted."""
    lat = np.asarray(lat_ms, np.float64)
    if lat.size == 0:
        return "no frames"
    p = latency_percentiles(lat)
    lines = [f"per-frame latency over {lat.size} frames (ms): median {p['median']:.2f}  p90 {p['p90']:.2f}  "
             f"p99 {p['p99']:.2f}  max {p['max']:.2f}  mean {p['mean']:.2f}",
             f"real-time factor {lat.sum() / (lat.size * frame_ms):.3f} (< 1: faster than real time); "
             f"{int((lat > frame_ms).sum())} frame(s) over the {frame_ms:.0f} ms budget"]
    hi = max(float(np.percentile(lat, 99)) * 1.05, float(lat.min()) + 1e-3)
    edges = np.linspace(float(lat.min()), hi, bins + 1)
    counts, _ = np.histogram(np.clip(lat, None, hi), edges)
    top = max(int(counts.max()), 1)
    for c, lo, up in zip(counts, edges[:-1], edges[1:], strict=True):
        lines.append(f"  {lo:8.2f} - {up:8.2f} ms | {'#' * int(round(width * c / top)):<{width}} {c}")
    return "\n".join(lines)
