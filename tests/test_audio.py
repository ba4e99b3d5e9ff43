"""moshi_jax.audio: loading real files (WAV/FLAC, any rate and channel count) and every bad-input error."""

import logging

import numpy as np
import pytest
import soundfile as sf

from moshi_jax.audio import AudioError, load_audio, resample, save_audio


def _tone(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_wav_at_target_rate_loads_exactly(tmp_path):
    x = _tone(440.0, 24000, 0.5)
    sf.write(tmp_path / "a.wav", x, 24000, subtype="FLOAT")
    wav = load_audio(tmp_path / "a.wav", 24000)
    assert wav.shape == (1, x.shape[0]) and wav.dtype == np.float32
    np.testing.assert_array_equal(wav[0], x)


def test_flac_16bit_loads_within_quantization_error(tmp_path):
    x = _tone(300.0, 24000, 0.25)
    sf.write(tmp_path / "a.flac", x, 24000)
    wav = load_audio(tmp_path / "a.flac", 24000)
    assert wav.shape == (1, x.shape[0])
    np.testing.assert_allclose(wav[0], x, atol=2.0 / 32768)


def test_other_rate_is_resampled_with_soxr_and_logged(tmp_path, caplog):
    # 1 kHz tone at 44.1 kHz -> 24 kHz: length scales and the tone keeps its frequency.
    x = _tone(1000.0, 44100, 1.0)
    sf.write(tmp_path / "a.wav", x, 44100, subtype="FLOAT")
    with caplog.at_level(logging.INFO, logger="moshi_jax.audio"):
        wav = load_audio(tmp_path / "a.wav", 24000)
    assert "resampling 44100 Hz -> 24000 Hz" in caplog.text
    assert wav.shape == (1, 24000)
    ref = _tone(1000.0, 24000, 1.0)
    # Away from the edges (filter transients) the resampled tone matches the analytic one.
    np.testing.assert_allclose(wav[0, 500:-500], ref[500:-500], atol=2e-3)
    peak_bin = np.argmax(np.abs(np.fft.rfft(wav[0])))
    assert peak_bin == 1000  # 1 Hz bins for a 1 s signal


def test_stereo_is_downmixed_to_mono_and_logged(tmp_path, caplog):
    left, right = _tone(200.0, 24000, 0.2), _tone(500.0, 24000, 0.2, amp=0.25)
    sf.write(tmp_path / "s.wav", np.stack([left, right], 1), 24000, subtype="FLOAT")
    with caplog.at_level(logging.INFO, logger="moshi_jax.audio"):
        wav = load_audio(tmp_path / "s.wav", 24000, mono=True)
    assert "downmixing 2 channels to mono" in caplog.text
    np.testing.assert_allclose(wav[0], (left + right) / 2, atol=1e-7)


def test_stereo_kept_when_not_mono_with_channel_order(tmp_path):
    left, right = _tone(200.0, 16000, 0.2), _tone(500.0, 16000, 0.2)
    sf.write(tmp_path / "s.wav", np.stack([left, right], 1), 16000, subtype="FLOAT")
    wav = load_audio(tmp_path / "s.wav", 24000, mono=False, require_channels=2)
    assert wav.shape == (2, int(0.2 * 24000))
    np.testing.assert_allclose(wav, resample(np.stack([left, right]), 16000, 24000), atol=1e-7)
    # Channel order is preserved: each channel keeps its own tone.
    freqs = [np.argmax(np.abs(np.fft.rfft(c))) * 24000 / wav.shape[1] for c in wav]
    assert freqs == pytest.approx([200.0, 500.0], abs=5.0)


def test_mono_file_where_stereo_required_is_rejected(tmp_path):
    sf.write(tmp_path / "m.wav", _tone(200.0, 24000, 0.1), 24000)
    with pytest.raises(AudioError, match=r"m\.wav: expected 2 channels, got 1"):
        load_audio(tmp_path / "m.wav", 24000, mono=False, require_channels=2)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(AudioError, match=r"nope\.wav: audio file not found"):
        load_audio(tmp_path / "nope.wav", 24000)


def test_directory_is_not_audio(tmp_path):
    with pytest.raises(AudioError, match="not a regular file"):
        load_audio(tmp_path, 24000)


def test_garbage_bytes_are_reported_as_unreadable(tmp_path):
    (tmp_path / "junk.wav").write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(AudioError, match=r"junk\.wav: cannot read audio"):
        load_audio(tmp_path / "junk.wav", 24000)


def test_truncated_wav_is_rejected_not_silently_shortened(tmp_path):
    sf.write(tmp_path / "a.wav", _tone(200.0, 24000, 0.5), 24000, subtype="FLOAT")
    data = (tmp_path / "a.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    # libsndfile alone would return half the samples without complaint.
    assert sf.info(str(tmp_path / "cut.wav")).frames < 12000
    with pytest.raises(AudioError, match=r"cut\.wav: truncated file"):
        load_audio(tmp_path / "cut.wav", 24000)


def test_truncated_flac_is_rejected(tmp_path):
    sf.write(tmp_path / "a.flac", _tone(200.0, 24000, 0.5), 24000)
    data = (tmp_path / "a.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match=r"cut\.flac: (cannot read audio|truncated)"):
        load_audio(tmp_path / "cut.flac", 24000)


def test_header_only_file_is_rejected(tmp_path):
    sf.write(tmp_path / "a.wav", _tone(200.0, 24000, 0.1), 24000)
    (tmp_path / "h.wav").write_bytes((tmp_path / "a.wav").read_bytes()[:30])
    with pytest.raises(AudioError, match=r"h\.wav"):
        load_audio(tmp_path / "h.wav", 24000)


def test_empty_audio_is_rejected(tmp_path):
    sf.write(tmp_path / "e.wav", np.zeros((0,), np.float32), 24000)
    with pytest.raises(AudioError, match=r"e\.wav: empty audio"):
        load_audio(tmp_path / "e.wav", 24000)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_rejected(tmp_path, bad):
    x = _tone(200.0, 24000, 0.1)
    x[100] = bad
    sf.write(tmp_path / "n.wav", x, 24000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"n\.wav: 1 non-finite samples"):
        load_audio(tmp_path / "n.wav", 24000)


def test_save_audio_round_trips_float_wav_and_creates_dirs(tmp_path):
    x = np.stack([_tone(200.0, 24000, 0.1, amp=1.5), _tone(300.0, 24000, 0.1)])  # > 1.0: float WAV must not clip
    out = save_audio(tmp_path / "deep" / "dir" / "o.wav", x, 24000)
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.subtype) == (24000, 2, "FLOAT")
    np.testing.assert_array_equal(load_audio(out, 24000, mono=False), x)
    mono = save_audio(tmp_path / "m.wav", x[0], 24000)
    np.testing.assert_array_equal(load_audio(mono, 24000)[0], x[0])


def test_save_audio_is_byte_reproducible_without_the_peak_timestamp(tmp_path):
    x = _tone(200.0, 24000, 0.1)
    a, b = save_audio(tmp_path / "a.wav", x, 24000), save_audio(tmp_path / "b.wav", x, 24000)
    data = a.read_bytes()
    assert data == b.read_bytes()
    peak = data.index(b"PEAK")  # libsndfile's peak chunk stays (readers use it), with a zero timestamp
    assert data[peak + 12 : peak + 16] == b"\0\0\0\0"
    np.testing.assert_array_equal(load_audio(a, 24000)[0], x)


@pytest.mark.parametrize(
    "wav, match",
    [(np.zeros((2, 2, 5)), "must be"), (np.zeros((1, 0)), "empty"), (np.full((5,), np.nan), "NaN")],
)
def test_save_audio_rejects_bad_arrays(tmp_path, wav, match):
    with pytest.raises(AudioError, match=match):
        save_audio(tmp_path / "x.wav", wav, 24000)
