"""The Grain pipeline: crops, padding, determinism, resumption, mixtures, text-only sources, ASR/TTS shift."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from moshi_jax.data import pipeline
from moshi_jax.data.records import ShardWriter, write_index
from moshi_jax.lm.config import LMConfig
from moshi_jax.training.config import DataConfig, DataSource

LM = LMConfig.tiny()  # 1 text + 8 Moshi + 8 user streams, text_card 512, card 2048
K = 8


def text_row(r: int, F: int) -> np.ndarray:
    """Frame t of record r holds 4 + t (unique per frame: the crop offset can be read back), < text_card."""
    assert F < LM.text_card - 4
    return 4 + np.arange(F)


def audio_value(r: int, c: int, k: int, t: np.ndarray) -> np.ndarray:
    return (t + 7 * k + 100 * c + 3 * r) % LM.card


def record_codes(r: int, F: int, channels: int) -> np.ndarray:
    t = np.arange(F)
    rows = [text_row(r, F)] + [audio_value(r, c, k, t) for c in range(channels) for k in range(K)]
    return np.stack(rows).astype(np.int32)


def write_source(root, lengths, channels=2, kind="audio", vocab=500, num_codebooks=K, records_per_shard=3):
    """A tokenized dataset directory with known contents (what `moshi-jax data tokenize` writes)."""
    records = []
    with ShardWriter(root, records_per_shard) as w:
        for r, F in enumerate(lengths):
            ch = channels[r] if isinstance(channels, list | tuple) else channels
            codes = record_codes(r, F, ch) if kind == "audio" else text_row(r, F)[None]
            w.write(codes, {"path": f"rec{r}.wav"})
            records.append({"path": f"rec{r}.wav", "num_frames": F, "channels": ch if kind == "audio" else 0})
        shards = w.shards
    config = {"text": {"vocab_size": vocab, "pad_id": 3, "epad_id": 0}}
    if kind == "audio":
        config["mimi"] = {"codebook_size": 2048, "num_codebooks": num_codebooks}
    write_index(root, kind=kind, config=config, shards=shards, records=records, skipped=[])
    return str(root)


def stored_grid(r: int, F: int, channels: int, delay: int = 0, kind: str = "audio") -> np.ndarray:
    layout = pipeline._Layout(2, K, delay)
    codes = record_codes(r, F, channels) if kind == "audio" else text_row(r, F)[None]
    return pipeline.to_model_grid(codes, kind, channels, layout)


def data_cfg(sources, **kw) -> DataConfig:
    kw.setdefault("seq_frames", 16)
    kw.setdefault("batch_size", 4)
    return DataConfig(sources=tuple(DataSource(p, w) for p, w in sources), **kw)


def batches(ds, n):
    return [next_batch for next_batch in itertools.islice(iter(ds), n)]


def find_record_and_offset(row_text: np.ndarray, lengths) -> tuple[int, int]:
    """Text frame t of every test record is 4 + t: read the crop offset from the first real text frame."""
    real = np.nonzero(row_text >= 0)[0]
    return int(row_text[real[0]] - 4 - real[0]), int(real[0])


@pytest.fixture
def two_sources(tmp_path):
    a = write_source(tmp_path / "a", [40, 23, 9, 61, 30])
    b = write_source(tmp_path / "b", [50, 17, 33])
    return a, b


def test_each_row_is_one_crop_of_a_record_with_the_same_offset_for_every_stream(tmp_path):
    lengths = [40, 23, 61, 30]
    src = write_source(tmp_path / "a", lengths)
    T = 16
    for batch in batches(pipeline.make_dataset(data_cfg([(src, 1.0)], seq_frames=T), LM, train=True), 6):
        codes = batch["codes"]
        assert codes.dtype == np.int32 and codes.shape == (4, 1 + LM.n_q, T)
        for row in codes:
            offset, _ = find_record_and_offset(row[0], lengths)
            # which record? the audio of record r at frame t is (t + 7k + 100c + 3r) % card
            r = int(((row[1, 0] - offset) % LM.card) // 3)
            grid = stored_grid(r, lengths[r], 2)
            assert 0 <= offset <= lengths[r] - T
            np.testing.assert_array_equal(row, grid[:, offset:offset + T])


def test_records_shorter_than_the_window_are_padded_with_minus_one(tmp_path):
    src = write_source(tmp_path / "a", [5, 9])
    T = 12
    for batch in batches(pipeline.make_dataset(data_cfg([(src, 1.0)], seq_frames=T, batch_size=2), LM, True), 3):
        for row in batch["codes"]:
            F = int(np.sum(row[0] >= 0))
            assert F in (5, 9)
            r = {5: 0, 9: 1}[F]
            np.testing.assert_array_equal(row[:, :F], stored_grid(r, F, 2))
            assert np.all(row[:, F:] == -1)  # every stream padded from the same frame on


def test_same_seed_gives_the_same_batches_and_another_seed_other_batches(two_sources):
    a, b = two_sources
    cfg = data_cfg([(a, 1.0), (b, 1.0)], seed=3)
    first = batches(pipeline.make_dataset(cfg, LM, True), 5)
    again = batches(pipeline.make_dataset(cfg, LM, True), 5)
    other = batches(pipeline.make_dataset(dataclasses.replace(cfg, seed=4), LM, True), 5)
    for x, y in zip(first, again, strict=True):
        np.testing.assert_array_equal(x["codes"], y["codes"])
    assert any(not np.array_equal(x["codes"], y["codes"]) for x, y in zip(first, other, strict=True))


def test_restored_iterator_state_continues_with_exactly_the_same_batches(two_sources):
    a, b = two_sources
    cfg = data_cfg([(a, 2.0), (b, 1.0)])
    it = iter(pipeline.make_dataset(cfg, LM, True))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["codes"] for _ in range(4)]
    fresh = iter(pipeline.make_dataset(cfg, LM, True))
    fresh.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["codes"], want)


def test_training_checkpointer_saves_and_restores_the_data_position(two_sources, tmp_path):
    import jax.numpy as jnp

    from moshi_jax.training.checkpointing import Checkpointer

    a, _ = two_sources
    cfg = data_cfg([(a, 1.0)])
    it = iter(pipeline.make_dataset(cfg, LM, True))
    for _ in range(2):
        next(it)
    state = {"w": jnp.zeros((2,), jnp.float32)}
    with Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
        ckpt.save(2, state, it, force=True)
    expected = [next(it)["codes"] for _ in range(3)]
    fresh = iter(pipeline.make_dataset(cfg, LM, True))
    with Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
        ckpt.restore(2, state, fresh)
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["codes"], want)


def test_mixture_draws_sources_in_proportion_to_their_weights(two_sources):
    a, b = two_sources
    cfg = data_cfg([(a, 3.0), (b, 1.0)], batch_size=8)
    src = np.concatenate([x["source"] for x in batches(pipeline.make_dataset(cfg, LM, True), 25)])
    frac_a = float(np.mean(src == 0))
    assert abs(frac_a - 0.75) < 0.05, frac_a
    assert set(np.unique(src)) == {0, 1}


def test_every_window_of_a_source_is_drawn_once_per_epoch_then_reshuffled(tmp_path):
    lengths = [32, 16, 48]  # 2 + 1 + 3 windows of 16 frames
    src = write_source(tmp_path / "a", lengths)
    ds = pipeline.make_dataset(data_cfg([(src, 1.0)], seq_frames=16, batch_size=6), LM, True)
    it = iter(ds)
    epochs = []
    for _ in range(3):
        rows = next(it)["codes"]
        # record id from the audio of stream 1 at the crop offset
        ids = []
        for row in rows:
            off, _ = find_record_and_offset(row[0], lengths)
            ids.append(int(((row[1, 0] - off) % LM.card) // 3))
        epochs.append(ids)
    for ids in epochs:
        assert sorted(ids) == [0, 0, 1, 2, 2, 2]  # records weighted by their number of windows
    assert len({tuple(e) for e in epochs}) > 1  # a new order each epoch


def test_text_only_source_gives_text_windows_with_every_audio_stream_minus_one(tmp_path):
    src = write_source(tmp_path / "t", [100, 40], kind="text")
    for batch in batches(pipeline.make_dataset(data_cfg([(src, 1.0)], seq_frames=32), LM, True), 3):
        codes = batch["codes"]
        assert np.all(codes[:, 1:] == -1)
        assert np.all(codes[:, 0] >= 4)  # dense text, no padding (both records are longer than T)
        assert np.all(np.diff(codes[:, 0], axis=-1) == 1)  # consecutive tokens of one document


def test_text_and_audio_sources_mix_in_one_batch_shape(tmp_path):
    a = write_source(tmp_path / "a", [40, 30])
    t = write_source(tmp_path / "t", [100], kind="text")
    batch = next(iter(pipeline.make_dataset(data_cfg([(a, 1.0), (t, 1.0)], batch_size=8), LM, True)))
    assert batch["codes"].shape == (8, 17, 16)
    text_rows = batch["codes"][batch["source"] == 1]
    audio_rows = batch["codes"][batch["source"] == 0]
    assert len(text_rows) and len(audio_rows)
    assert np.all(text_rows[:, 1:] == -1) and np.all(audio_rows[:, 1:] >= 0)


@pytest.mark.parametrize("delay", [3, -3])
def test_text_delay_shifts_text_after_audio_for_asr_and_before_for_tts(tmp_path, delay):
    F = 20
    src = write_source(tmp_path / "a", [F])
    cfg = data_cfg([(src, 1.0)], seq_frames=32, batch_size=1, text_delay_frames=delay, eval_sources=())
    cfg = dataclasses.replace(cfg, eval_sources=cfg.sources)
    row = next(iter(pipeline.make_dataset(cfg, LM, train=False)))["codes"][0]  # eval: offset 0, no crop
    text, audio = row[0], row[1]
    text_frames, audio_frames = np.nonzero(text >= 0)[0], np.nonzero(audio >= 0)[0]
    assert len(text_frames) == len(audio_frames) == F  # nothing cut off, the record grew by |delay|
    # text frame t describes audio frame t (both from frame index 4 + t / t); the shift moves one against the other
    assert text_frames[0] - audio_frames[0] == delay
    np.testing.assert_array_equal(text[text_frames], text_row(0, F))
    np.testing.assert_array_equal(audio[audio_frames], audio_value(0, 0, 0, np.arange(F)))
    assert np.all(row[:, F + abs(delay):] == -1)


def test_mono_records_leave_the_user_streams_at_minus_one(tmp_path):
    src = write_source(tmp_path / "m", [30, 30], channels=[1, 2])
    cfg = data_cfg([(src, 1.0)], batch_size=2, seq_frames=30)
    cfg = dataclasses.replace(cfg, eval_sources=cfg.sources)
    rows = next(iter(pipeline.make_dataset(cfg, LM, train=False)))["codes"]
    mono, stereo = rows[0], rows[1]
    assert np.all(mono[9:] == -1) and np.all(mono[:9] >= 0)
    np.testing.assert_array_equal(mono[1:9], record_codes(0, 30, 1)[1:9])
    np.testing.assert_array_equal(stereo, record_codes(1, 30, 2))


def test_eval_is_one_ordered_pass_over_consecutive_windows_with_a_padded_last_batch(tmp_path):
    lengths = [20, 7]  # windows of 8: record 0 -> 3, record 1 -> 1
    src = write_source(tmp_path / "a", lengths)
    cfg = data_cfg([], seq_frames=8, batch_size=3)
    cfg = dataclasses.replace(cfg, eval_sources=(DataSource(src),))
    out = list(pipeline.make_dataset(cfg, LM, train=False))
    assert len(out) == 2
    rows = np.concatenate([b["codes"] for b in out])
    g0, g1 = stored_grid(0, 20, 2), stored_grid(1, 7, 2)
    np.testing.assert_array_equal(rows[0], g0[:, 0:8])
    np.testing.assert_array_equal(rows[1], g0[:, 8:16])
    np.testing.assert_array_equal(rows[2, :, :4], g0[:, 16:20])
    assert np.all(rows[2, :, 4:] == -1)
    np.testing.assert_array_equal(rows[3, :, :7], g1)
    assert np.all(rows[4:] == -1) and list(out[1]["source"]) == [0, -1, -1]


def test_hosts_get_disjoint_shards_that_cover_the_data(tmp_path):
    lengths = [8] * 10
    src = write_source(tmp_path / "a", lengths)
    cfg = data_cfg([], seq_frames=8, batch_size=2)
    cfg = dataclasses.replace(cfg, eval_sources=(DataSource(src),))
    seen = []
    for pi in range(2):
        ds = pipeline.make_dataset(cfg, LM, train=False, process_index=pi, process_count=2)
        rows = np.concatenate([b["codes"] for b in ds])
        assert rows.shape[1:] == (17, 8)  # per-host batch = 2 / 2 processes = 1 row
        seen.append({int(((r[1, 0]) % LM.card) // 3) for r in rows})
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(10))


def test_training_hosts_draw_from_disjoint_shards(tmp_path):
    src = write_source(tmp_path / "a", [8] * 10)
    cfg = data_cfg([(src, 1.0)], seq_frames=8, batch_size=2)
    seen = []
    for pi in range(2):
        it = iter(pipeline.make_dataset(cfg, LM, train=True, process_index=pi, process_count=2))
        rows = np.concatenate([next(it)["codes"] for _ in range(5)])  # one epoch of this host's 5 windows
        seen.append({int(r[1, 0] % LM.card) // 3 for r in rows})
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(10))


def test_worker_processes_yield_the_same_batches_as_in_process_loading_and_resume(two_sources):
    a, b = two_sources
    cfg = data_cfg([(a, 1.0), (b, 1.0)])
    want = batches(pipeline.make_dataset(cfg, LM, True), 4)
    workers = dataclasses.replace(cfg, num_workers=1)
    it = iter(pipeline.make_dataset(workers, LM, True))
    got = [next(it) for _ in range(2)]
    state = it.get_state()
    resumed = iter(pipeline.make_dataset(workers, LM, True))
    resumed.set_state(state)
    got += [next(resumed) for _ in range(2)]
    for x, y in zip(want, got, strict=True):
        np.testing.assert_array_equal(x["codes"], y["codes"])


def test_sources_that_do_not_fit_the_lm_are_rejected_with_the_reason(tmp_path):
    big_vocab = write_source(tmp_path / "v", [10], vocab=32000)
    with pytest.raises(pipeline.DataConfigError, match="text_card"):
        pipeline.make_dataset(data_cfg([(big_vocab, 1.0)]), LM, True)
    few = write_source(tmp_path / "k", [10], num_codebooks=4)
    with pytest.raises(pipeline.DataConfigError, match="needs 8"):
        pipeline.make_dataset(data_cfg([(few, 1.0)]), LM, True)
    manifest = tmp_path / "train.jsonl"
    manifest.write_text('{"path": "a.wav", "duration": 1.0}\n')
    with pytest.raises(pipeline.DataConfigError, match="data tokenize"):
        pipeline.make_dataset(data_cfg([(str(manifest), 1.0)]), LM, True)
    with pytest.raises(pipeline.DataConfigError, match="no such"):
        pipeline.make_dataset(data_cfg([(str(tmp_path / "nope"), 1.0)]), LM, True)
    with pytest.raises(pipeline.DataConfigError, match="eval_sources is empty"):
        pipeline.make_dataset(data_cfg([(few, 1.0)]), LM, False)


def test_describe_counts_records_frames_and_windows_per_source(two_sources):
    a, b = two_sources
    info = pipeline.describe(data_cfg([(a, 2.0), (b, 1.0)], seq_frames=16), LM)
    assert info[a]["records"] == 5 and info[a]["frames"] == 40 + 23 + 9 + 61 + 30
    assert info[a]["windows"] == 3 + 2 + 1 + 4 + 2 and info[a]["weight"] == 2.0
    assert info[b]["kind"] == "audio" and info[b]["windows"] == 4 + 2 + 3


# ------------------------------------------------------------------ input augmentation (train only)
def _augmented_batches(src, lengths, n, **kw):
    cfg = data_cfg([(src, 1.0)], seq_frames=16, batch_size=4, **kw)
    cfg = dataclasses.replace(cfg, eval_sources=cfg.sources)
    rows = []
    for batch in batches(pipeline.make_dataset(cfg, LM, train=True), n):
        for row in batch["codes"]:
            offset, _ = find_record_and_offset(row[0], lengths)
            r = int(((row[1, 0] - offset) % LM.card) // 3)
            rows.append((row, stored_grid(r, lengths[r], 2)[:, offset:offset + 16]))
    return cfg, rows


def test_time_masks_blank_spans_of_the_input_only_streams_and_never_a_loss_target(tmp_path):
    lengths = [40, 61, 30]
    src = write_source(tmp_path / "a", lengths)
    first_input = 1 + LM.dep_q  # text + Moshi's 8 predicted streams are targets; the user's 8 are inputs only
    cfg, rows = _augmented_batches(src, lengths, 6, input_time_masks=2, input_time_mask_frames=4)
    blanked = 0
    for row, clean in rows:
        np.testing.assert_array_equal(row[:first_input], clean[:first_input])  # targets exactly as stored
        changed = np.nonzero(np.any(row[first_input:] != clean[first_input:], axis=0))[0]
        # the same frames of every input stream, all -1, at most two spans of at most 4 frames
        assert np.all(row[first_input:, changed] == -1)
        np.testing.assert_array_equal(row[first_input:, np.setdiff1d(np.arange(16), changed)],
                                      clean[first_input:, np.setdiff1d(np.arange(16), changed)])
        spans = np.split(changed, np.nonzero(np.diff(changed) > 1)[0] + 1) if len(changed) else []
        assert len(changed) <= 8 and len(spans) <= 2
        blanked += len(changed)
    assert blanked > 0
    # eval windows of the same config are the stored grids, untouched
    for batch in batches(pipeline.make_dataset(cfg, LM, train=False), 2):
        for row in batch["codes"]:
            if row[0, 0] >= 0:
                offset, _ = find_record_and_offset(row[0], lengths)
                r = int(((row[1, 0] - offset) % LM.card) // 3)
                stored = stored_grid(r, lengths[r], 2)[:, offset:offset + 16]
                np.testing.assert_array_equal(row[:, :stored.shape[1]], stored)
                assert np.all(row[:, stored.shape[1]:] == -1)  # a record's last window, padded


def test_token_noise_redraws_about_that_share_of_input_tokens_within_the_codebook(tmp_path):
    lengths = [40, 61, 30, 52]
    src = write_source(tmp_path / "a", lengths)
    first_input = 1 + LM.dep_q
    _, rows = _augmented_batches(src, lengths, 8, input_token_noise=0.25)
    changed = total = 0
    for row, clean in rows:
        np.testing.assert_array_equal(row[:first_input], clean[:first_input])
        inputs = row[first_input:]
        assert np.all((inputs >= 0) & (inputs < LM.card))  # no padding was in these windows; none is made
        changed += int(np.sum(inputs != clean[first_input:]))
        total += inputs.size
    # 4096 input tokens, p = 0.25 (a redraw equal to the original by chance is 1 / 2048): 4 sigma is +-0.027
    assert 0.21 < changed / total < 0.29


def test_augmented_batches_are_reproducible_from_the_seed(tmp_path):
    src = write_source(tmp_path / "a", [40, 61, 30])
    cfg = data_cfg([(src, 1.0)], input_time_masks=1, input_time_mask_frames=3, input_token_noise=0.1)
    a, b = (batches(pipeline.make_dataset(cfg, LM, train=True), 3) for _ in range(2))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["codes"], y["codes"])


def test_input_augmentation_is_refused_for_an_lm_that_predicts_every_stream_and_bad_values_are_rejected(tmp_path):
    from moshi_jax.training.config import ConfigError

    src = write_source(tmp_path / "a", [40])
    tts_like = dataclasses.replace(LM, n_q=K, dep_q=K, delays=LM.delays[:1 + K])  # every audio stream predicted
    with pytest.raises(pipeline.DataConfigError, match="predicts all of its 8 audio streams"):
        pipeline.make_dataset(data_cfg([(src, 1.0)], input_token_noise=0.1), tts_like, train=True)
    with pytest.raises(ConfigError, match="input_time_mask_frames must be > 0"):
        data_cfg([(src, 1.0)], input_time_masks=2, input_time_mask_frames=0)
    with pytest.raises(ConfigError, match="input_token_noise"):
        data_cfg([(src, 1.0)], input_token_noise=1.0)
    with pytest.raises(ConfigError, match="input_time_masks must be >= 0"):
        data_cfg([(src, 1.0)], input_time_masks=-1)
