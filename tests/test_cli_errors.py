"""Every user mistake is one error line and exit status 2, found before any model is built (a tripwire on the
model loaders fails the test otherwise), never a traceback; tracebacks only with --debug."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from moshi_jax import cli


@pytest.fixture
def wav(tmp_path):
    path = tmp_path / "in.wav"
    t = np.arange(2400) / 24000
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24000, subtype="FLOAT")
    return path


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("a regular file")
    return path


@pytest.fixture
def tripwire(monkeypatch):
    """Building any model (codec, engine, training data or mesh) fails the test."""
    def boom(*a, **k):
        raise AssertionError("a model was built before the arguments were checked")

    import moshi_jax.data.tokenize as tokenize
    import moshi_jax.engine.engine as engine
    import moshi_jax.training.train_lm as train_lm

    monkeypatch.setattr(cli, "_load_codec", boom)
    monkeypatch.setattr(engine.Engine, "load", boom)
    monkeypatch.setattr(tokenize, "load_mimi", boom)
    monkeypatch.setattr(train_lm, "prepare_data", boom)
    monkeypatch.setattr(train_lm, "build_mesh", boom)


@pytest.fixture(autouse=True)
def _see_moshi_jax_logs(caplog):
    """The train command's log set-up stops "moshi_jax" records from reaching the root logger: watch it too."""
    log = logging.getLogger("moshi_jax")
    log.addHandler(caplog.handler)
    yield
    log.removeHandler(caplog.handler)


def _one_error(caplog, *needles: str) -> str:
    errors = list({id(r): r for r in caplog.records if r.levelno >= logging.ERROR}.values())
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert not errors[0].exc_info  # no traceback
    msg = errors[0].getMessage()
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


CASES = {
    # codec
    "encode -o under a file": (lambda d: ["codec", "encode", d["wav"], "-o", f"{d['file']}/codes.npy",
                                          "--preset", "tiny"], "is a file, not a folder"),
    "encode -o an existing folder": (lambda d: ["codec", "encode", d["wav"], "-o", d["dir"], "--preset", "tiny"],
                                     "is an existing folder"),
    "encode --chunk-frames 0": (lambda d: ["codec", "encode", d["wav"], "-o", d["out"] + ".npy", "--chunk-frames",
                                           "0", "--preset", "tiny"], "--chunk-frames must be >= 1, got 0"),
    "roundtrip --chunk-frames -3": (lambda d: ["codec", "roundtrip", d["wav"], "-o", d["out"] + ".wav",
                                               "--chunk-frames", "-3", "--preset", "tiny"], "got -3"),
    "encode --num-codebooks 0": (lambda d: ["codec", "encode", d["wav"], "-o", d["out"] + ".npy",
                                            "--num-codebooks", "0", "--preset", "tiny"],
                                 "--num-codebooks must be in 1..", "got 0"),
    "encode missing --weights": (lambda d: ["codec", "encode", d["wav"], "-o", d["out"] + ".npy", "--weights",
                                            d["dir"] + "/nope.safetensors"], "--weights", "not found"),
    "decode codes file missing": (lambda d: ["codec", "decode", d["dir"] + "/nope.npy", "-o", d["out"] + ".wav",
                                             "--preset", "tiny"], "cannot read codes"),
    # training
    "train run_dir is a file": (lambda d: ["train", "tiny", f"run_dir={d['file']}", "data.builtin=random"],
                                "run_dir", "is an existing file"),
    "train run_dir under a file": (lambda d: ["train", "tiny", f"run_dir={d['file']}/run"],
                                   "run_dir", "is a file, not a folder"),
    "train checkpoint.dir is a file": (lambda d: ["train", "tiny", f"run_dir={d['dir']}/run",
                                                  f"checkpoint.dir={d['file']}"], "checkpoint.dir"),
    "train init_from missing": (lambda d: ["train", "tiny", f"run_dir={d['dir']}/run",
                                           f"init_from={d['dir']}/nope.safetensors"], "init_from"),
    "train data source missing": (lambda d: ["train", "tiny", f"run_dir={d['dir']}/run",
                                             f"data.sources={d['dir']}/nope"], "data.sources", "not found"),
    # data
    "tokenize -o under a file": (lambda d: ["data", "tokenize", d["manifest"], "-o", f"{d['file']}/tok"],
                                 "is a file, not a folder"),
    "tokenize -o is a file": (lambda d: ["data", "tokenize", d["manifest"], "-o", d["file"]],
                              "is an existing file"),
    "tokenize --chunk-frames 0": (lambda d: ["data", "tokenize", d["manifest"], "-o", d["out"],
                                             "--chunk-frames", "0"], "chunk_frames must be >= 1"),
    "tokenize --num-codebooks 0": (lambda d: ["data", "tokenize", d["manifest"], "-o", d["out"],
                                              "--num-codebooks", "0"], "num_codebooks must be >= 1"),
    "tokenize-text -o under a file": (lambda d: ["data", "tokenize-text", d["manifest"], "-o", f"{d['file']}/t",
                                                 "--tokenizer", "x.model"], "is a file, not a folder"),
    "builtin --num-dialogues 0": (lambda d: ["data", "builtin", "-o", d["out"], "--num-dialogues", "0"],
                                  "--num-dialogues must be >= 1"),
    "builtin --seconds -1": (lambda d: ["data", "builtin", "-o", d["out"], "--seconds", "-1"], "--seconds"),
    "builtin --seconds 2": (lambda d: ["data", "builtin", "-o", d["out"], "--seconds", "2"],
                            "seconds must be >= 3"),
    "synth --sentences 0": (lambda d: ["data", "synth", d["out"], "--sentences", "0"], "--sentences must be >= 1"),
    "synth --heldout-sentences 0": (lambda d: ["data", "synth", d["out"], "--heldout-sentences", "0"],
                                    "--heldout-sentences must be >= 1"),
    "synth output under a file": (lambda d: ["data", "synth", f"{d['file']}/corpus"], "is a file, not a folder"),
    # engine
    "chat -o under a file": (lambda d: ["chat", "-i", d["wav"], "-o", f"{d['file']}/x.wav"], "is a file"),
    "chat -o an existing folder": (lambda d: ["chat", "-i", d["wav"], "-o", d["dir"]], "is an existing folder"),
    "chat --max-seconds 0": (lambda d: ["chat", "-i", d["wav"], "-o", d["out"] + ".wav", "--max-seconds", "0"],
                             "--max-seconds must be > 0"),
    "chat input missing": (lambda d: ["chat", "-i", d["dir"] + "/nope.wav", "-o", d["out"] + ".wav"],
                           "not found"),
    "asr -o under a file": (lambda d: ["asr", d["wav"], "-o", f"{d['file']}/words.txt"], "is a file"),
    "tts -o an existing folder": (lambda d: ["tts", "hello", "-o", d["dir"]], "is an existing folder"),
    "tts --max-padding -1": (lambda d: ["tts", "hello", "-o", d["out"] + ".wav", "--max-padding", "-1"],
                             "--max-padding must be >= 0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_mistake_is_one_line_exit_2_and_nothing_is_built(case, tmp_path, wav, a_file, tripwire, caplog):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "in.wav", "duration": 0.1}\n')
    d = {"wav": str(wav), "file": str(a_file), "dir": str(tmp_path), "out": str(tmp_path / "out"),
         "manifest": str(manifest)}
    make_args, *needles = CASES[case]
    assert cli.main(make_args(d)) == 2
    _one_error(caplog, *needles)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.npy").exists()


def test_loud_input_is_warned_about(tmp_path, caplog):
    from moshi_jax.audio import load_audio

    path = tmp_path / "loud.wav"
    sf.write(path, np.full(2400, 1e6, np.float32), 24000, subtype="FLOAT")
    with caplog.at_level(logging.WARNING):
        load_audio(path, 24000)
    assert any("peak amplitude 1e+06" in r.getMessage() and "mis-scaled" in r.getMessage() for r in caplog.records)


def test_encode_writes_exactly_the_logged_name(tmp_path, wav, caplog):
    out = tmp_path / "codes"  # no .npy suffix: np.save(path) would have written codes.npy
    with caplog.at_level(logging.INFO):
        assert cli.main(["codec", "encode", str(wav), "-o", str(out), "--preset", "tiny"]) == 0
    assert out.is_file() and not (tmp_path / "codes.npy").exists()
    assert np.load(out).ndim == 2
    assert any(r.getMessage() == f"wrote {out}" for r in caplog.records)


def test_real_process_prints_one_line_without_traceback_and_debug_shows_it(tmp_path, a_file):
    args = [sys.executable, "-m", "moshi_jax.cli", "codec", "encode", str(a_file), "-o", f"{a_file}/x.npy"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "ERROR" in lines[0] and "is a file, not a folder" in lines[0]
    debug = subprocess.run(args[:3] + ["--debug"] + args[3:], capture_output=True, text=True, timeout=300)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_unexpected_failure_is_one_line_exit_1_and_debug_raises(monkeypatch, caplog, tmp_path, wav):
    def broken(*a, **k):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(cli, "_load_codec", broken)
    args = ["codec", "encode", str(wav), "-o", str(tmp_path / "c.npy"), "--preset", "tiny"]
    assert cli.main(args) == 1
    _one_error(caplog, "RuntimeError: something inside broke", "--debug")
    with pytest.raises(RuntimeError):
        cli.main(["--debug", *args])


@pytest.mark.parametrize("error", ["diverged", "corrupt"])
def test_training_that_cannot_finish_is_one_line_exit_1(error, monkeypatch, caplog, tmp_path):
    import moshi_jax.training.train_lm as train_lm
    from moshi_jax.training.checkpointing import CheckpointCorruptError
    from moshi_jax.training.loop import TrainingDivergedError

    exc = {"diverged": TrainingDivergedError("step 3: non-finite gradient norm nan (loss 4.852e+33)"),
           "corrupt": CheckpointCorruptError("checkpoint runs/x/checkpoints/7 cannot be restored")}[error]

    def run(cfg):
        raise exc

    monkeypatch.setattr(train_lm, "run", run)
    assert cli.main(["train", "tiny", f"run_dir={tmp_path / 'run'}"]) == 1
    _one_error(caplog, str(exc))


def test_decoder_nan_is_caught_where_computed_before_anything_is_written(tmp_path):
    import jax

    from moshi_jax.mimi.config import MimiConfig
    from moshi_jax.mimi.model import MimiCodec

    codec = MimiCodec(MimiConfig.tiny())
    params = codec.init(jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x * np.nan, params)  # a broken model (loading would refuse such weights)
    codes = np.zeros((2, 5), np.int32)
    with pytest.raises(cli.JobError, match=r"decoder produced NaN/inf samples at 0.00-0.40 s"):
        cli._decode(codec, params, codes, chunk_frames=5)
