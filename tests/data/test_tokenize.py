"""The tokenize job: built-in dataset end to end, records round trip, bad data reported by file name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from moshi_jax.data import interleaver, tokenize
from moshi_jax.data.records import (
    INDEX_NAME,
    RecordError,
    ShardWriter,
    TokenizedDataset,
    decode_record,
    encode_record,
    write_index,
)
from moshi_jax.lm.tokenizer import TextTokenizer

SR = 24000


@pytest.fixture(scope="module")
def tiny_mimi():
    """One seeded random tiny Mimi for the whole module (its init compiles the codec once)."""
    return tokenize.load_mimi(None, "tiny", seed=0)


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> Path:
    from moshi_jax.data.speech_synth import SENTENCES

    return tokenize.train_sentencepiece(SENTENCES, tmp_path_factory.mktemp("spm") / "tok.model", 512)


# ----------------------------------------------------------------------------------------------- records


def test_records_round_trip_int16_and_int32_with_meta(tmp_path):
    small = np.array([[-1, 3, 0, 511], [2047, 0, -1, 5]], np.int32)
    codes, meta = decode_record(encode_record(small, {"path": "a.wav"}))
    np.testing.assert_array_equal(codes, small)
    assert codes.dtype == np.int32 and meta == {"path": "a.wav"}
    assert len(encode_record(small)) < len(encode_record(small.astype(np.int64) + 40000))  # int16 storage
    big = np.array([[40000, -1]], np.int32)  # a vocabulary above 32767 needs int32
    np.testing.assert_array_equal(decode_record(encode_record(big))[0], big)
    with pytest.raises(RecordError, match="magic"):
        decode_record(b"garbage-bytes")
    with pytest.raises(RecordError, match="corrupt"):
        decode_record(encode_record(small)[:-2])


def test_shards_and_index_round_trip_in_order(tmp_path):
    rng = np.random.default_rng(0)
    grids = [rng.integers(-1, 2048, (17, int(f))).astype(np.int32) for f in (5, 9, 1, 30, 12)]
    with ShardWriter(tmp_path, records_per_shard=2) as w:
        for i, g in enumerate(grids):
            assert w.write(g, {"i": i}) == i
    assert w.shards == ["shard-00000.array_record", "shard-00001.array_record", "shard-00002.array_record"]
    write_index(tmp_path, kind="audio", config={}, shards=w.shards,
                records=[{"num_frames": g.shape[1]} for g in grids], skipped=[])
    ds = TokenizedDataset.open(tmp_path)
    assert len(ds) == 5 and ds.index["counts"]["frames"] == 57
    for i, (codes, meta) in enumerate(ds):
        np.testing.assert_array_equal(codes, grids[i])
        assert meta == {"i": i}
    (tmp_path / "shard-00001.array_record").unlink()
    with pytest.raises(RecordError, match="missing"):
        TokenizedDataset.open(tmp_path)
    with pytest.raises(RecordError, match="no index.json"):
        TokenizedDataset.open(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------- built-in data


def test_builtin_dataset_end_to_end_codes_text_and_reuse(tmp_path, tiny_mimi):
    from moshi_jax.data import pipeline
    from moshi_jax.lm.config import LMConfig
    from moshi_jax.training.config import DataConfig, DataSource

    codec, params, _ = tiny_mimi
    kw = dict(num_dialogues=2, seconds=4.0, seed=1, mimi_preset="tiny", progress=False, mimi=tiny_mimi)
    path = tokenize.prepare_builtin_dataset(tmp_path, **kw)
    ds = TokenizedDataset.open(path)
    assert ds.kind == "audio" and len(ds) == 2 and not ds.index["skipped"]
    assert ds.index["config"]["mimi"]["random"] is True  # no weights offline: said so in the index too
    tok = TextTokenizer.load(tmp_path / "tokenizer.model")
    assert tok.vocab_size <= 512  # fits LMConfig.tiny's text_card
    raw = tmp_path / "raw"
    # a random codec's codebooks are fitted to the dataset first (else every frame gets the same code)
    assert ds.index["config"]["mimi"]["calibrated_codebooks"]["seconds"] > 0
    entries, _ = tokenize.read_manifest(raw / "manifest.jsonl")
    params = tokenize.calibrate_codebooks(codec, params, tokenize.calibration_audio(entries, SR, 60.0), seed=0)
    words = 0
    for (codes, meta), rec in zip(ds, ds.records, strict=True):
        assert codes.shape == (1 + 2 * 8, 50) and rec["channels"] == 2 and rec["has_text"]
        wav, rate = sf.read(raw / meta["path"], dtype="float32", always_2d=True)
        assert rate == SR
        # audio streams: exactly Mimi's codes of channel 0 (model) then channel 1 (user)
        want = np.asarray(codec.encode_stream(params, wav.T[:, None, :], 8))  # [2, 8, 50]
        np.testing.assert_array_equal(codes[1:], want.reshape(16, 50))
        # text stream: the Inner Monologue stream of the sibling alignments, tokenized with the trained model
        aligns = json.loads((raw / meta["path"]).with_suffix(".json").read_text())["alignments"]
        clean = interleaver.validate_alignments(aligns, wav.shape[0] / SR)
        np.testing.assert_array_equal(codes[0], interleaver.text_stream(clean, 50, tok.encode))
        words += int(np.sum((codes[0] != 3) & (codes[0] != 0)))
    assert words > 3  # real words in the text streams (a 4 s dialogue may give the model no turn, not both)
    all_codes = np.concatenate([c for c, _ in ds], axis=1)
    assert min(len(np.unique(row)) for row in all_codes[1:]) > 4  # every codebook carries information
    text = TokenizedDataset.open(tmp_path / "text")
    assert text.kind == "text" and len(text) > 10
    first, _ = text.read(0)
    assert first[0, 0] == tok.bos_id and first[0, -1] == tok.eos_id

    # idempotent: same settings -> nothing rebuilt
    stamp = (path / INDEX_NAME).stat().st_mtime_ns
    assert tokenize.prepare_builtin_dataset(tmp_path, **kw) == path
    assert (path / INDEX_NAME).stat().st_mtime_ns == stamp

    # and the training pipeline reads it for the tiny LM
    cfg = DataConfig(sources=(DataSource(str(path)), DataSource(str(tmp_path / "text"), 0.5)), seq_frames=32,
                     batch_size=4)
    batch = next(iter(pipeline.make_dataset(cfg, LMConfig.tiny(), train=True)))
    assert batch["codes"].shape == (4, 17, 32) and batch["codes"].max() < 2048


# ----------------------------------------------------------------------------------------------- bad data


def _stereo(seconds: float, rate: int = SR, channels: int = 2) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([0.1 * np.sin(2 * np.pi * (200 + 50 * c) * t) for c in range(channels)], axis=1)


def _write(root: Path, name: str, seconds: float = 1.0, *, rate: int = SR, channels: int = 2,
           words: list | None = None, duration: float | None = None) -> dict:
    sf.write(root / name, _stereo(seconds, rate, channels).astype(np.float32), rate, subtype="FLOAT")
    if words is not None:
        (root / name).with_suffix(".json").write_text(json.dumps({"alignments": words}))
    return {"path": name, "duration": seconds if duration is None else duration}


GOOD_WORDS = [["hello", [0.1, 0.4], "SPEAKER_MAIN"], ["how", [0.5, 0.7], "SPEAKER_MAIN"]]


def _bad_dataset(root: Path) -> tuple[Path, dict[str, str]]:
    """A manifest with two good files and one of every kind of bad data; returns it and {file: reason}."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [_write(root, "good.wav", words=GOOD_WORDS),
             _write(root, "no_alignment.wav")]  # kept: text stream of -1
    bad = {}
    lines.append({"path": "missing.wav", "duration": 1.0})
    bad["missing.wav"] = "not found"
    lines.append(_write(root, "truncated.wav", words=GOOD_WORDS))
    data = (root / "truncated.wav").read_bytes()
    (root / "truncated.wav").write_bytes(data[: len(data) // 2])
    bad["truncated.wav"] = "truncated"
    (root / "noise.wav").write_text("this is not audio")
    lines.append({"path": "noise.wav", "duration": 1.0})
    bad["noise.wav"] = "cannot read audio"
    lines.append(_write(root, "mono.wav", channels=1, words=GOOD_WORDS))
    bad["mono.wav"] = "mono audio where stereo is required"
    lines.append(_write(root, "three.wav", channels=3, words=GOOD_WORDS))
    bad["three.wav"] = "3 channels"
    lines.append(_write(root, "stale.wav", words=GOOD_WORDS, duration=3.0))
    bad["stale.wav"] = "manifest duration 3.000 s but the audio lasts 1.000 s"
    lines.append(_write(root, "late_word.wav", words=GOOD_WORDS + [["late", [0.9, 2.5], "SPEAKER_MAIN"]]))
    bad["late_word.wav"] = "outside the audio"
    lines.append(_write(root, "speaker.wav", words=GOOD_WORDS + [["who", [0.8, 0.9], "SPEAKER_X"]]))
    bad["speaker.wav"] = "unknown speaker label 'SPEAKER_X'"
    lines.append(_write(root, "badjson.wav"))
    (root / "badjson.json").write_text("{not json")
    bad["badjson.wav"] = "not readable JSON"
    lines.append(_write(root, "badentry.wav", words=[["x", [0.1], "SPEAKER_MAIN"]]))
    bad["badentry.wav"] = "is not [word, [start, end], speaker]"
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot a json line\n")
    bad["manifest.jsonl:13"] = "not JSON"
    return manifest, bad


def test_bad_files_are_reported_by_name_and_skipped(tmp_path, tiny_mimi, spm):
    manifest, bad = _bad_dataset(tmp_path / "raw")
    index = tokenize.tokenize_dataset(manifest, tmp_path / "tok", tokenizer=spm, mimi=tiny_mimi,
                                      options=tokenize.TokenizeOptions(calibrate_random=False, progress=False))
    ds = TokenizedDataset.open(index.parent)
    assert sorted(r["path"] for r in ds.records) == ["good.wav", "no_alignment.wav"]
    skipped = {Path(s["path"]).name: s["reason"] for s in ds.index["skipped"]}
    assert set(skipped) == set(bad)
    for name, reason in bad.items():
        assert reason in skipped[name], (name, skipped[name])
    assert ds.index["counts"]["manifest_entries"] == 13 and ds.index["counts"]["skipped"] == 11
    by_path = {r["path"]: (ds.read(i)[0], r) for i, r in enumerate(ds.records)}
    no_text, rec = by_path["no_alignment.wav"]
    assert np.all(no_text[0] == -1) and not rec["has_alignment"]  # as the reference: no transcript -> -1
    assert np.all(no_text[1:] >= 0) and no_text.shape == (17, 13)
    good, rec = by_path["good.wav"]
    assert rec["has_text"] and set(np.unique(good[0])) - {0, 3}  # words, PAD and EPAD


def test_on_error_fail_stops_at_the_first_bad_file_with_its_name_and_writes_no_index(tmp_path, tiny_mimi, spm):
    manifest, _ = _bad_dataset(tmp_path / "raw")
    opts = tokenize.TokenizeOptions(on_error="fail", calibrate_random=False, progress=False)
    with pytest.raises(tokenize.TokenizeError, match=r"manifest.jsonl:13|missing\.wav"):
        tokenize.tokenize_dataset(manifest, tmp_path / "tok", tokenizer=spm, mimi=tiny_mimi, options=opts)
    # without the bad manifest line, the first bad file is named
    lines = manifest.read_text().splitlines()[:-1]
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(tokenize.TokenizeError, match=r"missing\.wav: audio file not found"):
        tokenize.tokenize_dataset(manifest, tmp_path / "tok", tokenizer=spm, mimi=tiny_mimi, options=opts)
    assert not (tmp_path / "tok" / INDEX_NAME).exists()


def test_sample_rate_is_resampled_or_rejected_and_mono_is_allowed_on_request(tmp_path, tiny_mimi, spm):
    root = tmp_path / "raw"
    root.mkdir()
    lines = [_write(root, "rate16k.wav", rate=16000, words=GOOD_WORDS),
             _write(root, "mono.wav", channels=1, words=GOOD_WORDS)]
    manifest = root / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    opts = tokenize.TokenizeOptions(calibrate_random=False, progress=False, resample=False, allow_mono=True)
    ds = TokenizedDataset.open(tokenize.tokenize_dataset(manifest, tmp_path / "a", tokenizer=spm, mimi=tiny_mimi,
                                                         options=opts).parent)
    assert [r["path"] for r in ds.records] == ["mono.wav"]
    assert "sample rate 16000 Hz, expected 24000 Hz (resampling disabled)" in ds.index["skipped"][0]["reason"]
    mono, _ = ds.read(0)
    assert mono.shape == (1 + 8, 13) and ds.records[0]["channels"] == 1  # the model's streams only
    opts = tokenize.TokenizeOptions(calibrate_random=False, progress=False)  # defaults: resample, stereo required
    ds = TokenizedDataset.open(tokenize.tokenize_dataset(manifest, tmp_path / "b", tokenizer=spm, mimi=tiny_mimi,
                                                         options=opts).parent)
    assert [r["path"] for r in ds.records] == ["rate16k.wav"]
    assert ds.read(0)[0].shape == (17, 13)


def test_text_only_source_from_documents(tmp_path, spm):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "Hello, how are you today?"}) + "\n\n" + json.dumps({"text": "Fine."}) + "\n")
    ds = TokenizedDataset.open(tokenize.tokenize_text([docs], tmp_path / "t", spm).parent)
    tok = TextTokenizer.load(spm)
    assert ds.kind == "text" and len(ds) == 2
    codes, meta = ds.read(0)
    np.testing.assert_array_equal(codes[0], [tok.bos_id, *tok.encode("Hello, how are you today?"), tok.eos_id])
    assert meta["path"].endswith("docs.jsonl:1")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(tokenize.TokenizeError, match=r"bad.jsonl:1"):
        tokenize.tokenize_text([bad], tmp_path / "u", spm)


def test_cli_data_tokenize_writes_the_dataset_and_reports_bad_data(tmp_path, tiny_mimi, spm, monkeypatch, capsys):
    from moshi_jax.cli import main

    monkeypatch.setattr(tokenize, "load_mimi", lambda *a, **k: tiny_mimi)  # reuse the compiled codec
    root = tmp_path / "raw"
    root.mkdir()
    lines = [_write(root, "good.wav", words=GOOD_WORDS), _write(root, "mono.wav", channels=1)]
    manifest = root / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "tok"
    assert main(["data", "tokenize", str(manifest), "-o", str(out), "--tokenizer", str(spm), "--no-progress"]) == 0
    assert [r["path"] for r in TokenizedDataset.open(out).records] == ["good.wav"]
    assert main(["data", "inspect", str(out)]) == 0
    assert "mono audio where stereo is required" in capsys.readouterr().out
    assert main(["data", "tokenize", str(manifest), "-o", str(tmp_path / "x"), "--on-error", "fail",
                 "--no-progress"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["data", "tokenize", "--help"])
    assert e.value.code == 0


def test_cli_data_tokenize_epad_every_word_writes_the_tts_text_layout_and_records_it(tmp_path, tiny_mimi, spm,
                                                                                     monkeypatch):
    from moshi_jax.cli import main

    monkeypatch.setattr(tokenize, "load_mimi", lambda *a, **k: tiny_mimi)
    root = tmp_path / "raw"
    root.mkdir()
    # back-to-back words: the default stream cuts "wonderful" short and gives "morning" no EPAD
    words = [["wonderful", [0.0, 0.08], "SPEAKER_MAIN"], ["morning", [0.08, 0.3], "SPEAKER_MAIN"],
             ["friends", [0.6, 0.8], "SPEAKER_MAIN"]]
    (root / "m.jsonl").write_text(json.dumps(_write(root, "a.wav", 1.5, words=words)) + "\n")
    tok = TextTokenizer.load(spm)
    clean = interleaver.validate_alignments(words, 1.5)
    for flag, tts in (([], False), (["--epad-every-word"], True)):
        out = tmp_path / f"tok_{tts}"
        assert main(["data", "tokenize", str(root / "m.jsonl"), "-o", str(out), "--tokenizer", str(spm),
                     "--no-progress", *flag]) == 0
        ds = TokenizedDataset.open(out)
        assert ds.index["config"]["text"]["epad_every_word"] is tts
        text = ds.read(0)[0][0]
        np.testing.assert_array_equal(text, interleaver.text_stream(clean, text.shape[0], tok.encode,
                                                                   epad_every_word=tts))
        assert (int(np.sum(text == 0)) == 3) is tts  # one EPAD per word only in the TTS layout
