"""The `moshi-jax` command: codec subcommands end to end on real files, and clear errors on bad input."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from moshi_jax.cli import main


def _run(args):
    return main(args)


@pytest.fixture
def speech_44k_stereo(tmp_path):
    # Two channels at 44.1 kHz: the CLI must resample to 24 kHz and downmix.
    t = np.arange(int(44100 * 0.5)) / 44100
    wav = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)], axis=1)
    path = tmp_path / "in.wav"
    sf.write(path, wav.astype(np.float32), 44100, subtype="FLOAT")
    return path


def test_help_lists_codec_subcommands():
    out = subprocess.run([sys.executable, "-m", "moshi_jax.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "codec" in out.stdout
    out = subprocess.run([sys.executable, "-m", "moshi_jax.cli", "codec", "encode", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "--num-codebooks" in out.stdout


def test_encode_then_decode_writes_codes_and_24k_audio(tmp_path, speech_44k_stereo, caplog):
    codes_path, out_path = tmp_path / "codes.npy", tmp_path / "out.wav"
    caplog.set_level("INFO")
    assert _run(["codec", "encode", str(speech_44k_stereo), "-o", str(codes_path), "--preset", "tiny",
                 "--num-codebooks", "3", "--chunk-frames", "4"]) == 0
    codes = np.load(codes_path)
    frames = -(-int(0.5 * 24000) // 1920)
    assert codes.shape == (3, frames) and codes.dtype == np.int32
    assert "RANDOM" in caplog.text  # loud warning about the random model
    assert "resampling 44100 Hz -> 24000 Hz" in caplog.text and "downmixing 2 channels" in caplog.text
    assert _run(["codec", "decode", str(codes_path), "-o", str(out_path), "--preset", "tiny",
                 "--chunk-frames", "4"]) == 0
    audio, sr = sf.read(out_path)
    assert sr == 24000 and audio.shape == (frames * 1920,) and np.isfinite(audio).all()


def test_chunked_cli_encode_equals_library_streaming(tmp_path, speech_44k_stereo):
    import jax

    from moshi_jax.audio import load_audio
    from moshi_jax.mimi.config import MimiConfig
    from moshi_jax.mimi.model import MimiCodec

    codes_path = tmp_path / "codes.npy"
    assert _run(["codec", "encode", str(speech_44k_stereo), "-o", str(codes_path), "--preset", "tiny",
                 "--chunk-frames", "2"]) == 0
    cfg = MimiConfig.tiny()
    codec = MimiCodec(cfg)
    params = codec.init(jax.random.PRNGKey(0))
    wav = load_audio(speech_44k_stereo, 24000, mono=True)
    n = -(-wav.shape[-1] // 1920) * 1920
    wav = np.pad(wav, ((0, 0), (0, n - wav.shape[-1])))[None]
    expected = np.asarray(codec.encode_stream(params, wav))[0]
    np.testing.assert_array_equal(np.load(codes_path), expected)


def test_roundtrip_default_uses_builtin_sample(tmp_path):
    out_path = tmp_path / "rt.wav"
    assert _run(["codec", "roundtrip", "-o", str(out_path), "--preset", "tiny"]) == 0
    audio, sr = sf.read(out_path)
    assert sr == 24000 and audio.size > 24000


@pytest.mark.parametrize("bad, message", [
    ("float_codes", "codes must be integers"),
    ("out_of_range", "code values must be in [0, 63], found range [5000, 5000]"),
    ("wrong_rank", "codes must have shape [K, T]"),
    ("too_many_codebooks", "codes have 40 codebooks; this Mimi supports 1..32"),
])
def test_decode_rejects_bad_codes_with_exit_2(tmp_path, bad, message, caplog):
    codes = {
        "float_codes": np.zeros((8, 4), np.float32),
        "out_of_range": np.full((8, 4), 5000, np.int32),
        "wrong_rank": np.zeros((8,), np.int32),
        "too_many_codebooks": np.zeros((40, 4), np.int32),
    }[bad]
    path = tmp_path / "codes.npy"
    np.save(path, codes)
    assert _run(["codec", "decode", str(path), "-o", str(tmp_path / "o.wav"), "--preset", "tiny"]) == 2
    assert message in caplog.text and not (tmp_path / "o.wav").exists()


def test_encode_rejects_missing_corrupt_empty_and_nan_audio(tmp_path, caplog):
    missing = tmp_path / "missing.wav"
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00garbage" * 10)
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(4800, np.nan, np.float32), 24000, subtype="FLOAT")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 24000, subtype="FLOAT")
    for path in (missing, corrupt, nan, empty):
        caplog.clear()
        assert _run(["codec", "encode", str(path), "-o", str(tmp_path / "c.npy"), "--preset", "tiny"]) == 2
        assert not (tmp_path / "c.npy").exists()
        assert str(path.name) in caplog.text  # the error names the file


def test_bad_weights_file_is_a_clear_error(tmp_path, speech_44k_stereo, caplog):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert _run(["codec", "encode", str(speech_44k_stereo), "-o", str(tmp_path / "c.npy"), "--preset", "tiny",
                 "--weights", str(bad)]) == 2
    assert "cannot load Mimi weights" in caplog.text and "not a readable safetensors file" in caplog.text


def test_weights_of_another_config_are_a_clear_error(tmp_path, speech_44k_stereo, caplog):
    import jax

    from moshi_jax.mimi import checkpoint as mimi_ckpt
    from moshi_jax.mimi.config import MimiConfig
    from moshi_jax.mimi.model import MimiCodec

    other = MimiConfig.tiny(n_filters=8)
    path = mimi_ckpt.save_reference(MimiCodec(other).init(jax.random.PRNGKey(0)), other, tmp_path / "o.safetensors")
    assert _run(["codec", "encode", str(speech_44k_stereo), "-o", str(tmp_path / "c.npy"), "--preset", "tiny",
                 "--weights", str(path)]) == 2
    assert "wrongly shaped keys" in caplog.text


def test_weights_file_is_used_for_encoding(tmp_path, speech_44k_stereo):
    import jax

    from moshi_jax.audio import load_audio
    from moshi_jax.mimi import checkpoint as mimi_ckpt
    from moshi_jax.mimi.config import MimiConfig
    from moshi_jax.mimi.model import MimiCodec

    cfg = MimiConfig.tiny()
    codec = MimiCodec(cfg)
    params = codec.init(jax.random.PRNGKey(7))  # not the CLI's seed-0 random model
    weights = mimi_ckpt.save_reference(params, cfg, tmp_path / "w.safetensors")
    assert _run(["codec", "encode", str(speech_44k_stereo), "-o", str(tmp_path / "c.npy"), "--preset", "tiny",
                 "--weights", str(weights)]) == 0
    wav = load_audio(speech_44k_stereo, 24000, mono=True)[None]
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), np.asarray(codec.encode_stream(params, wav))[0])
