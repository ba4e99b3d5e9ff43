"""Offline speech with exact word timings (eSpeak NG through ctypes), and a built-in two-speaker dialogue set.

Why eSpeak NG: it is the only speech synthesiser that installs from PyPI with its data (`espeakng-loader`)
and runs with no network; it reports the start sample of every word, which gives real (if robotic)
speech with exact word timestamps - enough for Inner Monologue training, tests and demos on CPU
(see shared/spec/offline_data.md).

Determinism: eSpeak NG keeps synthesis state in C statics (e.g. the pitch-flutter phase) that
survive `espeak_Terminate`, so the same text rendered twice in one library instance differs, and it
seeds its noise generator from the wall clock at initialisation (we reseed it before every call). Each
`SpeechEngine` therefore loads its OWN copy of the shared library (a temp copy, unlinked right after
dlopen, dlclosed on close), so its output depends only on the calls made through it. `synthesize()`
uses a fresh engine per call (a pure function, ~10 ms overhead); the dataset builder uses one fresh
engine per dialogue. Separate engines share no state, so they are also safe across threads and
processes; one engine serialises its own calls with a lock.
"""

from __future__ import annotations

import _ctypes
import ctypes
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import zlib
from pathlib import Path

import numpy as np

from moshi_jax.audio import resample, save_audio

log = logging.getLogger(__name__)

__all__ = [
    "SAMPLE_RATE",
    "SENTENCES",
    "VOICES",
    "MAIN_SPEAKER",
    "SpeechEngine",
    "Utterance",
    "synthesize",
    "builtin_sample",
    "build_dialogue_dataset",
]

SAMPLE_RATE = 24000  # Mimi's rate; eSpeak NG renders at 22050 Hz and we resample with soxr.
MAIN_SPEAKER = "SPEAKER_MAIN"  # the label moshi-finetune's annotate.py gives channel-0 words

# Voices that sound clearly different from each other ("language[+variant]", variants in espeak-ng-data/voices/!v).
VOICES: tuple[str, ...] = (
    "en-us",
    "en-us+f3",
    "en-gb+m3",
    "en-us+m7",
    "en-gb+f4",
    "en-us+m1",
    "en-gb-x-rp+f2",
    "en-us+m4",
)

BUILTIN_TEXT = "The quick brown fox jumps over the lazy dog, and then it takes a long nap in the warm sun."

# Short conversational English sentences: dialogue turns, and a text corpus for a small SentencePiece model.
SENTENCES: tuple[str, ...] = (
    "Hello, how are you today?",
    "I am doing well, thank you for asking.",
    "What are you working on this morning?",
    "I am writing a small program that talks.",
    "That sounds like a lot of fun.",
    "Do you want to get some coffee later?",
    "Sure, let us meet at three o'clock.",
    "The weather is really nice outside.",
    "I think it might rain in the evening.",
    "Did you see the game last night?",
    "No, I fell asleep before it started.",
    "My sister is visiting us next week.",
    "We are going to cook dinner together.",
    "Can you help me move this table?",
    "Of course, just tell me where it goes.",
    "I like to read books before bed.",
    "What kind of music do you listen to?",
    "Mostly jazz, but sometimes a little rock.",
    "The train was late again this morning.",
    "Maybe we should take the bus instead.",
    "I lost my keys somewhere in the house.",
    "Have you checked the kitchen drawer?",
    "Yes, and they are not there either.",
    "Let me know if you find them.",
    "This soup tastes very good.",
    "Thank you, it is my grandmother's recipe.",
    "We should go hiking in the mountains.",
    "That is a great idea for the weekend.",
    "How long will the trip take?",
    "About two hours by car, I think.",
    "Please remember to water the plants.",
    "I will do it right after lunch.",
    "The meeting has been moved to Friday.",
    "Good, that gives us more time to prepare.",
    "Could you speak a little more slowly?",
    "Sorry, I was talking too fast.",
    "My computer keeps making a strange noise.",
    "You should probably clean the fan.",
    "The children are playing in the garden.",
    "Tell them to come inside for dinner.",
    "I have never been to the ocean.",
    "We could drive there next summer.",
    "Where did you buy that nice jacket?",
    "I found it at a small shop downtown.",
    "The library closes early on Sundays.",
    "Then let us go on Saturday morning.",
    "What time does the movie start?",
    "It starts at half past seven.",
    "I am learning to play the guitar.",
    "How many songs can you play already?",
    "Only two, but I practice every day.",
    "The cat is sleeping on my chair again.",
    "Just let her sleep, she looks happy.",
    "Do you know a good place to eat?",
    "There is a quiet restaurant near the river.",
    "I need to finish this report tonight.",
    "Good luck, I hope it goes quickly.",
    "Why is the sky blue during the day?",
    "Because the air scatters blue light the most.",
    "Let us take a short break now.",
    "Yes, I could use a glass of water.",
    "See you tomorrow, have a good night.",
)

# --- eSpeak NG C API (speak_lib.h) ---------------------------------------------------------------------------------
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_PARAM_RATE = 1
_PARAM_PITCH = 3
_NATIVE_RATE = 22050


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based character position of the word in the input text
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms
        ("sample", ctypes.c_int),  # start sample of the event since the start of this synthesis call
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


class _VoiceInfo(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),  # sequence of (priority byte, NUL-terminated language) ending with byte 0
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


def _loader():
    try:
        import espeakng_loader
    except ImportError as e:  # a dependency of the package; this only fires in a broken install
        raise RuntimeError("eSpeak NG is missing: pip install espeakng-loader") from e
    return espeakng_loader


@dataclasses.dataclass(frozen=True)
class Utterance:
    """Synthesised speech: audio float32 [T] at `sample_rate`, words [(word, start_s, end_s)] sorted and inside it."""

    audio: np.ndarray
    words: list[tuple[str, float, float]]
    sample_rate: int = SAMPLE_RATE

    @property
    def duration(self) -> float:
        return self.audio.shape[0] / self.sample_rate


def _load_private_copy(library: str) -> ctypes.CDLL:
    """dlopen a fresh copy of `library` (dlopen of the same path would return the loaded instance and its state).

    The copy goes to the temp dir, or to ~/.cache/moshi_jax where the temp dir is mounted noexec; it is
    unlinked right after loading (the mapping stays valid), so nothing is left on disk.
    """
    errors = []
    for folder in (None, Path.home() / ".cache" / "moshi_jax"):
        try:
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
            fd, copy = tempfile.mkstemp(prefix="moshi_jax_espeak_", suffix=".so", dir=folder)
            os.close(fd)
        except OSError as e:
            errors.append(f"{folder or tempfile.gettempdir()}: {e}")
            continue
        try:
            shutil.copyfile(library, copy)
            return ctypes.CDLL(copy, mode=ctypes.RTLD_LOCAL)
        except OSError as e:
            errors.append(f"{copy}: {e}")
        finally:
            os.unlink(copy)
    raise RuntimeError("cannot load a private copy of the eSpeak NG library: " + "; ".join(errors))


class SpeechEngine:
    """One private eSpeak NG instance (own copy of the library, so its state is independent of any other)."""

    def __init__(self) -> None:
        el = _loader()
        self._data_path = el.get_data_path()
        self._lib = _load_private_copy(el.get_library_path())
        lib = self._lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = None
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_VoiceInfo))
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self._data_path.encode(), 0)
        if rate != _NATIVE_RATE:
            _ctypes.dlclose(lib._handle)
            raise RuntimeError(f"eSpeak NG initialisation failed (returned {rate}, expected rate {_NATIVE_RATE})")
        self._lock = threading.Lock()
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int]] = []
        self._callback = _SynthCallback(self._on_audio)  # kept alive as long as the library may call it
        lib.espeak_SetSynthCallback(self._callback)
        self._languages = self._list_languages()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lib.espeak_Terminate()
            handle = self._lib._handle
            del self._lib
            _ctypes.dlclose(handle)  # unloads this private copy (its statics go with it)

    def __enter__(self) -> SpeechEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown; nothing useful to do
            pass

    # -- internals ---------------------------------------------------------------------------------------------------
    def _on_audio(self, wav, num_samples: int, events) -> int:
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (num_samples,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            e = events[i]
            self._events.append((e.type, e.text_position, e.sample))
            i += 1
        return 0  # 0 = continue synthesis

    def _list_languages(self) -> dict[str, str]:
        """language code (lower case) -> voice identifier, e.g. 'en-gb' -> 'gmw/en'."""
        best: dict[str, tuple[int, str]] = {}
        voices = self._lib.espeak_ListVoices(None)
        i = 0
        while voices[i]:
            v = voices[i].contents
            addr = v.languages
            while (prio := ctypes.string_at(addr, 1)[0]) != 0:  # priority byte 0 terminates the list
                lang = ctypes.string_at(addr + 1)  # NUL-terminated language code after the priority byte
                key = lang.decode().lower()
                if key not in best or prio < best[key][0]:  # lower number = the voice's main language
                    best[key] = (prio, v.identifier.decode())
                addr += len(lang) + 2
            i += 1
        return {k: ident for k, (_, ident) in best.items()}

    def _voice_name(self, voice: str) -> str:
        base, _, variant = voice.partition("+")
        ident = self._languages.get(base.lower())
        if ident is None:
            known = ", ".join(sorted(k for k in self._languages if k.startswith("en")))
            raise ValueError(f"unknown eSpeak NG voice language {base!r} in {voice!r} (English ones: {known})")
        if variant:
            if not (Path(self._data_path) / "voices" / "!v" / variant).is_file():
                raise ValueError(f"unknown eSpeak NG voice variant {variant!r} in {voice!r}")
            return f"{ident}+{variant}"
        return ident

    # -- API ---------------------------------------------------------------------------------------------------------
    def synthesize(self, text: str, voice: str = "en-us", *, rate_wpm: int = 175, pitch: int = 50) -> Utterance:
        """Render `text` -> Utterance (24 kHz float32 audio, word timings). Leading/trailing silence is trimmed.

        rate_wpm: speaking rate in words per minute (80..450); pitch: 0..100 (eSpeak NG default 50).
        """
        if not text.strip():
            raise ValueError("cannot synthesise empty text")
        if not 80 <= rate_wpm <= 450:
            raise ValueError(f"rate_wpm must be in [80, 450], got {rate_wpm}")
        if not 0 <= pitch <= 100:
            raise ValueError(f"pitch must be in [0, 100], got {pitch}")
        name = self._voice_name(voice)
        data = text.encode("utf-8")
        with self._lock:
            if self._closed:
                raise RuntimeError("SpeechEngine is closed")
            lib = self._lib
            if lib.espeak_SetVoiceByName(name.encode()) != 0:
                raise ValueError(f"eSpeak NG cannot select voice {voice!r} ({name})")
            # Parameters persist across voice changes: set them every call.
            lib.espeak_SetParameter(_PARAM_RATE, int(rate_wpm), 0)
            lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
            # espeak_Initialize seeds its noise generator (breathy voices) from the wall clock: reseed per call.
            lib.espeak_ng_SetRandSeed(zlib.crc32(f"{name}|{rate_wpm}|{pitch}|{text}".encode()))
            self._chunks, self._events = [], []
            err = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            chunks, events = self._chunks, self._events
            self._chunks, self._events = [], []
        if err != 0:
            raise RuntimeError(f"eSpeak NG synthesis failed with error {err} for {text!r}")
        if not chunks:
            raise RuntimeError(f"eSpeak NG produced no audio for {text!r}")
        audio = np.concatenate(chunks).astype(np.float32) / 32768.0
        word_starts = [(pos, sample) for typ, pos, sample in events if typ == _EVENT_WORD]
        return _timed_utterance(text, audio, word_starts)


def _timed_utterance(text: str, audio: np.ndarray, word_starts: list[tuple[int, int]]) -> Utterance:
    """Native-rate audio [T] + eSpeak word events (1-based char position, start sample) -> trimmed 24 kHz Utterance.

    Words are the whitespace-separated tokens of `text` (punctuation attached, as Whisper writes them); a token
    that spans several eSpeak words (e.g. "42" -> "forty two") starts at its first one. A word ends at the next
    word's start (or the utterance end) minus the silence before it.
    """
    starts: list[tuple[str, int]] = []
    events = sorted(word_starts)
    for m in re.finditer(r"\S+", text):
        hits = [s for p, s in events if m.start() <= p - 1 < m.end()]
        if hits:
            starts.append((m.group(), min(hits)))
    if not starts:
        raise RuntimeError(f"eSpeak NG reported no words for {text!r}")
    starts.sort(key=lambda w: w[1])

    # Speech activity on 5 ms frames; the threshold sits far above the breathy variants' noise floor.
    hop = _NATIVE_RATE // 200
    n_frames = max(1, -(-audio.shape[0] // hop))
    padded = np.zeros(n_frames * hop, np.float32)
    padded[: audio.shape[0]] = audio
    rms = np.sqrt(np.mean(padded.reshape(n_frames, hop) ** 2, axis=1))
    active = rms > max(1e-3, 0.05 * float(np.percentile(rms, 95)))

    words: list[tuple[str, int, int]] = []
    for i, (word, s) in enumerate(starts):
        e = starts[i + 1][1] if i + 1 < len(starts) else audio.shape[0]
        if e <= s:  # two tokens on one eSpeak word boundary: give the first one a single frame
            e = s + hop
        # Only frames fully inside [s, e): the frame holding e already belongs to the next word's onset.
        fa, fb = -(-s // hop), e // hop
        idx = np.nonzero(active[fa:fb])[0] if fb > fa else np.zeros(0, np.int64)
        if idx.size:
            ws = s if idx[0] == 0 else (fa + int(idx[0])) * hop
            we = e if idx[-1] == fb - fa - 1 else (fa + int(idx[-1]) + 1) * hop
        else:
            ws, we = s, e
        words.append((word, ws, max(we, ws + 1)))

    # Trim silence around the speech (keep a little margin) and move the timings with it.
    lo = max(0, words[0][1] - int(0.03 * _NATIVE_RATE))
    hi = min(audio.shape[0], words[-1][2] + int(0.05 * _NATIVE_RATE))
    hi = max(hi, max(w[2] for w in words))
    audio = np.pad(audio, (0, max(0, hi - audio.shape[0])))[lo:hi]
    out = resample(audio, _NATIVE_RATE, SAMPLE_RATE)
    dur = out.shape[0] / SAMPLE_RATE
    timed = [(w, (int(s) - lo) / _NATIVE_RATE, min((int(e) - lo) / _NATIVE_RATE, dur)) for w, s, e in words]
    return Utterance(audio=out, words=timed)


def synthesize(text: str, voice: str = "en-us", *, rate_wpm: int = 175, pitch: int = 50) -> Utterance:
    """Render `text` with a fresh eSpeak NG instance: the result depends only on the arguments."""
    with SpeechEngine() as engine:
        return engine.synthesize(text, voice, rate_wpm=rate_wpm, pitch=pitch)


@functools.lru_cache(maxsize=1)
def _builtin() -> np.ndarray:
    return synthesize(BUILTIN_TEXT, "en-us").audio


def builtin_sample() -> np.ndarray:
    """A few seconds of a fixed English sentence, float32 [T] at 24 kHz (deterministic)."""
    return _builtin().copy()


# --- dialogue dataset (moshi-finetune layout) -------------------------------------------------------------------------
def _render_dialogue(rng: np.random.Generator, seconds: float) -> tuple[np.ndarray, list]:
    """One two-speaker dialogue: stereo float32 [2, round(seconds*24k)] and channel-0 words [(w, s, e)]."""
    n = int(round(seconds * SAMPLE_RATE))
    wav = np.zeros((2, n), np.float32)
    main_voice, user_voice = (VOICES[i] for i in rng.choice(len(VOICES), size=2, replace=False))
    style = [
        {"voice": v, "rate_wpm": int(rng.integers(150, 196)), "pitch": int(rng.integers(35, 66)),
         "gain": float(rng.uniform(0.7, 1.0))}
        for v in (main_voice, user_voice)
    ]
    words: list[tuple[str, float, float]] = []
    speaker = int(rng.integers(2))
    t = float(rng.uniform(0.1, 0.6))
    last_end = [0.0, 0.0]  # a channel never overlaps itself: each voice is one person
    with SpeechEngine() as engine:  # one fresh engine per dialogue: dialogue i depends only on (seed, i)
        while True:
            k = int(rng.integers(1, 3))
            text = " ".join(SENTENCES[j] for j in rng.choice(len(SENTENCES), size=k, replace=False))
            st = style[speaker]
            utt = engine.synthesize(text, st["voice"], rate_wpm=st["rate_wpm"], pitch=st["pitch"])
            start = max(t, last_end[speaker] + 0.2)
            i0 = int(round(start * SAMPLE_RATE))
            if i0 + utt.audio.shape[0] > n:
                break
            wav[speaker, i0 : i0 + utt.audio.shape[0]] += st["gain"] * utt.audio
            t0 = i0 / SAMPLE_RATE
            if speaker == 0:
                words.extend((w, round(t0 + s, 4), round(t0 + e, 4)) for w, s, e in utt.words)
            end = t0 + utt.duration
            last_end[speaker] = end
            # Next turn: the other speaker, after a pause or overlapping the end of this turn (negative gap).
            t = end + float(rng.uniform(-0.6, 0.8))
            speaker = 1 - speaker
    return wav, words


def build_dialogue_dataset(out_dir: str | os.PathLike, num_dialogues: int, seconds: float, seed: int) -> Path:
    """Write `num_dialogues` synthetic two-speaker dialogues of `seconds` each in the moshi-finetune layout.

    out_dir/manifest.jsonl: one {"path": "data_stereo/dialogue_XXXXX.wav", "duration": s} per line (paths
    relative to out_dir); each wav is stereo 24 kHz float (channel 0 = the model's voice, channel 1 = the
    user; different voices, alternating turns with some overlap); each sibling .json holds
    {"alignments": [[word, [start_s, end_s], "SPEAKER_MAIN"], ...]} for channel 0's words. Deterministic for
    a seed. Returns the manifest path. The manifest is written last (atomically): its presence means the
    dataset is complete.
    """
    if num_dialogues < 1:
        raise ValueError(f"num_dialogues must be >= 1, got {num_dialogues}")
    if not seconds >= 3.0:
        raise ValueError(f"seconds must be >= 3 (room for a few dialogue turns), got {seconds}")
    out = Path(out_dir)
    (out / "data_stereo").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(num_dialogues):
        rng = np.random.default_rng([seed, i])  # dialogue i is independent of how many come before it
        wav, words = _render_dialogue(rng, seconds)
        rel = f"data_stereo/dialogue_{i:05d}.wav"
        save_audio(out / rel, wav, SAMPLE_RATE)
        alignments = [[w, [s, e], MAIN_SPEAKER] for w, s, e in words]
        (out / rel).with_suffix(".json").write_text(json.dumps({"alignments": alignments}))
        lines.append(json.dumps({"path": rel, "duration": wav.shape[1] / SAMPLE_RATE}))
    manifest = out / "manifest.jsonl"
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(manifest)
    log.info("wrote %d synthetic dialogues (%.1f s each) to %s", num_dialogues, seconds, out)
    return manifest
