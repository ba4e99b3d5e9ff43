"""The tokenize jobs never lose earlier output: a failed run leaves the previous dataset byte for byte, a run
that would produce nothing exits non-zero without writing, and malformed manifest lines reach the console."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from moshi_jax.cli import main
from moshi_jax.data import tokenize
from moshi_jax.data.records import TokenizedDataset

SR = 24000


@pytest.fixture(scope="module")
def tiny_mimi():
    return tokenize.load_mimi(None, "tiny", seed=0)


def _wav(root: Path, name: str, seconds: float = 1.0) -> dict:
    t = np.arange(int(SR * seconds)) / SR
    wav = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)], axis=1)
    sf.write(root / name, wav.astype(np.float32), SR, subtype="FLOAT")
    return {"path": name, "duration": seconds}


def _manifest(root: Path, lines: list, name: str = "m.jsonl") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def good_dataset(tmp_path, tiny_mimi):
    root = tmp_path / "raw"
    root.mkdir()
    manifest = _manifest(root, [_wav(root, "a.wav"), _wav(root, "b.wav")])
    out = tmp_path / "tok"
    tokenize.tokenize_dataset(manifest, out, mimi=tiny_mimi, options=tokenize.TokenizeOptions(progress=False))
    assert len(TokenizedDataset.open(out)) == 2
    return root, out


def _no_codec(monkeypatch):
    """Tripwire: building the codec fails the test (checks must come first)."""
    def boom(*a, **k):
        raise AssertionError("the codec was built")

    monkeypatch.setattr(tokenize, "load_mimi", boom)


def test_failed_tokenize_keeps_the_previous_dataset_byte_for_byte(good_dataset, tiny_mimi, monkeypatch, caplog):
    root, out = good_dataset
    before = _snapshot(out)
    bad = _manifest(root, [_wav(root, "c.wav"), {"path": "missing.wav", "duration": 1.0}], "bad.jsonl")
    monkeypatch.setattr(tokenize, "load_mimi", lambda *a, **k: tiny_mimi)
    assert main(["data", "tokenize", str(bad), "-o", str(out), "--on-error", "fail", "--no-progress",
                 "--mimi-preset", "tiny"]) == 2
    assert _snapshot(out) == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
    assert any("missing.wav" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


def test_successful_tokenize_replaces_the_previous_dataset(good_dataset, tiny_mimi):
    root, out = good_dataset
    manifest = _manifest(root, [_wav(root, "c.wav")], "one.jsonl")
    tokenize.tokenize_dataset(manifest, out, mimi=tiny_mimi, options=tokenize.TokenizeOptions(progress=False))
    assert [r["path"] for r in TokenizedDataset.open(out).records] == ["c.wav"]


@pytest.mark.parametrize("lines, message", [
    ([], "the manifest is empty"),
    (["not json", '{"duration": 1}', '{"path": "x.wav", "duration": -1}'], "all 3 lines are malformed"),
])
def test_empty_or_all_malformed_manifest_exits_nonzero_before_the_codec(tmp_path, monkeypatch, caplog, lines,
                                                                        message):
    _no_codec(monkeypatch)
    manifest = _manifest(tmp_path / "raw", lines)
    out = tmp_path / "tok"
    assert main(["data", "tokenize", str(manifest), "-o", str(out), "--no-progress"]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and message in errors[0] and "nothing written" in errors[0]
    assert not out.exists()


def test_all_bad_files_exit_nonzero_and_keep_the_old_dataset(good_dataset, tiny_mimi, monkeypatch, caplog):
    root, out = good_dataset
    before = _snapshot(out)
    (root / "noise.wav").write_text("not audio")
    manifest = _manifest(root, [{"path": "missing.wav", "duration": 1.0}, {"path": "noise.wav", "duration": 1.0}],
                         "allbad.jsonl")
    monkeypatch.setattr(tokenize, "load_mimi", lambda *a, **k: tiny_mimi)
    assert main(["data", "tokenize", str(manifest), "-o", str(out), "--no-progress"]) == 1
    assert _snapshot(out) == before
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "no file could be tokenized: all 2 manifest entries are bad" in errors[0]


def test_malformed_manifest_lines_are_reported_on_the_console(tmp_path, tiny_mimi, caplog):
    root = tmp_path / "raw"
    root.mkdir()
    manifest = _manifest(root, [_wav(root, "a.wav"), "{broken", {"path": "b.wav", "duration": "long"}])
    with caplog.at_level(logging.WARNING):
        tokenize.tokenize_dataset(manifest, tmp_path / "tok", mimi=tiny_mimi,
                                  options=tokenize.TokenizeOptions(progress=False))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{manifest}:2: manifest line is not JSON" in w for w in warnings)
    assert any(f"{manifest}:3: manifest \"duration\"" in w for w in warnings)


def test_output_folder_that_is_not_a_dataset_is_refused_not_deleted(tmp_path, monkeypatch, caplog):
    _no_codec(monkeypatch)
    root = tmp_path / "raw"
    root.mkdir()
    manifest = _manifest(root, [_wav(root, "a.wav")])
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert main(["data", "tokenize", str(manifest), "-o", str(precious), "--no-progress"]) == 2
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert "is not a tokenized dataset" in caplog.records[-1].getMessage()


def test_failed_tokenize_text_keeps_the_previous_text_dataset(tmp_path):
    from moshi_jax.data.speech_synth import SENTENCES

    spm = tokenize.train_sentencepiece(SENTENCES, tmp_path / "tok.model", 512)
    docs = tmp_path / "docs.txt"
    docs.write_text("hello there\nhow are you\n")
    out = tmp_path / "text"
    tokenize.tokenize_text([docs], out, spm)
    before = _snapshot(out)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(tokenize.NothingProducedError, match="no text documents"):
        tokenize.tokenize_text([empty], out, spm)
    assert _snapshot(out) == before
