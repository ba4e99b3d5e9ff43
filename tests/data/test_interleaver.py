"""Inner Monologue text stream: expectations derived by hand from moshi-finetune's Interleaver rules.

Frame rate 12.5 Hz (80 ms frames). A word is loaded at the first frame t with start * 12.5 < t + 1, i.e. the
frame holding its start. PAD = 3, EPAD = 0, zero token = -1. Times are chosen away from frame boundaries
unless a boundary is what a test is about.
"""

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from moshi_jax.data.interleaver import (
    AlignmentError,
    num_frames_for,
    text_stream,
    validate_alignments,
    window_alignments,
)

M, OTHER = "SPEAKER_MAIN", "SPEAKER_1"
VOCAB = {"hello": [10, 11], "a": [20], "big": [30, 31, 32], "cat": [40], "dog": [50, 51], "um": []}


def tok(word: str) -> list[int]:
    return VOCAB[word]


def stream(alignments, num_frames, **kw) -> list[int]:
    out = text_stream(alignments, num_frames, tok, **kw)
    assert out.dtype == np.int32 and out.shape == (num_frames,)
    return out.tolist()


def test_epad_marks_the_frame_before_each_word_and_tokens_start_in_the_start_frame():
    # a: 0.2 s -> frame 2.5 -> t=2, EPAD at 1.  hello: 0.5 s -> 6.25 -> t=6, EPAD at 5, tokens 10, 11.
    al = [("a", (0.2, 0.3), M), ("hello", (0.5, 0.7), M)]
    assert stream(al, 10) == [3, 0, 20, 3, 3, 0, 10, 11, 3, 3]


def test_no_epad_before_frame_zero_nor_over_a_token():
    assert stream([("a", (0.0, 0.1), M)], 3) == [20, 3, 3]
    # cat starts exactly on frame 1 (0.08 s * 12.5 = 1.0 < 2): frame 0 holds a token, so no EPAD.
    assert stream([("a", (0.0, 0.08), M), ("cat", (0.08, 0.2), M)], 3) == [20, 40, 3]


def test_frames_inside_a_word_get_the_in_word_pad_which_also_turns_into_epad():
    # hello 0.2..0.6: tokens at 2, 3; in-word frames up to int(0.6 * 12.5) = 7; a at 0.7 -> 8.75 -> t=8, so
    # frame 7 (in-word pad) becomes EPAD; a's end int(0.75 * 12.5) = 9.
    al = [("hello", (0.2, 0.6), M), ("a", (0.7, 0.75), M)]
    assert stream(al, 11, in_word_pad_id=7) == [3, 0, 10, 11, 7, 7, 7, 0, 20, 7, 3]
    assert stream(al, 11) == [3, 0, 10, 11, 3, 3, 3, 0, 20, 3, 3]  # default: in-word pad = PAD


def test_a_word_longer_than_its_frames_is_cut_by_the_next_word():
    # big (3 tokens) at t=2; a at 0.3 s -> 3.75 -> t=3 replaces big's remaining tokens; no EPAD over 30.
    al = [("big", (0.2, 0.5), M), ("a", (0.3, 0.4), M)]
    assert stream(al, 6) == [3, 0, 30, 20, 3, 3]
    # The in-word span comes from the LAST loaded word: a ends at int(0.4 * 12.5) = 5.
    assert stream(al, 6, in_word_pad_id=7) == [3, 0, 30, 20, 7, 7]
    # keep_and_shift queues the new word after the unfinished one instead.
    assert stream(al, 6, keep_and_shift=True) == [3, 0, 30, 31, 32, 20]


def test_epad_every_word_opens_each_word_with_epad_and_drops_no_token():
    # TTS layout: big (3 tokens) at t=2 gets its EPAD on the PAD frame 1; a loads at t=3 while big is still
    # queued, so [EPAD, 20] follows big's last token instead of cutting it.
    al = [("big", (0.2, 0.5), M), ("a", (0.3, 0.4), M)]
    assert stream(al, 8, epad_every_word=True) == [3, 0, 30, 31, 32, 0, 20, 3]
    # a word at frame 0 has no PAD frame before it: its EPAD takes frame 0 and its tokens follow.
    assert stream([("a", (0.0, 0.1), M), ("cat", (0.08, 0.2), M)], 6, epad_every_word=True) == [0, 20, 0, 40, 3, 3]
    # two words loading in the same frame are both kept, in start order, each after its own EPAD.
    al = [("hello", (0.2, 0.9), M), ("a", (0.22, 0.3), M)]
    assert stream(al, 7, epad_every_word=True) == [3, 0, 10, 11, 0, 20, 3]


def test_epad_every_word_matches_the_default_stream_where_words_are_separated_by_pads():
    al = [("a", (0.2, 0.3), M), ("hello", (0.5, 0.7), M), ("cat", (1.0, 1.1), M)]
    assert stream(al, 16, epad_every_word=True) == stream(al, 16)
    # one PAD frame between two words is enough for the EPAD; a word in frame 1 puts its EPAD on frame 0
    assert stream([("a", (0.2, 0.25), M), ("cat", (0.33, 0.4), M)], 6, epad_every_word=True) == [3, 0, 20, 0, 40, 3]
    assert stream([("a", (0.1, 0.15), M)], 3, epad_every_word=True) == [0, 20, 3]
    assert stream(al, 16, epad_every_word=True, in_word_pad_id=7) == stream(al, 16, in_word_pad_id=7)


def test_epad_every_word_gives_one_epad_per_word_and_every_token_in_order():
    rng = np.random.default_rng(0)
    words = [w for w in VOCAB if VOCAB[w]]
    for _ in range(50):
        starts = np.sort(rng.uniform(0, 2.0, size=int(rng.integers(1, 9))))
        al = [(str(rng.choice(words)), (float(s), float(s) + 0.05), M) for s in starts]
        out = np.asarray(stream(al, 60, epad_every_word=True))
        ordered = sorted(al, key=lambda a: a[1][0])
        assert (out == 0).sum() == len(al)
        assert out[(out != 0) & (out != 3)].tolist() == [t for w, _, _ in ordered for t in VOCAB[w]]
        # each EPAD comes right before its word's first token and never before the word's start frame - 1
        for k, e in enumerate(np.flatnonzero(out == 0)):
            assert e + 1 >= math.floor(ordered[k][1][0] * 12.5)
            assert out[e + 1] == VOCAB[ordered[k][0]][0]


def test_overlapping_words_starting_in_the_same_frame_keep_only_the_later_one():
    # hello (0.2 -> 2.5) and a (0.22 -> 2.75) both load at t=2; a replaces hello before any token is emitted.
    al = [("hello", (0.2, 0.9), M), ("a", (0.22, 0.3), M)]
    assert stream(al, 5) == [3, 0, 20, 3, 3]
    assert stream(al, 5, in_word_pad_id=7) == [3, 0, 20, 7, 3]  # span of a (int(3.75) = 3), not hello's


def test_a_word_with_no_tokens_still_replaces_the_queue():
    al = [("big", (0.2, 0.6), M), ("um", (0.3, 0.4), M)]
    assert stream(al, 6) == [3, 0, 30, 3, 3, 3]


def test_words_are_sorted_by_start_and_other_speakers_dropped_when_main_only():
    al = [("cat", (0.6, 0.7), M), ("dog", (0.1, 0.5), OTHER), ("a", (0.2, 0.3), M)]
    assert stream(al, 10) == [3, 0, 20, 3, 3, 3, 0, 40, 3, 3]
    # All speakers: dog at t=1 (EPAD at 0), a at t=2 cuts dog's second token, cat at t=7.
    assert stream(al, 10, keep_main_only=False) == [0, 50, 20, 3, 3, 3, 0, 40, 3, 3]
    # Another main label.
    assert stream(al, 10, main_speaker=OTHER) == [0, 50, 51, 3, 3, 3, 3, 3, 3, 3]


def test_word_end_frame_truncates_toward_zero_like_int():
    # A token-less word ending at -0.01 s: int(-0.125) = 0 (not floor = -1), so frame 0 is in-word.
    assert stream([("um", (-0.06, -0.01), M)], 2, in_word_pad_id=7) == [7, 3]


def test_words_without_positive_duration_are_dropped():
    al = [("a", (0.2, 0.2), M), ("big", (0.3, 0.25), M), ("cat", (0.5, 0.6), M)]
    assert stream(al, 8) == [3, 3, 3, 3, 3, 0, 40, 3]


def test_bos_eos_mark_speaker_changes_as_the_reference_code_does():
    # dog (other, first): no marker. a (main after other): BOS. cat (other after main): EOS. hello (other after
    # other): nothing.  dog t=1, a t=3 (3.75), cat t=7 (7.5), hello t=11 (11.25).
    al = [("dog", (0.1, 0.2), OTHER), ("a", (0.3, 0.4), M), ("cat", (0.6, 0.7), OTHER), ("hello", (0.9, 1.0), OTHER)]
    got = stream(al, 14, keep_main_only=False, use_bos_eos=True, bos_id=1, eos_id=2)
    assert got == [0, 50, 51, 1, 20, 3, 0, 2, 40, 3, 0, 10, 11, 3]
    # keep_main_only wins over use_bos_eos (the reference's elif): only a, without BOS.
    assert stream(al, 6, use_bos_eos=True, bos_id=1, eos_id=2) == [3, 3, 0, 20, 3, 3]
    for ids in ({}, {"bos_id": 1}, {"eos_id": 2}):
        with pytest.raises(ValueError, match="bos_id and eos_id"):
            stream(al, 6, keep_main_only=False, use_bos_eos=True, **ids)


def test_positive_audio_delay_moves_text_earlier_and_drops_words_ending_before_it():
    al = [("a", (0.1, 0.3), M), ("big", (0.3, 0.6), M), ("hello", (0.9, 1.2), M)]
    assert stream(al, 10) == [0, 20, 0, 30, 31, 32, 3, 3, 3, 3]
    # delay 0.4: a (ends 0.3 <= 0.4) dropped; big -> (-0.1, 0.2) loads at t=0; hello -> (0.5, 0.8) -> t=6.
    assert stream(al, 10, audio_delay=0.4) == [30, 31, 32, 3, 3, 0, 10, 11, 3, 3]


def test_negative_audio_delay_moves_text_later_and_blanks_the_first_frames():
    # a -> (0.5, 0.7) -> t=6 (EPAD at 5); the first int(12.5 * 0.4) = 5 frames become -1.
    assert stream([("a", (0.1, 0.3), M)], 10, audio_delay=-0.4) == [-1, -1, -1, -1, -1, 0, 20, 3, 3, 3]
    assert stream([("a", (0.1, 0.3), M)], 3, audio_delay=-0.4) == [-1, -1, -1]


def test_missing_alignments_give_zero_tokens_and_empty_ones_give_pad():
    assert stream(None, 4) == [-1, -1, -1, -1]
    assert stream([], 4) == [3, 3, 3, 3]
    assert stream([("a", (0.0, 0.1), M)], 0) == []
    assert stream([], 2, pad_id=7, epad_id=8) == [7, 7]
    with pytest.raises(ValueError, match="num_frames"):
        stream([], -1)


def test_words_past_the_last_frame_are_ignored_and_long_words_clipped():
    al = [("big", (0.2, 0.5), M), ("cat", (2.0, 2.1), M)]
    assert stream(al, 4) == [3, 0, 30, 31]


def test_tokenize_receives_stripped_words():
    seen = []
    text_stream([(" hello ", (0.0, 0.1), M)], 2, lambda w: seen.append(w) or [5])
    assert seen == ["hello"]


def test_num_frames_for_is_the_reference_ceiling():
    assert num_frames_for(1.0) == 13 and num_frames_for(0.08) == 1 and num_frames_for(0.081) == 2


def test_words_with_equal_start_times_keep_their_input_order():
    # Real transcripts often give two words the same start. The sort is stable: the later word in the input
    # replaces the earlier one (it loads in the same frame), or follows it with keep_and_shift.
    al = [("hello", (0.2, 0.5), M), ("cat", (0.2, 0.3), M)]
    assert stream(al, 6) == [3, 0, 40, 3, 3, 3]
    assert stream(al[::-1], 6) == [3, 0, 10, 11, 3, 3]
    assert stream(al, 6, keep_and_shift=True) == [3, 0, 10, 11, 40, 3]
    # with another speaker at the same time, the input order decides the markers too
    al = [("cat", (0.2, 0.6), M), ("dog", (0.2, 0.5), OTHER)]
    kw = dict(keep_main_only=False, use_bos_eos=True, bos_id=1, eos_id=2)
    assert stream(al, 6, keep_and_shift=True, **kw) == [3, 0, 1, 40, 2, 50]
    assert stream(al[::-1], 6, keep_and_shift=True, **kw) == [3, 0, 50, 51, 1, 40]


def test_three_speakers_bos_eos_mark_only_turns_into_and_out_of_the_main_speaker():
    # S1 opens (no marker), S2 after S1 (no marker: neither is main), main after S2 (BOS), S2 after main (EOS),
    # S1 after S2 (nothing). Frames: t=1, 3, 6, 8, 11.
    s2 = "SPEAKER_2"
    al = [("cat", (0.1, 0.2), OTHER), ("a", (0.3, 0.4), s2), ("cat", (0.5, 0.6), M), ("a", (0.7, 0.8), s2),
          ("cat", (0.9, 1.0), OTHER)]
    got = stream(al, 13, keep_main_only=False, use_bos_eos=True, bos_id=1, eos_id=2)
    assert got == [0, 40, 0, 20, 3, 0, 1, 40, 2, 20, 0, 40, 3]
    # keep_main_only drops the other two, and there are no markers
    assert stream(al, 13, use_bos_eos=True, bos_id=1, eos_id=2) == [3, 3, 3, 3, 3, 0, 40, 3, 3, 3, 3, 3, 3]


def test_word_times_on_frame_boundaries_and_at_the_end_of_the_audio():
    # A start exactly on frame k's boundary (k * 0.08 s) loads in frame k; an end exactly on frame k's boundary
    # puts in-word pad up to frame k itself (int(k) = k).
    assert stream([("cat", (0.08, 0.24), M)], 5, in_word_pad_id=7) == [0, 40, 7, 7, 3]
    # A word ending at or past the audio's end fills the stream to its last frame, never beyond.
    assert stream([("cat", (0.5, 0.8), M)], num_frames_for(0.8), in_word_pad_id=7) == [3] * 5 + [0, 40, 7, 7, 7]
    assert stream([("cat", (0.5, 5.0), M)], 10, in_word_pad_id=7) == [3] * 5 + [0, 40, 7, 7, 7]
    # A word starting in the last frame is emitted there; one starting exactly at the end is not.
    assert stream([("big", (0.75, 0.8), M)], 10) == [3] * 8 + [0, 30]
    assert stream([("cat", (0.8, 0.9), M)], 10) == [3] * 10


def test_audio_delay_drops_words_ending_at_the_delay_and_keeps_those_ending_after_it():
    al = [("cat", (0.1, 0.32), M), ("a", (0.4, 0.6), M)]
    # delay 0.32: cat ends exactly at the delay -> dropped; a -> (0.08, 0.28) -> frame 1.
    assert stream(al, 5, audio_delay=0.32) == [0, 20, 3, 3, 3]
    # delay 0.31: cat -> (-0.21, 0.01) is kept and loads at frame 0, a -> (0.09, 0.29) replaces it in frame 1.
    assert stream(al, 5, audio_delay=0.31) == [40, 20, 3, 3, 3]
    # A negative delay blanks int(12.5 * 0.32) = 4 frames (the float product is 4.0, not 3.99..).
    assert stream([("cat", (0.0, 0.1), M)], 7, audio_delay=-0.32) == [-1, -1, -1, -1, 40, 3, 3]


# --- validation ----------------------------------------------------------------------------------------------------
def test_valid_alignments_come_back_as_float_tuples():
    got = validate_alignments([["hi", [0, 0.5], M], ("there", (0.5, 0.5), M)], duration=1.0)
    assert got == [("hi", (0.0, 0.5), M), ("there", (0.5, 0.5), M)]
    assert all(isinstance(t, float) for _, ts, _ in got for t in ts)


def test_start_after_end_is_an_error_naming_the_word_and_times():
    with pytest.raises(AlignmentError, match=r"alignment 1 \('cat'\): start 0\.700 s > end 0\.600 s"):
        validate_alignments([["a", [0.1, 0.2], M], ["cat", [0.7, 0.6], M]], duration=1.0)


@pytest.mark.parametrize("times", [[0.9, 1.2], [-0.2, 0.1], [3.0, 3.5]])
def test_words_outside_the_audio_are_errors(times):
    with pytest.raises(AlignmentError, match=r"\('cat'\) at \[.*\] s lies outside the audio \(0 \.\. 1\.000 s\)"):
        validate_alignments([["cat", times, M]], duration=1.0)


def test_one_frame_of_slack_by_default_and_configurable():
    validate_alignments([["cat", [0.9, 1.07], M], ["a", [-0.05, 0.0], M]], duration=1.0)
    with pytest.raises(AlignmentError, match="outside the audio"):
        validate_alignments([["cat", [0.9, 1.07], M]], duration=1.0, tolerance=0.0)


def test_words_exactly_at_the_edges_of_the_audio_are_valid_and_one_frame_past_them_is_not():
    # tolerance 0: [0, duration] is inside; the default slack is one frame (0.08 s at 12.5 Hz), no more.
    validate_alignments([["a", [0.0, 0.2], M], ["cat", [0.9, 1.0], M]], duration=1.0, tolerance=0.0)
    validate_alignments([["a", [-0.08, 0.2], M], ["cat", [0.9, 1.08], M]], duration=1.0)
    for times in ([0.9, 1.09], [-0.09, 0.2]):
        with pytest.raises(AlignmentError, match="outside the audio"):
            validate_alignments([["cat", times, M]], duration=1.0)
    # the slack is one frame at the given frame rate
    with pytest.raises(AlignmentError, match="outside the audio"):
        validate_alignments([["cat", [0.9, 1.05], M]], duration=1.0, frame_rate=25.0)
    assert validate_alignments([["x", [0, 1], M]], duration=1) == [("x", (0.0, 1.0), M)]
    assert all(type(t) is float for t in validate_alignments([["x", [0, 1], M]], duration=1)[0][1])


def test_unknown_speaker_label_is_an_error():
    with pytest.raises(AlignmentError, match=r"'cat' at \[0\.100, 0\.200\] s\): unknown speaker label 'BOB'"):
        validate_alignments([["cat", [0.1, 0.2], "BOB"]], duration=1.0)
    validate_alignments([["cat", [0.1, 0.2], "BOB"]], duration=1.0, speakers={"BOB", M})
    validate_alignments([["cat", [0.1, 0.2], "ANYONE"]], duration=1.0, speakers=None)


@pytest.mark.parametrize(
    "entry, match",
    [
        (["cat", [0.1, 0.2]], "not \\[word, \\[start, end\\], speaker\\]"),
        ([3, [0.1, 0.2], M], "not \\[word"),
        (["cat", [0.1], M], "not \\[word"),
        (["cat", ["0.1", 0.2], M], "finite numbers"),
        (["cat", [float("nan"), 0.2], M], "finite numbers"),
        (["cat", [True, 0.2], M], "finite numbers"),
    ],
)
def test_malformed_entries_are_errors(entry, match):
    with pytest.raises(AlignmentError, match=match):
        validate_alignments([entry], duration=1.0)
    with pytest.raises(AlignmentError, match="must be a list"):
        validate_alignments({"alignments": []}, duration=1.0)


def test_window_keeps_words_starting_inside_with_relative_times():
    al = [("a", (0.5, 1.5), M), ("cat", (1.2, 1.4), M), ("dog", (2.9, 3.5), M), ("big", (3.0, 3.2), M)]
    assert window_alignments(al, 1.0, 2.0) == [("cat", (pytest.approx(0.2), pytest.approx(0.4)), M),
                                              ("dog", (pytest.approx(1.9), pytest.approx(2.5)), M)]
    with pytest.raises(AlignmentError, match="sorted"):
        window_alignments(list(reversed(al)), 0.0, 1.0)
    # equal start times are sorted; a window starting or ending exactly at a start includes / excludes it
    ties = [("a", (1.0, 1.2), M), ("cat", (1.0, 1.5), M), ("dog", (2.0, 2.5), M)]
    assert [w for w, _, _ in window_alignments(ties, 1.0, 1.0)] == ["a", "cat"]
    assert [w for w, _, _ in window_alignments(ties, 0.5, 1.5)] == ["a", "cat"]
    assert window_alignments(ties, 3.0, 1.0) == [] and window_alignments([], 0.0, 1.0) == []
    with pytest.raises(AlignmentError, match="sorted"):  # one neighbour pair out of order is enough
        window_alignments([("a", (0.1, 0.2), M), ("b", (0.3, 0.4), M), ("c", (0.2, 0.5), M)], 0.0, 1.0)


# --- recorded outputs of moshi-finetune's own code (runs without a checkout) ------------------------------------
FIXTURE = Path(__file__).parent / "fixtures" / "interleaver_moshi_finetune.json"


def _fixture() -> dict:
    return json.loads(FIXTURE.read_text())


def test_recorded_moshi_finetune_streams_are_reproduced():
    # 279 cases run through moshi-finetune's Interleaver.prepare_item by tests/data/make_interleaver_fixtures.py:
    # speakers (1-3, BOS/EOS), audio delays, overlaps, equal start times, frame-boundary and end-of-audio times.
    data = _fixture()
    vocab = data["vocab"]
    assert len(data["cases"]) > 250
    for case in data["cases"]:
        al = case["alignments"]
        al = None if al is None else [(w, (s, e), spk) for w, (s, e), spk in al]
        st = case["settings"]
        n = num_frames_for(case["duration"], data["frame_rate"])
        got = text_stream(
            al, n, lambda w: vocab[w], frame_rate=data["frame_rate"], pad_id=data["pad_id"],
            epad_id=data["epad_id"], zero_id=data["zero_id"], in_word_pad_id=st["in_word_padding"],
            main_speaker=data["main_speaker"], keep_main_only=st["keep_main_only"], use_bos_eos=st["use_bos_eos"],
            keep_and_shift=st["keep_and_shift"], audio_delay=st["audio_delay"], bos_id=data["bos_id"],
            eos_id=data["eos_id"],
        ).tolist()
        # A negative delay longer than the audio makes the reference's list overlong; its InterleavedTokenizer
        # cuts it back to the frame count, which is what we return.
        assert got == case["tokens"][:n], case["name"]


def test_recorded_moshi_finetune_windows_are_reproduced():
    for w in _fixture()["windows"]:
        al = [(word, (s, e), spk) for word, (s, e), spk in w["alignments"]]
        start = w["start_sec"]
        want = [(word, (s - start, e - start), spk) for word, (s, e), spk in al[w["first"]:w["end"]]]
        assert window_alignments(al, start, w["duration_sec"]) == want, w


# --- optional parity with the reference implementation -------------------------------------------------------------
def _load_reference_interleaver():
    root = os.environ.get("MOSHI_FINETUNE_DIR")
    path = Path(root or "") / "finetune" / "data" / "interleaver.py"
    if not root or not path.is_file():
        pytest.skip("set MOSHI_FINETUNE_DIR to a kyutai-labs/moshi-finetune checkout to run the reference parity test")
    pytest.importorskip("moshi.conditioners")
    spec = importlib.util.spec_from_file_location("_reference_interleaver", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class _FakeSentencePiece:
    """The slice of SentencePieceProcessor the reference uses: encode(list[str]) -> list[list[int]], bos/eos."""

    def encode(self, texts):
        if isinstance(texts, str):
            return self.encode([texts])[0]
        return [self.word(t) for t in texts]

    @staticmethod
    def word(text: str) -> list[int]:
        if text == "\n":
            return [4]
        # 0..3 tokens per word, ids >= 5, a pure function of the word.
        return [5 + (ord(c) * 7 + i) % 90 for i, c in enumerate(text[: len(text) % 4])]

    def bos_id(self):
        return 1

    def eos_id(self):
        return 2


@pytest.mark.parity
def test_random_alignments_match_the_reference_interleaver():
    ref = _load_reference_interleaver()
    sp = _FakeSentencePiece()
    rng = np.random.default_rng(0)
    words = ["a", "to", "the", "cats", "hello", "world", "x", "banana"]
    for trial in range(400):
        n = int(rng.integers(0, 12))
        al = []
        for _ in range(n):
            s = float(rng.uniform(-0.3, 3.0)) if rng.random() > 0.2 else round(float(rng.integers(0, 30)) * 0.08, 2)
            e = s + float(rng.choice([rng.uniform(-0.1, 0.0), 0.0, rng.uniform(0.0, 1.2)]))
            al.append((str(rng.choice(words)), (s, e), str(rng.choice([M, M, OTHER]))))
        duration = float(rng.uniform(0.8, 3.5))
        kw = dict(
            keep_main_only=bool(rng.random() < 0.5),
            use_bos_eos=bool(rng.random() < 0.5),
            keep_and_shift=bool(rng.random() < 0.3),
            in_word_padding=int(rng.choice([3, 7])),
            audio_delay=float(rng.choice([0.0, 0.3, 0.64, -0.32, -0.5])),
        )
        inter = ref.Interleaver(sp, 12.5, 3, 0, -1, main_speaker_label=M, device="cpu", **kw)
        expected = inter.prepare_item(al if trial % 50 else None, duration).view(-1).tolist()
        got = text_stream(
            al if trial % 50 else None, math.ceil(duration * 12.5), sp.word, keep_main_only=kw["keep_main_only"],
            use_bos_eos=kw["use_bos_eos"], keep_and_shift=kw["keep_and_shift"], in_word_pad_id=kw["in_word_padding"],
            audio_delay=kw["audio_delay"], bos_id=1, eos_id=2,
        ).tolist()
        assert got == expected, (trial, al, duration, kw)
