"""Delay / undelay of the token grid equal the reference's `_delay_sequence` / `_undelay_sequence` and the
input rule of `LMModel.forward`."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.lm import delays as dl

DELAYS = [0, 0, 1, 1, 2, 0, 5]


def _codes(B=2, T=6, seed=0):
    return np.random.default_rng(seed).integers(0, 50, (B, len(DELAYS), T)).astype(np.int64)


@pytest.mark.parity
@pytest.mark.parametrize("T", [1, 3, 6])
def test_delay_equals_reference_including_delays_longer_than_the_sequence(T):
    import torch
    from moshi.models.lm_utils import _delay_sequence

    codes = _codes(T=T)
    initial = np.arange(100, 100 + len(DELAYS))
    want = _delay_sequence(DELAYS, torch.from_numpy(codes), torch.from_numpy(initial)[None, :, None].expand(2, -1, -1))
    got = dl.delay(jnp.asarray(codes, jnp.int32), DELAYS, jnp.asarray(initial, jnp.int32))
    np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.parity
@pytest.mark.parametrize("T", [2, 6])
def test_undelay_values_and_mask_equal_reference(T):
    import torch
    from moshi.models.lm_utils import _undelay_sequence

    x = np.random.default_rng(1).normal(size=(2, len(DELAYS), T, 3)).astype(np.float32)
    want, want_mask = _undelay_sequence(DELAYS, torch.from_numpy(x))
    got, mask = dl.undelay(jnp.asarray(x), DELAYS, fill_value=0.0)
    np.testing.assert_array_equal(mask, want_mask.numpy())
    np.testing.assert_array_equal(np.asarray(got)[np.asarray(mask)], want.numpy()[want_mask.numpy()])
    assert (np.asarray(got)[~np.asarray(mask)] == 0).all()  # filled, finite (the reference puts NaN there)


def test_model_input_prepends_initial_column_so_position_t_holds_time_t_minus_1_minus_delay():
    codes = _codes(B=1, T=8)
    initial = jnp.asarray([7] * len(DELAYS), jnp.int32)
    seq = np.asarray(dl.model_input(jnp.asarray(codes, jnp.int32), DELAYS, initial))
    assert seq.shape == (1, len(DELAYS), 9)
    for k, d in enumerate(DELAYS):
        for t in range(9):
            src = t - 1 - d
            assert seq[0, k, t] == (codes[0, k, src] if src >= 0 else 7), (k, t)


def test_undelay_of_delayed_grid_gives_back_the_codes_where_masked():
    codes = _codes(B=2, T=9)
    delayed = dl.delay(jnp.asarray(codes, jnp.int32), DELAYS, jnp.zeros(len(DELAYS), jnp.int32))
    back, mask = dl.undelay(delayed, DELAYS, fill_value=-5)
    np.testing.assert_array_equal(np.asarray(back)[np.asarray(mask)], codes[np.asarray(mask)])
    assert (np.asarray(mask).sum(-1) == 9 - np.minimum(DELAYS, 9)).all()


def test_wrong_number_of_delays_is_rejected():
    with pytest.raises(ValueError, match="3 delays for 7 streams"):
        dl.delay(jnp.zeros((1, 7, 4), jnp.int32), [0, 1, 1], jnp.zeros(7, jnp.int32))
    with pytest.raises(ValueError, match="3 delays for 7 streams"):
        dl.undelay(jnp.zeros((1, 7, 4)), [0, 1, 1])


def test_more_delays_than_streams_is_rejected_too():
    with pytest.raises(ValueError, match="8 delays for 7 streams"):
        dl.delay(jnp.zeros((1, 7, 4), jnp.int32), DELAYS + [1], jnp.zeros(8, jnp.int32))
    with pytest.raises(ValueError, match="8 delays for 7 streams"):
        dl.model_input(jnp.zeros((1, 7, 4), jnp.int32), DELAYS + [1], jnp.zeros(8, jnp.int32))
    with pytest.raises(ValueError, match="8 delays for 7 streams"):
        dl.undelay(jnp.zeros((1, 7, 4)), DELAYS + [1])


def test_initial_tokens_are_the_text_token_then_one_audio_token_per_codebook():
    got = dl.initial_tokens(32000, 2048, 3)
    assert got.dtype == jnp.int32
    assert got.tolist() == [32000, 2048, 2048, 2048]
    assert dl.initial_tokens(5, 9, 0).tolist() == [5]


def test_model_input_keeps_the_codes_dtype_whatever_the_initial_tokens_dtype():
    codes = jnp.asarray(_codes(B=1, T=4), jnp.int32)
    for dtype in (jnp.int16, jnp.float32):
        seq = dl.model_input(codes, DELAYS, jnp.arange(len(DELAYS), dtype=dtype))
        assert seq.dtype == jnp.int32 and seq.shape == (1, len(DELAYS), 5)
        assert np.asarray(seq[0, :, 0]).tolist() == list(range(len(DELAYS)))


def test_undelay_fills_the_tail_with_zero_by_default_or_the_given_value_and_keeps_the_dtype():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 5, 4)), jnp.bfloat16)
    for fill, kw in ((0.0, {}), (-7.0, {"fill_value": -7.0})):
        out, mask = dl.undelay(x, [0, 1, 3], **kw)
        assert out.dtype == jnp.bfloat16 and out.shape == x.shape and mask.dtype == jnp.bool_
        out = np.asarray(out.astype(jnp.float32))
        np.testing.assert_array_equal(out[:, 1, 4:], fill)  # the last d_k steps of stream k
        np.testing.assert_array_equal(out[:, 2, 2:], fill)
        np.testing.assert_array_equal(out[:, 1, :4], np.asarray(x[:, 1, 1:].astype(jnp.float32)))
        assert np.asarray(mask[:, 2]).tolist() == [[True, True, False, False, False]] * 2
    ints, _ = dl.undelay(jnp.ones((1, 1, 3), jnp.int32), [1], fill_value=-1)
    assert ints.dtype == jnp.int32 and ints.tolist() == [[[1, 1, -1]]]


def test_undelay_of_a_single_delayed_stream_and_of_no_streams():
    x = jnp.arange(6, dtype=jnp.float32).reshape(1, 1, 6)
    out, mask = dl.undelay(x, [2])
    assert out.tolist() == [[[2, 3, 4, 5, 0, 0]]] and mask.tolist() == [[[True] * 4 + [False] * 2]]
    empty, mask = dl.undelay(jnp.zeros((2, 0, 5, 3)), [])
    assert empty.shape == (2, 0, 5, 3) and mask.shape == (2, 0, 5) and mask.dtype == jnp.bool_


def test_initial_tokens_must_be_one_per_stream():
    # jax clamps an index past the end, so a short `initial` would silently give the last stream's token.
    for initial in (jnp.zeros(3, jnp.int32), jnp.zeros(8, jnp.int32), jnp.zeros((1, 7), jnp.int32)):
        with pytest.raises(ValueError, match=r"want one per stream, \(7,\)"):
            dl.delay(jnp.zeros((1, 7, 4), jnp.int32), DELAYS, initial)
        with pytest.raises(ValueError, match=r"want one per stream, \(7,\)"):
            dl.model_input(jnp.zeros((1, 7, 4), jnp.int32), DELAYS, initial)
