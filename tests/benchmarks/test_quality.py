"""Quality measures of the benchmark suite on signals whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import quality as Q

SR = Q.SAMPLE_RATE


def _speechlike(seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)  # syllable-rate amplitude modulation
    x = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) / (i + 1) for i, f in enumerate([180, 360, 540, 1200]))
    return (0.2 * env * x + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def test_si_snr_is_gain_invariant_and_matches_the_added_noise_level():
    x = _speechlike()
    noise = np.random.default_rng(1).standard_normal(x.size).astype(np.float32)
    x0 = x - x.mean()
    noise *= np.sqrt(np.mean(x0 ** 2) / np.mean(noise ** 2)) / 10.0  # 20 dB below the signal
    assert Q.si_snr(x, 3.0 * x) > 60
    assert Q.si_snr(x, x + noise) == pytest.approx(20.0, abs=0.3)
    assert Q.si_snr(x, 0.5 * (x + noise)) == pytest.approx(Q.si_snr(x, x + noise), abs=1e-6)


def test_mel_distance_is_zero_for_identical_audio_and_grows_with_distortion():
    x = _speechlike()
    noise = 0.05 * np.random.default_rng(2).standard_normal(x.size).astype(np.float32)
    assert Q.mel_distance(x, x) == 0.0
    d_small, d_big = Q.mel_distance(x, x + 0.1 * noise), Q.mel_distance(x, x + noise)
    assert 0 < d_small < d_big


def test_dtw_mel_distance_ignores_a_time_warp_that_plain_mel_distance_penalises():
    x = _speechlike(0.6)
    shifted = np.concatenate([x[: SR // 10], x])  # the first 100 ms said twice: same content, warped in time
    other = _speechlike(0.6, seed=5)[::-1].copy()
    assert Q.dtw_mel_distance(x, x) == 0.0
    assert Q.dtw_mel_distance(x, shifted) < 0.5 * Q.mel_distance(x, shifted)
    assert Q.dtw_mel_distance(x, shifted) < Q.dtw_mel_distance(x, other)


def test_log_mel_of_a_tone_peaks_in_the_band_of_its_frequency():
    t = np.arange(SR) / SR
    m = Q.log_mel(np.sin(2 * np.pi * 1000 * t).astype(np.float32))
    assert m.shape == (1 + (SR - 1024) // 256, 80)
    fb = Q.mel_filterbank(SR, 1024, 80)
    centre_bins = np.argmax(fb, axis=0) * SR / 1024
    assert abs(centre_bins[np.argmax(m.mean(0))] - 1000) < 120


def test_wer_normalises_case_and_punctuation_and_counts_word_errors():
    assert Q.wer(["Hello, world!"], ["hello world"]) == 0.0
    assert Q.wer(["the cat sat", "a dog"], ["the cat", "a big dog"]) == pytest.approx(2 / 5)
    assert Q.wer(["two words"], [""]) == 1.0
    with pytest.raises(ValueError, match="2 references but 1"):
        Q.wer(["a", "b"], ["a"])


def test_pesq_and_stoi_rank_clean_above_noisy_speech_when_installed():
    pytest.importorskip("pesq")
    pytest.importorskip("pystoi")
    from moshi_jax.data.speech_synth import synthesize

    x = synthesize("The quick brown fox jumps over the lazy dog.").audio
    noisy = x + 0.05 * np.random.default_rng(3).standard_normal(x.size).astype(np.float32)
    assert Q.pesq_wb(x, x) > 4.0 > Q.pesq_wb(x, noisy)
    assert Q.stoi(x, x) > 0.99 > Q.stoi(x, noisy)
