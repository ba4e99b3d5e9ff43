"""Codec training audio (moshi_jax.data.codec_audio): frame pooling, the teachers, the Grain pipeline."""

import dataclasses

import numpy as np
import pytest

from moshi_jax.data import codec_audio
from moshi_jax.mimi.config import MimiConfig
from moshi_jax.training.config import CodecConfig, DataConfig, DataSource


def test_pool_to_frames_averages_the_rows_inside_each_code_frame():
    feats = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)  # 10 rows over 0.4 s
    out = codec_audio.pool_to_frames(feats, 0.4, 6, 12.5)  # 80 ms frames: 2 rows each, then zero frames
    np.testing.assert_allclose(out[:5, 0], [0.5, 2.5, 4.5, 6.5, 8.5])
    np.testing.assert_array_equal(out[5], [0, 0])


def test_logmel_teacher_is_deterministic_normalised_and_frame_aligned():
    rng = np.random.default_rng(0)
    wav = rng.standard_normal(24000).astype(np.float32)
    a = codec_audio.logmel_teacher(wav, 24000, 13, 12.5, 16)
    b = codec_audio.logmel_teacher(wav.copy(), 24000, 13, 12.5, 16)
    assert a.shape == (13, 16) and np.array_equal(a, b)
    assert abs(float(a[:12].mean())) < 0.3  # per-utterance normalised


@pytest.fixture()
def folder(tmp_path):
    from moshi_jax.audio import save_audio

    rng = np.random.default_rng(1)
    for i, seconds in enumerate((1.0, 0.3)):
        save_audio(tmp_path / f"u{i}.wav", 0.1 * rng.standard_normal(int(seconds * 24000)).astype(np.float32), 24000)
    return tmp_path


def _cfgs(folder, teacher="logmel", dim=8):
    data = DataConfig(sources=(DataSource(str(folder)),), eval_sources=(DataSource(str(folder)),), seq_frames=5,
                      batch_size=2)
    return data, MimiConfig.tiny(), dataclasses.replace(CodecConfig(), teacher=teacher, teacher_dim=dim)


def test_pipeline_yields_frame_aligned_crops_padded_with_zeros(folder):
    data, mcfg, ccfg = _cfgs(folder)
    batch = next(iter(codec_audio.make_codec_dataset(data, mcfg, ccfg, train=False)))
    assert batch["wav"].shape == (2, 1, 5 * 1920) and batch["teacher"].shape == (2, 5, 8)
    # u1 (0.3 s = 7200 samples = 4 frames) is zero-padded past its end, audio and teacher alike.
    assert not batch["wav"][1, 0, 7200:].any() and not batch["teacher"][1, 4:].any()
    train = iter(codec_audio.make_codec_dataset(data, mcfg, ccfg, train=True))
    assert next(train)["wav"].shape == (2, 1, 5 * 1920)


def test_precomputed_teacher_features_are_read_beside_the_audio_and_checked(folder):
    data, mcfg, ccfg = _cfgs(folder, "precomputed", 3)
    with pytest.raises(codec_audio.CodecDataError, match="teacher.npy"):
        next(iter(codec_audio.make_codec_dataset(data, mcfg, ccfg, train=False)))
    np.save(folder / "u0.teacher.npy", np.ones((50, 3), np.float32))  # 50 Hz over 1 s
    np.save(folder / "u1.teacher.npy", np.full((15, 3), 2.0, np.float32))
    batch = next(iter(codec_audio.make_codec_dataset(data, mcfg, ccfg, train=False)))
    np.testing.assert_allclose(batch["teacher"][0], 1.0)
    np.testing.assert_allclose(batch["teacher"][1, :4], 2.0)
    np.save(folder / "u1.teacher.npy", np.ones((15, 4), np.float32))
    with pytest.raises(codec_audio.CodecDataError, match=r"\[frames, 3\]"):
        next(iter(codec_audio.make_codec_dataset(data, mcfg, ccfg, train=False)))


def test_a_folder_without_audio_is_a_clear_error(tmp_path):
    data, mcfg, ccfg = _cfgs(tmp_path)
    with pytest.raises(codec_audio.CodecDataError, match="no audio files"):
        codec_audio.make_codec_dataset(data, mcfg, ccfg, train=True)


def _take(ds, n: int | None) -> list[dict]:
    import itertools

    return list(itertools.islice(iter(ds), n))


def test_global_batches_do_not_depend_on_the_process_count_train_and_eval(tmp_path):
    """Process p of P loads rows [p*B/P, (p+1)*B/P) of each global batch (as the LM pipeline): the two processes'
    rows concatenate to the one-process batches, and both processes get the same number of eval batches."""
    from moshi_jax.audio import save_audio

    rng = np.random.default_rng(2)
    for i in range(7):  # distinct content and lengths: any reordering or misplaced row shows
        n = int(rng.integers(3000, 20000))
        save_audio(tmp_path / f"u{i}.wav", (0.05 * (i + 1) * rng.standard_normal(n)).astype(np.float32), 24000)
    data = DataConfig(sources=(DataSource(str(tmp_path)),), eval_sources=(DataSource(str(tmp_path)),),
                      seq_frames=2, batch_size=4)
    mcfg, ccfg = MimiConfig.tiny(), dataclasses.replace(CodecConfig(), teacher_dim=8)
    for train, n in ((True, 5), (False, None)):
        one = _take(codec_audio.make_codec_dataset(data, mcfg, ccfg, train, process_index=0, process_count=1), n)
        parts = [_take(codec_audio.make_codec_dataset(data, mcfg, ccfg, train, process_index=p, process_count=2), n)
                 for p in range(2)]
        assert len(parts[0]) == len(parts[1]) == len(one)
        for i, batch in enumerate(one):
            assert batch["wav"].shape == (4, 1, 2 * 1920) and parts[0][i]["wav"].shape == (2, 1, 2 * 1920)
            for key in ("wav", "teacher"):
                np.testing.assert_array_equal(np.concatenate([parts[0][i][key], parts[1][i][key]]), batch[key])
    assert len(one) == 1  # eval: 7 files -> one whole global batch of 4, on every process


def test_an_eval_set_smaller_than_one_global_batch_is_a_clear_error(folder):
    data, mcfg, ccfg = _cfgs(folder)
    data = dataclasses.replace(data, batch_size=4)  # 2 files
    with pytest.raises(codec_audio.CodecDataError, match="fewer than one global batch"):
        codec_audio.make_codec_dataset(data, mcfg, ccfg, train=False)
