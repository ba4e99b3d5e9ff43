"""WER against hand-made transcripts, and the DTW mel distance's basic properties."""

from __future__ import annotations

import numpy as np
import pytest

from moshi_jax.eval.speech_metrics import WordErrors, dtw_distance, mel_dtw_distance, normalize, wer, word_errors


def test_normalize_lowercases_and_drops_punctuation():
    assert normalize("Hello, World! It's 5 o'clock.") == ["hello", "world", "it's", "5", "o'clock"]


@pytest.mark.parametrize("ref,hyp,expected", [
    ("the red box is in the garden", "the red box is in the garden", WordErrors(0, 0, 0, 7)),
    ("the red box is in the garden", "the big box is in the garden", WordErrors(1, 0, 0, 7)),   # red -> big
    ("the red box is in the garden", "the box is in the garden", WordErrors(0, 1, 0, 7)),       # red deleted
    ("the red box is in the garden", "the red red box is in the garden", WordErrors(0, 0, 1, 7)),  # inserted
    ("anna saw two cups", "", WordErrors(0, 4, 0, 4)),
    ("", "hello", WordErrors(0, 0, 1, 0)),
    ("did ben fix the lamp today", "did ben fix a lamp", WordErrors(1, 1, 0, 6)),  # the -> a, today deleted
    ("i kept the key", "I kept, the KEY.", WordErrors(0, 0, 0, 4)),  # case and punctuation do not count
])
def test_word_errors_of_hand_made_transcripts(ref, hyp, expected):
    assert word_errors(ref, hyp) == expected


def test_word_errors_is_the_minimal_edit_count():
    # two substitutions are cheaper than delete + insert pairs; a shift costs a deletion and an insertion
    assert word_errors("a b c d", "a x y d").errors == 2
    assert word_errors("a b c d", "b c d a").errors == 2


def test_corpus_wer_pools_words_over_utterances():
    refs = ["the red box", "anna saw two cups in the park"]  # 3 + 7 reference words
    hyps = ["the red fox", "anna saw cups in the park today"]  # 1 sub; 1 del + 1 ins
    assert wer(refs, hyps) == pytest.approx(3 / 10)
    assert wer(refs, refs) == 0.0
    with pytest.raises(ValueError, match="hypotheses"):
        wer(refs, hyps[:1])
    with pytest.raises(ValueError, match="no words"):
        wer([""], ["x"])


def test_dtw_is_zero_for_a_time_stretched_copy_and_positive_otherwise():
    a = np.random.default_rng(0).standard_normal((20, 4))
    stretched = np.repeat(a, 2, axis=0)  # every frame twice: the same sequence, slower
    assert dtw_distance(a, stretched) == pytest.approx(0.0, abs=1e-6)
    assert dtw_distance(a, a[::-1]) > 0.5


def test_mel_dtw_tells_a_tone_from_its_slower_copy_and_from_another_tone():
    sr = 24000
    t = np.arange(sr // 2) / sr
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    slow = np.sin(2 * np.pi * 440 * np.arange(sr) / sr).astype(np.float32)
    other = np.sin(2 * np.pi * 1500 * t).astype(np.float32)
    assert mel_dtw_distance(tone, slow, sr) < 0.2 * mel_dtw_distance(tone, other, sr)
