"""A larger offline speech corpus for learning experiments (streaming ASR / TTS): generated sentences spoken by
many eSpeak NG voices, exact word timings, held-out splits by sentence and by voice, tokenized with Mimi.

    moshi-jax data synth runs/corpus --sentences 4000 --heldout-sentences 200
    -> runs/corpus/{train,heldout_sentences,heldout_voices}.jsonl   (mono 24 kHz wavs + word alignments)
       runs/corpus/tokens/<split>/                                  (Mimi codes + text, `data.sources=...`)
       runs/corpus/tokenizer.model, mimi.safetensors (+ config), corpus.json

Sentences come from a small built-in grammar (`generate_sentences`: ~200 words, millions of combinations; a
vocabulary a small model can learn, sentences it has never heard). They are lower case without punctuation, so
a transcript compares word for word. Splits, each its own manifest:

- train: train sentences x train voices;
- heldout_sentences: held-out sentences (none of them in train) x train voices (seen voices);
- heldout_voices: the same held-out sentences x held-out voices, whose eSpeak variants never occur in train.

Every utterance draws a voice, a rate (words per minute) and a pitch from its own seeded generator, so
utterance i depends only on (seed, split, i). The manifest lines carry `text`, `voice`, `rate_wpm`, `pitch`
beside the moshi-finetune keys; alignments are {"alignments": [[word, [start, end], "SPEAKER_MAIN"], ...]}.
One speaker per file: a mono file is the model's own voice stream (channel 0) with the text stream
transcribing it (`data tokenize --allow-mono`), the layout of both streaming ASR (text after the audio) and
streaming TTS (text before it): the shift is the training config's `data.text_delay_frames`.

Codec: the seeded random Mimi (`tiny` preset by default: 120x real time on CPU) with its codebooks fitted to
the train split (`tokenize.calibrate_codebooks`), saved as `mimi.safetensors` so that the engine encodes
(ASR) and decodes (TTS) with exactly the codec the tokens came from; or `--mimi-weights` (e.g. a trained
codec exported by `moshi-jax export`), used as is.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moshi_jax.audio import save_audio
from moshi_jax.data.speech_synth import MAIN_SPEAKER, SAMPLE_RATE, SpeechEngine

log = logging.getLogger(__name__)

SPLITS = ("train", "heldout_sentences", "heldout_voices")
CORPUS_VERSION = 1

# eSpeak NG voices "language+variant". Held-out voices use variants (m5..m7, f5) that no train voice uses.
TRAIN_VOICES: tuple[str, ...] = tuple(
    f"{base}+{v}" for base in ("en-us", "en-gb", "en-gb-x-rp")
    for v in ("m1", "m2", "m3", "m4", "f1", "f2", "f3", "f4"))
HELDOUT_VOICES: tuple[str, ...] = ("en-us+m7", "en-gb+f5", "en-us+m6", "en-gb-x-rp+m5")
RATE_WPM = (150, 200)  # inclusive range drawn per utterance
PITCH = (30, 70)

# --- sentence grammar ------------------------------------------------------------------------------------------------
_NAMES = ("anna", "ben", "clara", "david", "emma", "frank", "grace", "henry", "julia", "kevin", "laura", "mark",
          "nora", "oscar", "paula", "sam")
_PRONOUNS = ("i", "you", "we", "they", "she", "he")
_ADJS = ("red", "blue", "green", "small", "big", "old", "new", "heavy", "soft", "bright", "dark", "warm", "cold",
         "clean", "broken", "empty", "quiet", "yellow", "wooden", "round")
_NOUNS = (("box", "boxes"), ("chair", "chairs"), ("table", "tables"), ("lamp", "lamps"), ("book", "books"),
          ("cup", "cups"), ("bag", "bags"), ("coat", "coats"), ("key", "keys"), ("ball", "balls"),
          ("window", "windows"), ("door", "doors"), ("bottle", "bottles"), ("plate", "plates"), ("phone", "phones"),
          ("letter", "letters"), ("flower", "flowers"), ("basket", "baskets"), ("hat", "hats"), ("clock", "clocks"),
          ("picture", "pictures"), ("bike", "bikes"), ("car", "cars"), ("shoe", "shoes"))
_VERBS = (("see", "saw"), ("find", "found"), ("take", "took"), ("move", "moved"), ("paint", "painted"),
          ("wash", "washed"), ("buy", "bought"), ("sell", "sold"), ("carry", "carried"), ("drop", "dropped"),
          ("open", "opened"), ("close", "closed"), ("clean", "cleaned"), ("fix", "fixed"), ("lose", "lost"),
          ("keep", "kept"), ("bring", "brought"), ("hide", "hid"), ("need", "needed"), ("want", "wanted"))
_PLACES = ("kitchen", "garden", "office", "station", "market", "school", "library", "garage", "park", "hotel",
           "river", "bedroom")
_PREPS = ("in", "near", "behind", "under", "at")
_TIMES = ("today", "yesterday", "this morning", "last night", "on monday", "on friday", "after lunch",
          "before dinner", "every day", "at noon")
_NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _noun_phrase(rng: np.random.Generator) -> str:
    det = _pick(rng, ("the", "a", "my", "your", "this", "that"))
    noun = _pick(rng, _NOUNS)[0]
    if rng.random() < 0.6:
        return f"{det} {_pick(rng, _ADJS)} {noun}"
    return f"{det} {noun}"


def _sentence(rng: np.random.Generator) -> str:
    """One sentence of the grammar (lower case words, no punctuation)."""
    kind = int(rng.integers(5))
    subj = _pick(rng, _NAMES + _PRONOUNS)
    base, past = _pick(rng, _VERBS)
    place = f"{_pick(rng, _PREPS)} the {_pick(rng, _PLACES)}"
    if kind == 0:
        return f"{subj} {past} {_noun_phrase(rng)} {place}"
    if kind == 1:
        return f"{subj} {past} {_pick(rng, _NUMBERS)} {_pick(rng, _ADJS)} {_pick(rng, _NOUNS)[1]} {_pick(rng, _TIMES)}"
    if kind == 2:
        return f"did {subj} {base} {_noun_phrase(rng)} {_pick(rng, _TIMES)}"
    if kind == 3:
        return f"{_noun_phrase(rng)} is {place}"
    return f"{subj} will {base} {_noun_phrase(rng)} {place} {_pick(rng, _TIMES)}"


def vocabulary() -> set[str]:
    """Every word the grammar can produce."""
    words = set(_NAMES + _PRONOUNS + _ADJS + _PLACES + _PREPS + _NUMBERS)
    words |= {w for pair in _NOUNS + _VERBS for w in pair}
    words |= {w for t in _TIMES for w in t.split()}
    words |= {"the", "a", "my", "your", "this", "that", "did", "is", "will"}
    return words


def generate_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` distinct sentences of the grammar, deterministic for `seed` (a prefix of a longer list for the same
    seed is the shorter list)."""
    if n < 1:
        raise ValueError(f"need at least one sentence, got {n}")
    rng = np.random.default_rng([seed, 0x5E7])
    seen: set[str] = set()
    out: list[str] = []
    tries = 0
    while len(out) < n:
        s = _sentence(rng)
        tries += 1
        if s not in seen:
            seen.add(s)
            out.append(s)
        if tries > 50 * n + 1000:
            raise RuntimeError(f"the grammar gave only {len(out)} distinct sentences in {tries} draws")
    return out


def split_sentences(num_train: int, num_heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train sentences, held-out sentences): disjoint, drawn from one list of distinct sentences."""
    if num_heldout < 1:
        raise ValueError(f"need at least one held-out sentence, got {num_heldout}")
    sentences = generate_sentences(num_train + num_heldout, seed)
    return sentences[num_heldout:], sentences[:num_heldout]


def normalize_words(text: str) -> list[str]:
    """Lower-case words without punctuation (how transcripts are compared)."""
    return re.findall(r"[a-z0-9']+", text.lower())


# --- synthesis -------------------------------------------------------------------------------------------------------
def _utterance_plan(split: str, sentences: Sequence[str], voices: Sequence[str], seed: int,
                    per_sentence: int) -> list[dict]:
    """Which sentence / voice / rate / pitch each utterance of a split gets (pure function of its arguments)."""
    plan = []
    for i in range(len(sentences) * per_sentence):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        plan.append({"text": sentences[i // per_sentence], "voice": _pick(rng, voices),
                     "rate_wpm": int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)),
                     "pitch": int(rng.integers(PITCH[0], PITCH[1] + 1))})
    return plan


def _write_split(out: Path, split: str, plan: list[dict], progress: bool, trailing_silence: float) -> Path:
    """Synthesize a split into out/<split>/ and write out/<split>.jsonl (atomically, last); each recording
    followed by `trailing_silence` seconds of digital silence."""
    from tqdm import tqdm

    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    with SpeechEngine() as engine:
        for i, item in enumerate(tqdm(plan, desc=f"synth {split}", unit="utt", disable=not progress)):
            utt = engine.synthesize(item["text"], item["voice"], rate_wpm=item["rate_wpm"], pitch=item["pitch"])
            rel = f"{split}/utt_{i:06d}.wav"
            audio = np.concatenate([utt.audio, np.zeros(round(trailing_silence * SAMPLE_RATE), utt.audio.dtype)])
            save_audio(out / rel, audio[None], SAMPLE_RATE)
            words = [[w, [round(s, 4), round(e, 4)], MAIN_SPEAKER] for w, s, e in utt.words]
            (out / rel).with_suffix(".json").write_text(json.dumps({"alignments": words}))
            lines.append(json.dumps({"path": rel, "duration": len(audio) / SAMPLE_RATE, **item}))
    manifest = out / f"{split}.jsonl"
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(manifest)
    return manifest


def read_transcripts(manifest: str | os.PathLike) -> list[dict]:
    """The manifest's lines as dicts (with `text`, `voice`, ... of a synthesized corpus), paths made absolute."""
    manifest = Path(manifest)
    items = []
    for raw in manifest.read_text().splitlines():
        if raw.strip():
            item = json.loads(raw)
            item["path"] = str(manifest.parent / item["path"])
            items.append(item)
    return items


def build_corpus(out_dir: str | os.PathLike, *, num_sentences: int = 4000, num_heldout: int = 200, seed: int = 0,
                 train_voices: Sequence[str] = TRAIN_VOICES, heldout_voices: Sequence[str] = HELDOUT_VOICES,
                 per_sentence: int = 1, heldout_per_sentence: int = 1, tokenize: bool = True,
                 mimi_preset: str = "tiny", mimi_weights: str | os.PathLike | None = None, mimi_seed: int = 0,
                 num_codebooks: int = 16, vocab_size: int = 512, trailing_silence: float = 1.0,
                 progress: bool = True) -> Path:
    """Synthesize (and by default tokenize) the corpus into `out_dir` (see the module docstring).

    num_sentences: train sentences; num_heldout: held-out sentences (spoken by seen and by unseen voices);
    per_sentence: utterances per train sentence (different voice / rate / pitch each); trailing_silence: seconds
    of silence after each recording (a streaming model hears silence after an utterance, and a delayed text
    stream is emitted during it: without it in training, the engine's silence after a sentence is input the ASR
    model never saw, measured as 5 WER points of trailing words). Returns corpus.json.
    """
    if not 0.0 <= trailing_silence <= 30.0:
        raise ValueError(f"--trailing-silence must be in [0, 30] seconds, got {trailing_silence}")
    if num_sentences < 1:
        raise ValueError(f"--sentences must be >= 1, got {num_sentences}")
    if per_sentence < 1 or heldout_per_sentence < 1:
        raise ValueError("utterances per sentence must be >= 1")
    if not train_voices or not heldout_voices:
        raise ValueError("need at least one train voice and one held-out voice")
    shared = sorted(set(train_voices) & set(heldout_voices))
    if shared:
        raise ValueError(f"held-out voices must not be train voices: {shared}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_s, heldout_s = split_sentences(num_sentences, num_heldout, seed)
    plans = {"train": _utterance_plan("train", train_s, train_voices, seed, per_sentence),
             "heldout_sentences": _utterance_plan("heldout_sentences", heldout_s, train_voices, seed,
                                                  heldout_per_sentence),
             "heldout_voices": _utterance_plan("heldout_voices", heldout_s, heldout_voices, seed,
                                               heldout_per_sentence)}
    manifests = {split: _write_split(out, split, plans[split], progress, trailing_silence) for split in SPLITS}
    info = {"version": CORPUS_VERSION, "seed": seed, "num_sentences": num_sentences, "num_heldout": num_heldout,
            "per_sentence": per_sentence, "heldout_per_sentence": heldout_per_sentence,
            "trailing_silence": trailing_silence,
            "train_voices": list(train_voices), "heldout_voices": list(heldout_voices),
            "manifests": {k: v.name for k, v in manifests.items()},
            "utterances": {k: len(v) for k, v in plans.items()},
            "hours": {k: round(sum(json.loads(x)["duration"] for x in v.read_text().splitlines()) / 3600, 3)
                      for k, v in manifests.items()}}
    if tokenize:
        info["tokens"] = tokenize_corpus(out, manifests, train_s, mimi_preset=mimi_preset, mimi_weights=mimi_weights,
                                         mimi_seed=mimi_seed, num_codebooks=num_codebooks, vocab_size=vocab_size,
                                         progress=progress)
    path = out / "corpus.json"
    path.write_text(json.dumps(info, indent=2))
    log.info("corpus in %s: %s utterances, %s hours", out, info["utterances"], info["hours"])
    return path


def tokenize_corpus(out: Path, manifests: dict[str, Path], train_sentences: Sequence[str], *, mimi_preset: str,
                    mimi_weights, mimi_seed: int, num_codebooks: int, vocab_size: int, progress: bool) -> dict:
    """SentencePiece on the train sentences, the codec (random: codebooks fitted to the train audio, saved),
    every split tokenized into out/tokens/<split>. Returns {"tokenizer", "mimi", splits...} paths."""
    from moshi_jax.data import tokenize as tok_lib
    from moshi_jax.mimi import checkpoint as mimi_ckpt

    spm = tok_lib.train_sentencepiece(train_sentences, out / "tokenizer.model", vocab_size)
    codec, params, desc = tok_lib.load_mimi(mimi_weights, mimi_preset, mimi_seed)
    mimi_path = Path(mimi_weights) if mimi_weights else out / "mimi.safetensors"
    if desc.get("random"):
        entries, _ = tok_lib.read_manifest(manifests["train"])
        audio = tok_lib.calibration_audio(entries, codec.cfg.sample_rate, 120.0)
        params = tok_lib.calibrate_codebooks(codec, params, audio, mimi_seed)
        desc = dict(desc, calibrated_codebooks={"seconds": audio.shape[0] * audio.shape[-1] / codec.cfg.sample_rate})
        mimi_ckpt.save_reference(params, codec.cfg, mimi_path)
        mimi_ckpt.config_path_for(mimi_path).write_text(json.dumps(mimi_ckpt.reference_config(codec.cfg)))
    opts = tok_lib.TokenizeOptions(num_codebooks=num_codebooks, allow_mono=True, on_error="fail", progress=progress,
                                   calibrate_random=False)
    result = {"tokenizer": str(spm), "mimi": str(mimi_path)}
    for split, manifest in manifests.items():
        result[split] = str(tok_lib.tokenize_dataset(manifest, out / "tokens" / split, tokenizer=spm, options=opts,
                                                     mimi=(codec, params, desc)).parent)
    return result
