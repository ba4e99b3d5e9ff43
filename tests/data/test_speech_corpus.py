"""The learning corpus: generated sentences, held-out splits by sentence and by voice, determinism, and the
tokenized result (the codec the tokens came from is saved beside them)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moshi_jax.data import speech_corpus as C
from moshi_jax.data.records import TokenizedDataset
from moshi_jax.data.speech_synth import SpeechEngine


def test_generated_sentences_are_distinct_deterministic_and_use_the_grammar_vocabulary():
    a = C.generate_sentences(500, seed=3)
    assert len(set(a)) == 500
    assert a == C.generate_sentences(500, seed=3)
    assert a[:100] == C.generate_sentences(100, seed=3)  # a prefix: growing the corpus keeps its sentences
    assert a != C.generate_sentences(500, seed=4)
    vocab = C.vocabulary()
    assert all(w in vocab for s in a for w in s.split())
    assert len({w for s in a for w in s.split()}) > 100  # a non-trivial vocabulary


def test_sentence_split_is_disjoint():
    train, heldout = C.split_sentences(300, 40, seed=1)
    assert len(train) == 300 and len(heldout) == 40
    assert not set(train) & set(heldout)


def test_held_out_voices_are_new_voices_and_synthesise():
    assert not set(C.TRAIN_VOICES) & set(C.HELDOUT_VOICES)
    train_variants = {v.split("+")[1] for v in C.TRAIN_VOICES}
    assert not {v.split("+")[1] for v in C.HELDOUT_VOICES} & train_variants  # unseen eSpeak variants
    with SpeechEngine() as engine:
        for voice in C.HELDOUT_VOICES:
            assert engine.synthesize("the red box", voice).duration > 0.2


def test_a_train_voice_in_the_held_out_voices_is_refused(tmp_path):
    with pytest.raises(ValueError, match="must not be train voices"):
        C.build_corpus(tmp_path, num_sentences=2, num_heldout=1, train_voices=("en-us+m1",),
                       heldout_voices=("en-us+m1",), tokenize=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    C.build_corpus(out, num_sentences=12, num_heldout=4, seed=0, num_codebooks=8, progress=False)
    return out


def test_splits_are_disjoint_by_sentence_and_by_voice(corpus):
    items = {s: C.read_transcripts(corpus / f"{s}.jsonl") for s in C.SPLITS}
    assert [len(items[s]) for s in C.SPLITS] == [12, 4, 4]
    train_text = {it["text"] for it in items["train"]}
    train_voices = {it["voice"] for it in items["train"]}
    for split in ("heldout_sentences", "heldout_voices"):
        assert not {it["text"] for it in items[split]} & train_text
    assert {it["voice"] for it in items["heldout_sentences"]} <= set(C.TRAIN_VOICES)
    assert not {it["voice"] for it in items["heldout_voices"]} & train_voices
    assert not {it["voice"] for it in items["heldout_voices"]} & set(C.TRAIN_VOICES)
    # the same held-out sentences, spoken by seen and by unseen voices
    assert [it["text"] for it in items["heldout_sentences"]] == [it["text"] for it in items["heldout_voices"]]


def test_alignments_give_every_word_of_the_sentence_in_order(corpus):
    for it in C.read_transcripts(corpus / "train.jsonl"):
        words = json.loads(open(it["path"].replace(".wav", ".json")).read())["alignments"]
        assert [w[0] for w in words] == it["text"].split()
        starts = [w[1][0] for w in words]
        assert starts == sorted(starts) and words[-1][1][1] <= it["duration"] + 1e-3
        assert {w[2] for w in words} == {"SPEAKER_MAIN"}


def test_every_recording_ends_with_the_trailing_silence_after_its_last_word(corpus):
    from moshi_jax.audio import load_audio

    assert json.loads((corpus / "corpus.json").read_text())["trailing_silence"] == 1.0
    for split in C.SPLITS:
        for it in C.read_transcripts(corpus / f"{split}.jsonl"):
            audio, sr = load_audio(it["path"], 24000)[0], 24000
            assert len(audio) == round(it["duration"] * sr)
            assert np.all(audio[-sr:] == 0) and np.any(audio[:-sr] != 0)
            words = json.loads(open(it["path"].replace(".wav", ".json")).read())["alignments"]
            assert it["duration"] - words[-1][1][1] >= 1.0 - 1e-3


def test_a_negative_trailing_silence_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--trailing-silence"):
        C.build_corpus(tmp_path, num_sentences=2, num_heldout=1, trailing_silence=-0.5, tokenize=False)


def test_each_split_is_tokenized_mono_with_text_and_the_codec_is_saved(corpus):
    info = json.loads((corpus / "corpus.json").read_text())
    for split in C.SPLITS:
        ds = TokenizedDataset.open(info["tokens"][split])
        assert len(ds) == info["utterances"][split]
        codes, _ = ds.read(0)
        assert codes.shape[0] == 1 + 8  # mono: text + the model's 8 codebooks, no user streams
        assert (codes[0] > 3).any()  # real word tokens in the text stream
    from moshi_jax.mimi import checkpoint as mimi_ckpt

    cfg = mimi_ckpt.config_beside(info["tokens"]["mimi"])
    assert cfg is not None and cfg.bins == 64  # the tiny Mimi, fitted codebooks saved for the engine
    assert mimi_ckpt.load_reference(info["tokens"]["mimi"], cfg)


def test_synthesis_is_deterministic(corpus, tmp_path):
    C.build_corpus(tmp_path, num_sentences=12, num_heldout=4, seed=0, tokenize=False, progress=False)
    for split in C.SPLITS:
        a = (corpus / f"{split}.jsonl").read_text()
        assert a == (tmp_path / f"{split}.jsonl").read_text()
        for it_a, it_b in zip(C.read_transcripts(corpus / f"{split}.jsonl"),
                              C.read_transcripts(tmp_path / f"{split}.jsonl"), strict=True):
            assert open(it_a["path"], "rb").read() == open(it_b["path"], "rb").read()
