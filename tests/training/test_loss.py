"""The LM loss equals moshi-finetune's formula (written out in torch) on the same logits and masks."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from moshi_jax.training.loss import cross_entropy, lm_loss

PAD, EPAD = 3, 0
CFG = types.SimpleNamespace(dep_q=4, n_q=8, existing_text_padding_id=PAD, existing_text_end_padding_id=EPAD)


@struct.dataclass
class Out:  # the fields of moshi_jax.lm.model.LMOutput that the loss reads
    text_logits: np.ndarray
    text_mask: np.ndarray
    audio_logits: np.ndarray
    audio_mask: np.ndarray


def _case(seed=0, B=3, T=11, text_card=17, card=13):
    rng = np.random.default_rng(seed)
    codes = np.concatenate([rng.integers(0, text_card, (B, 1, T)), rng.integers(0, card, (B, CFG.n_q, T))], 1)
    codes[:, 0, ::3] = PAD  # plenty of padding targets
    codes[:, 0, 1::5] = EPAD
    codes[0, 0, 4] = -1  # -1 targets (no token): masked even where the model's mask is True
    codes[1, 2, 2:5] = -1
    out = Out(
        text_logits=(3 * rng.normal(size=(B, 1, T, text_card))).astype(np.float32),
        text_mask=rng.random((B, 1, T)) > 0.2,
        audio_logits=(3 * rng.normal(size=(B, CFG.dep_q, T, card))).astype(np.float32),
        audio_mask=rng.random((B, CFG.dep_q, T)) > 0.2,
    )
    return out, codes.astype(np.int32)


def _moshi_finetune_loss(logits, target, target_mask, mode, first_codebook_weight_multiplier=1.0,
                         text_padding_weight=1.0, text_padding_ids=None):
    """moshi-finetune `finetune/loss.py compute_loss_with_mask`, written out."""
    import torch
    import torch.nn.functional as F

    target = torch.where(target_mask, target, torch.zeros_like(target))
    weights = target_mask.float()
    if mode == "audio":
        weights[:, 0] *= first_codebook_weight_multiplier
    elif mode == "text":
        for i in text_padding_ids:
            weights[target == i] *= text_padding_weight
    logits = logits.reshape(-1, logits.size(-1)).float()
    target = target.reshape(-1)
    weights = weights.reshape(-1)
    mb_loss = F.cross_entropy(logits, target, reduction="none")
    mb_loss = torch.where(weights > 0.0, mb_loss * weights, torch.zeros_like(mb_loss))
    return torch.sum(mb_loss) / torch.sum(weights)


def _reference(out, codes, tpw, fcm):
    """moshi-finetune train.py: the reference LMModel.forward ANDs its masks with codes != -1."""
    import torch

    codes_t = torch.tensor(codes, dtype=torch.long)
    text_mask = torch.tensor(out.text_mask) & (codes_t[:, :1] != -1)
    audio_mask = torch.tensor(out.audio_mask) & (codes_t[:, 1:1 + CFG.dep_q] != -1)
    text = _moshi_finetune_loss(torch.tensor(out.text_logits), codes_t[:, :1], text_mask, "text",
                                text_padding_weight=tpw, text_padding_ids={PAD, EPAD})
    audio = _moshi_finetune_loss(torch.tensor(out.audio_logits), codes_t[:, 1:1 + CFG.dep_q], audio_mask, "audio",
                                 first_codebook_weight_multiplier=fcm)
    return float(text), float(audio)


@pytest.mark.parity
@pytest.mark.parametrize("tpw,fcm", [(0.5, 100.0), (1.0, 1.0), (0.0, 3.0)])
def test_lm_loss_equals_moshi_finetune_formula(tpw, fcm):
    out, codes = _case()
    loss, m = jax.jit(lambda o, c: lm_loss(o, c, CFG, tpw, fcm))(out, codes)
    text_ref, audio_ref = _reference(out, codes, tpw, fcm)
    np.testing.assert_allclose(float(m["text_loss"]), text_ref, rtol=1e-5)
    np.testing.assert_allclose(float(m["audio_loss"]), audio_ref, rtol=1e-5)
    np.testing.assert_allclose(float(loss), text_ref + audio_ref, rtol=1e-5)


@pytest.mark.parity
def test_cross_entropy_equals_reference_moshi_utils_cross_entropy():
    import torch
    from moshi.utils.utils import cross_entropy as ref_ce

    out, codes = _case(1)
    targets = np.maximum(codes[:, 1:1 + CFG.dep_q], 0)
    mask = out.audio_mask & (codes[:, 1:1 + CFG.dep_q] >= 0)
    ref = ref_ce(torch.tensor(out.audio_logits), torch.tensor(targets, dtype=torch.long), torch.tensor(mask))
    got = cross_entropy(jnp.asarray(out.audio_logits), jnp.asarray(codes[:, 1:1 + CFG.dep_q]), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=1e-5, atol=1e-6)


def test_per_stream_metrics_are_masked_means_and_accuracy_counts_argmax_hits():
    out, codes = _case(2)
    _, m = lm_loss(out, codes, CFG, 0.5, 100.0)
    ce = np.asarray(cross_entropy(jnp.asarray(out.audio_logits), jnp.asarray(codes[:, 1:5]),
                                  jnp.asarray(out.audio_mask & (codes[:, 1:5] >= 0))))
    mask = out.audio_mask & (codes[:, 1:5] >= 0)
    np.testing.assert_allclose(float(m["semantic_loss"]), ce[:, 0][mask[:, 0]].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["acoustic_loss"]), ce[:, 1:][mask[:, 1:]].mean(), rtol=1e-5)
    hits = (out.audio_logits.argmax(-1) == codes[:, 1:5])[mask]
    np.testing.assert_allclose(float(m["audio_accuracy"]), hits.mean(), rtol=1e-6)
    # Logits that put all mass on the target: loss 0, accuracy 1.
    perfect = dataclasses.replace(
        out, text_logits=50.0 * np.eye(out.text_logits.shape[-1], dtype=np.float32)[np.maximum(codes[:, :1], 0)],
        audio_logits=50.0 * np.eye(out.audio_logits.shape[-1], dtype=np.float32)[np.maximum(codes[:, 1:5], 0)])
    loss, m = lm_loss(perfect, codes, CFG, 0.5, 100.0)
    assert float(loss) < 1e-6 and float(m["text_accuracy"]) == 1.0 and float(m["audio_accuracy"]) == 1.0


def test_stream_without_valid_targets_gives_zero_loss_and_finite_gradient():
    out, codes = _case(3)
    codes[:, 0] = -1  # no text alignment anywhere (moshi-finetune: text stream of -1)

    def f(text_logits, audio_logits):
        o = Out(text_logits=text_logits, text_mask=out.text_mask, audio_logits=audio_logits,
                audio_mask=out.audio_mask)
        return lm_loss(o, codes, CFG, 0.5, 100.0)

    (loss, m), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(out.text_logits, out.audio_logits)
    assert float(m["text_loss"]) == 0.0 and float(loss) == float(m["audio_loss"]) > 0
    assert not np.any(np.asarray(grads[0])) and np.all(np.isfinite(np.asarray(grads[1])))


def test_mismatched_shapes_are_a_clear_error():
    out, codes = _case()
    with pytest.raises(ValueError, match="do not line up"):
        lm_loss(out, codes[:, :, :-1], CFG)
    with pytest.raises(ValueError, match="dep_q=4 audio streams"):
        lm_loss(out, codes[:, :3], CFG)


def _np_ce(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-position cross-entropy in float64 numpy (targets clipped to >= 0; mask them out yourself)."""
    z = logits.astype(np.float64)
    log_z = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return log_z - np.take_along_axis(z, np.maximum(targets, 0)[..., None], -1)[..., 0]


def test_text_loss_weights_pad_and_epad_targets_by_text_padding_weight():
    out, codes = _case(4)
    _, m = lm_loss(out, codes, CFG, 0.25, 1.0)
    t = codes[:, :1]
    mask = out.text_mask & (t >= 0)
    w = mask * np.where((t == PAD) | (t == EPAD), 0.25, 1.0)
    ce = _np_ce(out.text_logits, t)
    np.testing.assert_allclose(float(m["text_loss"]), (w * ce).sum() / w.sum(), rtol=1e-5)
    hits = (out.text_logits.argmax(-1) == t)[mask]
    np.testing.assert_allclose(float(m["text_accuracy"]), hits.mean(), rtol=1e-6)


def test_zero_padding_weight_with_only_padding_text_targets_gives_zero_text_loss_and_finite_gradients():
    # With text_padding_weight=0 and every valid text target PAD or EPAD (a silent stretch), the text weights
    # sum to 0: the text loss must be 0 and its gradient 0, not NaN (one NaN gradient ruins the parameters).
    out, codes = _case(5)
    codes[:, 0] = np.where(np.arange(codes.shape[-1]) % 2, PAD, EPAD)
    codes[0, 0, 3] = -1

    def f(text_logits, audio_logits):
        o = Out(text_logits=text_logits, text_mask=out.text_mask, audio_logits=audio_logits,
                audio_mask=out.audio_mask)
        return lm_loss(o, codes, CFG, 0.0, 100.0)

    (loss, m), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(out.text_logits, out.audio_logits)
    assert float(m["text_loss"]) == 0.0 and np.isfinite(float(loss)) and float(loss) == float(m["audio_loss"]) > 0
    assert np.all(np.asarray(grads[0]) == 0.0)
    assert np.all(np.isfinite(np.asarray(grads[1]))) and np.any(np.asarray(grads[1]))
    assert all(np.isfinite(float(v)) for v in m.values())


@pytest.mark.parametrize("fcm", [1.0, 100.0])
def test_one_audio_codebook_is_the_semantic_loss_alone(fcm):
    # dep_q=1 (a model predicting only the semantic codebook): audio loss = mean CE of codebook 0 (the
    # multiplier weighs every position alike, so it cancels), no acoustic codebook.
    cfg = types.SimpleNamespace(dep_q=1, n_q=2, existing_text_padding_id=PAD, existing_text_end_padding_id=EPAD)
    out, codes = _case(6)
    out = dataclasses.replace(out, audio_logits=out.audio_logits[:, :1], audio_mask=out.audio_mask[:, :1])
    codes = codes[:, :3]
    loss, m = lm_loss(out, codes, cfg, 0.5, fcm)
    a = codes[:, 1:2]
    mask = out.audio_mask & (a >= 0)
    want_audio = _np_ce(out.audio_logits, a)[mask].mean()
    np.testing.assert_allclose(float(m["audio_loss"]), want_audio, rtol=1e-5)
    np.testing.assert_allclose(float(m["semantic_loss"]), want_audio, rtol=1e-5)
    assert float(m["acoustic_loss"]) == 0.0
    np.testing.assert_allclose(float(loss), float(m["text_loss"]) + want_audio, rtol=1e-5)
    hits = (out.audio_logits.argmax(-1) == a)[mask]
    np.testing.assert_allclose(float(m["audio_accuracy"]), hits.mean(), rtol=1e-6)


def test_first_codebook_multiplier_weighs_the_semantic_codebook_against_the_acoustic_ones():
    out, codes = _case(7)
    _, m = lm_loss(out, codes, CFG, 0.5, 10.0)
    a = codes[:, 1:1 + CFG.dep_q]
    w = (out.audio_mask & (a >= 0)).astype(np.float64)
    w[:, 0] *= 10.0
    ce = _np_ce(out.audio_logits, a)
    np.testing.assert_allclose(float(m["audio_loss"]), (w * ce).sum() / w.sum(), rtol=1e-5)


def test_no_audio_codebook_is_a_text_only_loss():
    cfg = types.SimpleNamespace(dep_q=0, n_q=0, existing_text_padding_id=PAD, existing_text_end_padding_id=EPAD)
    out, codes = _case(8)
    out = dataclasses.replace(out, audio_logits=out.audio_logits[:, :0], audio_mask=out.audio_mask[:, :0])
    loss, m = lm_loss(out, codes[:, :1], cfg, 0.5, 100.0)
    assert float(loss) == float(m["text_loss"]) > 0 and set(m) == {"text_loss", "text_accuracy"}


@pytest.mark.parametrize("field,shape", [("text_mask", (3, 1, 11, 1)), ("audio_mask", (3, 4, 11, 1)),
                                         ("audio_mask", (3, 4, 1)), ("text_logits", (3, 1, 11)),
                                         ("audio_logits", (3, 4, 11, 13, 1))])
def test_outputs_whose_shape_only_broadcasts_against_the_codes_are_refused(field, shape):
    out, codes = _case()
    bad = dataclasses.replace(out, **{field: np.ones(shape, bool if "mask" in field else np.float32)})
    with pytest.raises(ValueError, match=rf"outputs\.{field} has shape \({shape[0]}, .*do not line up"):
        lm_loss(bad, codes, CFG)


def test_cross_entropy_refuses_a_mask_that_only_broadcasts_against_the_targets():
    logits, targets = jnp.zeros((2, 5, 7)), jnp.zeros((2, 5), jnp.int32)
    for mask in (jnp.ones((1, 5), bool), jnp.ones((2, 1), bool), jnp.ones((5,), bool)):
        with pytest.raises(ValueError, match="do not line up"):
            cross_entropy(logits, targets, mask)
    with pytest.raises(ValueError, match="do not line up"):
        cross_entropy(jnp.zeros((2, 4, 7)), targets, jnp.ones((2, 5), bool))


def test_cross_entropy_ignores_masked_positions_whatever_their_target():
    logits = jnp.asarray(np.random.default_rng(9).normal(size=(2, 3, 5)), jnp.float32)
    targets = jnp.asarray([[1, -1, 4], [0, 2, 99]], jnp.int32)
    mask = targets >= 0
    mask = mask.at[1, 2].set(False)
    got = np.asarray(cross_entropy(logits, targets, mask))
    want = np.where(np.asarray(mask), _np_ce(np.asarray(logits), np.asarray(targets) % 5), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got[0, 1] == 0.0 and got[1, 2] == 0.0


def test_a_tie_for_the_top_logit_counts_as_a_hit():
    cfg = types.SimpleNamespace(dep_q=1, n_q=1, existing_text_padding_id=PAD, existing_text_end_padding_id=EPAD)
    logits = np.zeros((1, 1, 2, 4), np.float32)
    logits[..., 2] = 1.0
    logits[0, 0, 1, 1] = 1.0  # position 1: targets 1 and 2 tie at the top
    codes = np.asarray([[[2, 1], [2, 1]]], np.int32)
    out = Out(text_logits=logits, text_mask=np.ones((1, 1, 2), bool), audio_logits=logits,
              audio_mask=np.ones((1, 1, 2), bool))
    _, m = lm_loss(out, codes, cfg)
    assert float(m["text_accuracy"]) == 1.0 and float(m["audio_accuracy"]) == 1.0
    codes[0, :, 1] = 3  # a target below the top: a miss
    _, m = lm_loss(out, codes, cfg)
    assert float(m["text_accuracy"]) == 0.5 and float(m["audio_accuracy"]) == 0.5


def test_bfloat16_logits_give_the_float32_loss():
    # Mixed-precision training hands the loss bf16 logits; the softmax is taken in float32 (as the reference's
    # `.float()`), so the loss is that of the bf16 values computed exactly, not a bf16-rounded one.
    rng = np.random.default_rng(10)
    logits = jnp.asarray(8 * rng.normal(size=(4, 6, 300)), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 300, (4, 6)), jnp.int32)
    got = cross_entropy(logits, targets, jnp.ones((4, 6), bool))
    assert got.dtype == jnp.float32
    want = _np_ce(np.asarray(logits.astype(jnp.float32)), np.asarray(targets))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_a_stream_whose_weights_sum_below_one_still_gets_its_weighted_mean():
    # One valid text target, a PAD at weight 0.5: the text loss is that target's CE (weights sum to 0.5 < 1).
    out, codes = _case(11)
    codes[:, 0] = -1
    codes[1, 0, 4] = PAD
    out.text_mask[1, 0, 4] = True
    _, m = lm_loss(out, codes, CFG, 0.5, 1.0)
    mask = out.text_mask & (codes[:, :1] >= 0)
    assert mask.sum() == 1
    want = _np_ce(out.text_logits, codes[:, :1])[mask].sum()
    np.testing.assert_allclose(float(m["text_loss"]), want, rtol=1e-5)
    assert float(m["text_loss"]) > 0


def test_loss_weights_default_to_half_for_padding_and_one_for_the_first_codebook():
    out, codes = _case(12)
    np.testing.assert_allclose(float(lm_loss(out, codes, CFG)[1]["text_loss"]),
                               float(lm_loss(out, codes, CFG, 0.5)[1]["text_loss"]), rtol=1e-6)
    assert float(lm_loss(out, codes, CFG)[1]["text_loss"]) != float(lm_loss(out, codes, CFG, 1.0)[1]["text_loss"])
    # and the first codebook is not weighted up unless asked (multiplier 1.0)
    np.testing.assert_allclose(float(lm_loss(out, codes, CFG)[1]["audio_loss"]),
                               float(lm_loss(out, codes, CFG, 0.5, 1.0)[1]["audio_loss"]), rtol=1e-6)
    doubled = lm_loss(out, codes, CFG, 0.5, 2.0)[1]["audio_loss"]
    assert float(lm_loss(out, codes, CFG)[1]["audio_loss"]) != float(doubled)
