"""`moshi-jax chat / asr / tts` end to end on a short synthesized wav with the random tiny model (in-process)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import soundfile as sf

from moshi_jax.audio import save_audio
from moshi_jax.cli import main
from moshi_jax.data.speech_synth import builtin_sample
from moshi_jax.engine.runner import format_latency, latency_percentiles

SR = 24_000


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    wav = np.asarray(builtin_sample(), np.float32)[: int(1.0 * SR)]  # 1 s = 12.5 frames
    return save_audio(tmp_path_factory.mktemp("cli") / "user.wav", wav, SR), wav.size


def _latency_logged(caplog) -> bool:
    text = caplog.text
    return "per-frame latency over" in text and "p99" in text and "real-time factor" in text and "ms |" in text


def test_chat_writes_moshi_audio_as_long_as_the_input_and_reports_latency(speech, tmp_path, caplog, capsys):
    path, n = speech
    out = tmp_path / "moshi.wav"
    caplog.set_level(logging.INFO)
    assert main(["chat", "--input", str(path), "--output", str(out), "--preset", "tiny", "--seed", "3"]) == 0
    audio, sr = sf.read(out)
    assert sr == SR and audio.shape == (-(-n // 1920) * 1920,)
    assert np.all(audio[:1920] == 0) and np.abs(audio[1920:]).max() > 0  # first frame: warm-up silence
    assert "RANDOMLY INITIALISED" in caplog.text
    assert _latency_logged(caplog)
    assert capsys.readouterr().out.strip()  # text pieces were printed as they came


def test_asr_prints_text_and_writes_timed_pieces(speech, tmp_path, caplog, capsys):
    path, _ = speech
    out = tmp_path / "asr.txt"
    caplog.set_level(logging.INFO)
    assert main(["asr", str(path), "--preset", "tiny", "--delay-frames", "2", "--greedy", "-o", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines and all(len(line.split("\t")) == 2 for line in lines)
    times = [float(line.split("\t")[0]) for line in lines]
    assert times == sorted(times) and times[0] >= 0.0
    assert capsys.readouterr().out.strip()
    assert _latency_logged(caplog)


def test_tts_writes_audio_of_the_spoken_frames(tmp_path, caplog, capsys):
    out = tmp_path / "tts.wav"
    caplog.set_level(logging.INFO)
    assert main(["tts", "hello there friend", "-o", str(out), "--preset", "tiny", "--max-frames", "60"]) == 0
    audio, sr = sf.read(out)
    assert sr == SR and audio.size > 0 and audio.size % 1920 == 0 and np.isfinite(audio).all()
    assert "hello" in capsys.readouterr().out  # the words fed are printed as they are fed
    assert _latency_logged(caplog)


@pytest.mark.parametrize("command", ["chat", "asr", "tts"])
def test_help_exits_cleanly(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "--weights-dir" in capsys.readouterr().out


def test_clear_errors(tmp_path, caplog):
    assert main(["chat", "-o", str(tmp_path / "x.wav"), "--weights-dir", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in caplog.text
    assert main(["tts", "hi", "-o", str(tmp_path / "x.wav"), "--preset", "huge"]) == 2
    assert "--preset must be one of" in caplog.text
    assert main(["asr", "--delay-frames", "-1"]) == 2
    assert "--delay-frames must be >= 0" in caplog.text
    assert main(["chat", "-i", str(tmp_path / "nope.wav"), "-o", str(tmp_path / "x.wav")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["asr", "--weights-dir", str(empty)]) == 2
    assert "cannot set up the model" in caplog.text


def test_latency_report_percentiles_and_histogram():
    lat = np.array([1.0] * 98 + [50.0, 200.0])
    p = latency_percentiles(lat)
    assert p["median"] == 1.0 and p["max"] == 200.0 and 1.0 < p["p99"] < 200.0
    text = format_latency(lat)
    assert "1 frame(s) over the 80 ms budget" in text
    assert sum(int(line.split()[-1]) for line in text.splitlines()[2:]) == lat.size  # every frame is binned
