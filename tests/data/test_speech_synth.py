"""eSpeak NG synthesis with word timings, the built-in sample, the synthetic dialogue set (moshi-finetune layout)."""

import json
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from moshi_jax.audio import load_audio
from moshi_jax.data.speech_synth import (
    MAIN_SPEAKER,
    SAMPLE_RATE,
    SENTENCES,
    VOICES,
    SpeechEngine,
    build_dialogue_dataset,
    builtin_sample,
    synthesize,
)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


def _span(audio: np.ndarray, s: float, e: float) -> np.ndarray:
    return audio[int(s * SAMPLE_RATE) : int(e * SAMPLE_RATE)]


def test_synthesize_gives_24khz_audio_and_one_timing_per_written_word():
    text = "Hello, world. I paid 42 dollars for it."
    utt = synthesize(text, "en-us")
    assert utt.audio.dtype == np.float32 and utt.audio.ndim == 1 and utt.sample_rate == SAMPLE_RATE
    assert 1.5 < utt.duration < 6.0
    # Words are the written tokens (punctuation kept, "42" one word although eSpeak says "forty two").
    assert [w for w, _, _ in utt.words] == text.split()


@pytest.mark.parametrize("voice", ["en-us", "en-us+f3", "en-gb+m3"])
def test_word_timings_are_monotone_and_inside_the_audio(voice):
    utt = synthesize("Could you speak a little more slowly? Sorry, I was talking too fast.", voice)
    prev_end = 0.0
    for word, s, e in utt.words:
        assert prev_end <= s < e <= utt.duration, (word, s, e)
        prev_end = e


def test_speech_energy_is_where_the_words_are_and_pauses_are_silent():
    utt = synthesize("Hello, world. See you tomorrow, have a good night.", "en-us+f3")
    a = utt.audio
    loud = _rms(a)
    for word, s, e in utt.words:
        assert _rms(_span(a, s, e)) > 0.25 * loud, word
    # Word ends exclude the pause that follows punctuation: the gap after "Hello," and "world." is silent.
    (_, _, hello_end), (_, world_start, world_end), (_, see_start, _) = utt.words[:3]
    assert world_start - hello_end > 0.05 and see_start - world_end > 0.1
    assert _rms(_span(a, hello_end + 0.01, world_start - 0.01)) < 0.05 * loud
    assert _rms(_span(a, world_end + 0.01, see_start - 0.01)) < 0.05 * loud
    # Leading/trailing silence is trimmed to a short margin.
    assert utt.words[0][1] < 0.05 and utt.duration - utt.words[-1][2] < 0.08


def test_synthesize_is_deterministic_whatever_was_synthesised_before():
    # eSpeak NG keeps state across calls in one library instance; fresh engines make the output a pure function.
    first = synthesize("The cat is sleeping on my chair again.", "en-us+f3")
    synthesize("Something else entirely, to disturb any state.", "en-gb+m3")
    again = synthesize("The cat is sleeping on my chair again.", "en-us+f3")
    np.testing.assert_array_equal(first.audio, again.audio)
    assert first.words == again.words


def test_engines_started_in_different_seconds_agree():
    # eSpeak NG seeds its breath-noise generator with time(NULL) at initialisation; we reseed per call.
    with SpeechEngine() as a:
        x = a.synthesize("Just let her sleep, she looks happy.", "en-us+f3")
    time.sleep(1.05)
    with SpeechEngine() as b:
        y = b.synthesize("Just let her sleep, she looks happy.", "en-us+f3")
    np.testing.assert_array_equal(x.audio, y.audio)


def test_two_engines_with_the_same_calls_agree():
    texts = ["Hello, how are you today?", "I am doing well, thank you for asking.", "Hello, how are you today?"]
    with SpeechEngine() as a, SpeechEngine() as b:
        ra = [a.synthesize(t, "en-us+m7") for t in texts]
        rb = [b.synthesize(t, "en-us+m7") for t in texts]
    for x, y in zip(ra, rb, strict=True):
        np.testing.assert_array_equal(x.audio, y.audio)


def test_concurrent_threads_give_the_same_audio_as_sequential_calls():
    texts = [SENTENCES[i] for i in range(6)]
    expected = [synthesize(t, "en-gb+f4").audio for t in texts]
    got: dict[int, np.ndarray] = {}
    shared = SpeechEngine()

    def work(i: int) -> None:
        got[i] = synthesize(texts[i], "en-gb+f4").audio
        shared.synthesize(texts[i], "en-us")  # concurrent use of one engine is serialised, never corrupted

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shared.close()
    for i, e in enumerate(expected):
        np.testing.assert_array_equal(got[i], e)


def test_voices_are_really_different():
    text = "We should go hiking in the mountains."
    audios = {v: synthesize(text, v).audio for v in ("en-us", "en-us+f3", "en-gb+m3")}
    # Different voices differ in pitch: compare the average spectral centroid.
    def centroid(x):
        spec = np.abs(np.fft.rfft(x))
        return float(np.sum(spec * np.arange(spec.size)) / np.sum(spec)) * SAMPLE_RATE / 2 / spec.size

    cs = {v: centroid(a) for v, a in audios.items()}
    assert len({round(c, -1) for c in cs.values()}) == 3, cs
    assert not np.array_equal(audios["en-us+f3"][:1000], audios["en-gb+m3"][:1000])


def test_all_listed_voices_synthesise():
    for v in VOICES:
        assert synthesize("Yes.", v).duration > 0.1


@pytest.mark.parametrize(
    "voice, match",
    [("xx-nowhere", "unknown eSpeak NG voice language"), ("en-us+nosuch", "unknown eSpeak NG voice variant")],
)
def test_unknown_voice_is_an_error(voice, match):
    with pytest.raises(ValueError, match=match):
        synthesize("Hello.", voice)


def test_library_copy_falls_back_to_the_user_cache_where_tmp_is_noexec(monkeypatch, tmp_path):
    import ctypes

    from moshi_jax.data import speech_synth

    real_cdll, tried = ctypes.CDLL, []

    def cdll(path, *args, **kwargs):  # a noexec temp dir: dlopen fails there
        tried.append(path)
        if not path.startswith(str(tmp_path / "home")):
            raise OSError("failed to map segment from shared object")
        return real_cdll(path, *args, **kwargs)

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(speech_synth.ctypes, "CDLL", cdll)
    with SpeechEngine() as engine:
        assert engine.synthesize("Yes.").duration > 0.1
    assert len(tried) == 2 and tried[1].startswith(str(tmp_path / "home" / ".cache" / "moshi_jax"))
    assert list((tmp_path / "home" / ".cache" / "moshi_jax").iterdir()) == []  # the copy is unlinked
    monkeypatch.setattr(speech_synth.ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("noexec")))
    with pytest.raises(RuntimeError, match="cannot load a private copy of the eSpeak NG library.*noexec"):
        SpeechEngine()


def test_bad_text_and_parameters_are_errors():
    with pytest.raises(ValueError, match="empty text"):
        synthesize("   ")
    with pytest.raises(ValueError, match="rate_wpm"):
        synthesize("Hello.", rate_wpm=10)
    with pytest.raises(ValueError, match="pitch"):
        synthesize("Hello.", pitch=101)
    engine = SpeechEngine()
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.synthesize("Hello.")


def test_builtin_sample_is_a_few_seconds_of_deterministic_speech():
    a = builtin_sample()
    assert a.dtype == np.float32 and a.ndim == 1
    assert 2.0 < a.shape[0] / SAMPLE_RATE < 8.0
    assert 0.02 < _rms(a) and np.max(np.abs(a)) < 1.0
    a[:] = 0  # callers get a copy
    np.testing.assert_array_equal(builtin_sample(), synthesize(
        "The quick brown fox jumps over the lazy dog, and then it takes a long nap in the warm sun.", "en-us").audio)


def test_sentence_corpus_is_varied_plain_english():
    assert len(SENTENCES) >= 50 and len(set(SENTENCES)) == len(SENTENCES)
    assert all(s.isascii() and re.fullmatch(r"[A-Z].*[.?!]", s) for s in SENTENCES)
    vocab = {w.strip(",.?!").lower() for s in SENTENCES for w in s.split()}
    assert len(vocab) > 200


# --- dialogue dataset ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("dialogues")
    return build_dialogue_dataset(out, num_dialogues=3, seconds=12.0, seed=7)


def _items(manifest):
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def test_dataset_has_the_moshi_finetune_layout(dataset):
    assert dataset.name == "manifest.jsonl"
    items = _items(dataset)
    assert len(items) == 3
    for it in items:
        assert set(it) == {"path", "duration"} and not it["path"].startswith("/")
        wav_path = dataset.parent / it["path"]
        info = sf.info(str(wav_path))
        assert (info.samplerate, info.channels) == (24000, 2)
        assert info.frames == int(round(12.0 * 24000)) and it["duration"] == pytest.approx(12.0)
        meta = json.loads(wav_path.with_suffix(".json").read_text())
        assert set(meta) == {"alignments"} and meta["alignments"]
        for a in meta["alignments"]:
            word, (s, e), spk = a
            assert isinstance(word, str) and word.strip() and spk == MAIN_SPEAKER
            assert isinstance(s, float) and isinstance(e, float)


def test_dataset_alignments_are_monotone_inside_the_audio_and_match_channel0_speech(dataset):
    for it in _items(dataset):
        wav = load_audio(dataset.parent / it["path"], SAMPLE_RATE, mono=False, require_channels=2)
        main, user = wav
        align = json.loads((dataset.parent / it["path"]).with_suffix(".json").read_text())["alignments"]
        prev_end = 0.0
        in_words = np.zeros(main.shape[0], bool)
        for word, (s, e), _ in align:
            assert prev_end <= s < e <= it["duration"], (word, s, e)
            prev_end = e
            assert _rms(_span(main, s, e)) > 0.2 * _rms(main[main != 0]), word
            in_words[int(s * SAMPLE_RATE) : int(e * SAMPLE_RATE)] = True
        # Channel 0 holds only the aligned voice: nearly all its energy lies inside word spans.
        energy = np.square(main, dtype=np.float64)
        assert energy[~in_words].sum() < 0.05 * energy.sum()
        assert _rms(user) > 0.01  # the user speaks too


def test_dataset_both_speakers_talk_and_sometimes_overlap(dataset):
    both = 0
    for it in _items(dataset):
        wav = load_audio(dataset.parent / it["path"], SAMPLE_RATE, mono=False)
        frames = wav[:, : wav.shape[1] // 1200 * 1200].reshape(2, -1, 1200)  # 50 ms frames
        active = np.sqrt(np.mean(frames**2, axis=-1)) > 0.01
        assert active[0].any() and active[1].any()
        both += int(np.sum(active[0] & active[1]))
    assert both > 0  # overlapping speech somewhere in the set


def test_dataset_is_deterministic_for_a_seed(dataset, tmp_path):
    again = build_dialogue_dataset(tmp_path / "again", num_dialogues=2, seconds=12.0, seed=7)
    other = build_dialogue_dataset(tmp_path / "other", num_dialogues=1, seconds=12.0, seed=8)
    for it in _items(again):
        a, b = dataset.parent / it["path"], again.parent / it["path"]
        assert a.read_bytes() == b.read_bytes()
        assert a.with_suffix(".json").read_text() == b.with_suffix(".json").read_text()
    first = _items(other)[0]["path"]
    assert (other.parent / first).read_bytes() != (dataset.parent / first).read_bytes()


def test_dataset_is_identical_when_built_in_another_process(dataset, tmp_path):
    code = (
        "import sys; from moshi_jax.data.speech_synth import build_dialogue_dataset; "
        "build_dialogue_dataset(sys.argv[1], num_dialogues=1, seconds=12.0, seed=7)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "sub")], check=True, timeout=120)
    rel = _items(dataset)[0]["path"]
    assert (tmp_path / "sub" / rel).read_bytes() == (dataset.parent / rel).read_bytes()
    assert (tmp_path / "sub" / rel).with_suffix(".json").read_text() == (dataset.parent / rel).with_suffix(
        ".json").read_text()


def test_dataset_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="num_dialogues"):
        build_dialogue_dataset(tmp_path, 0, 10.0, 0)
    with pytest.raises(ValueError, match="seconds"):
        build_dialogue_dataset(tmp_path, 1, 1.0, 0)
