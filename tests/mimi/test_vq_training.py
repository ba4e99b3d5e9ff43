"""Training-time RVQ (moshi_jax.mimi.vq_training) on hand-made data: k-means init, EMA update, dead-code
replacement, layer-by-layer initialisation, dropout masking, STE, and the dropout / bypass statistics."""

import jax
import jax.numpy as jnp
import numpy as np

from moshi_jax.mimi.vq_training import (
    CodebookState,
    VQTrainOptions,
    bypass_mask,
    dropout_levels,
    init_codebook_state,
    kmeans,
    rvq_train,
)

KEY = jax.random.PRNGKey(0)
rvq_train = jax.jit(rvq_train, static_argnames=("opts",))  # one compile per call shape, not op-by-op


def _state(books, usage=None):
    books = np.asarray(books, np.float32)  # [L, bins, d] centroids
    usage = np.ones(books.shape[:2], np.float32) if usage is None else np.asarray(usage, np.float32)
    return CodebookState(usage=jnp.asarray(usage), embed_sum=jnp.asarray(books * usage[..., None]),
                         initialized=jnp.ones((books.shape[0],), jnp.float32))


def test_kmeans_finds_well_separated_clusters_and_their_sizes():
    rng = np.random.default_rng(0)
    centres = np.array([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]], np.float32)
    sizes = [5, 7, 9]
    x = np.concatenate([c + 0.1 * rng.standard_normal((n, 2)) for c, n in zip(centres, sizes, strict=True)])
    means, counts = kmeans(jnp.asarray(x, jnp.float32), 3, 10, KEY)
    order = np.argsort(np.asarray(means)[:, 0])  # -10, 0, 10 on the first axis
    np.testing.assert_allclose(np.asarray(means)[order], centres[[2, 1, 0]], atol=0.1)
    assert [int(c) for c in np.asarray(counts)[order]] == [9, 7, 5]


def test_ema_update_commitment_and_codes_match_a_direct_computation():
    books = np.array([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], np.float32)  # L=1, bins=3
    x = np.array([[0.1, 0.0], [0.9, 0.1], [1.1, -0.1], [0.0, 0.8]], np.float32)
    opts = VQTrainOptions(decay=0.9, dead_code_every=1000)
    q, codes, commit, new, _ = rvq_train(jnp.asarray(x), _state(books), 1, 0, KEY, opts)
    np.testing.assert_array_equal(np.asarray(codes)[:, 0], [0, 1, 1, 2])
    np.testing.assert_allclose(np.asarray(q), books[0][[0, 1, 1, 2]], atol=1e-6)
    np.testing.assert_allclose(float(commit), np.mean((x - books[0][[0, 1, 1, 2]]) ** 2), rtol=1e-5)
    counts = np.array([1.0, 2.0, 1.0])
    sums = np.stack([x[0], x[1] + x[2], x[3]])
    np.testing.assert_allclose(np.asarray(new.usage[0]), 0.9 * 1.0 + 0.1 * counts, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new.embed_sum[0]), 0.9 * books[0] + 0.1 * sums, rtol=1e-5, atol=1e-7)


def test_straight_through_estimator_passes_the_gradient_unchanged():
    books = np.array([[[0.0, 0.0], [1.0, 0.0]]], np.float32)
    x = jnp.asarray([[0.2, 0.3], [0.7, -0.1]], jnp.float32)
    w = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])
    g = jax.grad(lambda x: jnp.sum(w * rvq_train(x, _state(books), 1, 0, KEY, VQTrainOptions())[0]))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w))


def test_dead_codes_are_replaced_by_batch_vectors_on_the_check_step_only():
    books = np.array([[[0.0, 0.0], [1.0, 0.0], [5.0, 5.0], [-5.0, 5.0]]], np.float32)
    usage = np.array([[10.0, 10.0, 0.01, 10.0]], np.float32)  # code 2: usage < 0.1 x uniform (= 0.1 * 30 / 4)
    x = jnp.asarray([[0.1, 0.0], [0.9, 0.0], [-5.0, 4.9]], jnp.float32)
    opts = VQTrainOptions(decay=0.99, dead_code_every=5, threshold=0.1, replaced_usage_ratio=1.0)
    _, _, _, kept, m = rvq_train(x, _state(books, usage), 1, 3, KEY, opts)  # step 3: (3 + 1) % 5 != 0
    np.testing.assert_allclose(np.asarray(kept.usage[0, 2]), 0.99 * 0.01, rtol=1e-5)
    assert float(m["expired"]) == 0.0
    _, codes, _, new, m = rvq_train(x, _state(books, usage), 1, 4, KEY, opts)  # step 4: check
    replaced_usage = usage.sum() / 4
    np.testing.assert_allclose(float(new.usage[0, 2]), 0.99 * replaced_usage, rtol=1e-5)  # then the EMA
    centre = np.asarray(new.embed_sum[0, 2]) / (0.99 * replaced_usage)
    assert any(np.allclose(centre, row, atol=1e-5) for row in np.asarray(x)), centre  # a vector of the batch
    np.testing.assert_allclose(float(m["expired"]), 0.25)
    # The live codes only took their EMA update.
    np.testing.assert_allclose(np.asarray(new.usage[0, [0, 1, 3]]), 0.99 * 10 + 0.01 * np.array([1, 1, 1]),
                               rtol=1e-5)


def test_levels_are_kmeans_initialised_one_step_after_the_previous_level():
    x = jax.random.normal(KEY, (64, 4))
    state = init_codebook_state(3, 8, 4)
    opts = VQTrainOptions(kmeans_iters=5, dead_code_every=1000)
    inits = []
    for step in range(3):
        _, _, _, state, _ = rvq_train(x, state, 3, step, jax.random.fold_in(KEY, step), opts)
        inits.append(np.asarray(state.initialized).tolist())
    assert inits == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


def test_levels_beyond_the_active_count_are_untouched_and_output_nothing():
    books = np.stack([np.eye(3, 2, dtype=np.float32)] * 3)  # L=3, bins=3, d=2
    state = _state(books)
    x = jnp.asarray([[0.9, 0.1], [0.1, 0.8]], jnp.float32)
    q1, codes, _, new, _ = rvq_train(x, state, 1, 0, KEY, VQTrainOptions(dead_code_every=1000))
    assert (np.asarray(codes)[:, 1:] == -1).all() and (np.asarray(codes)[:, 0] >= 0).all()
    for a, b in ((new.usage, state.usage), (new.embed_sum, state.embed_sum)):
        np.testing.assert_array_equal(np.asarray(a)[1:], np.asarray(b)[1:])
    np.testing.assert_allclose(np.asarray(q1), books[0][np.asarray(codes)[:, 0]], atol=1e-6)


def test_quantizer_dropout_draws_every_level_count_uniformly():
    keys = jax.random.split(KEY, 4000)
    n = np.asarray(jax.vmap(lambda k: dropout_levels(k, 7))(keys))
    assert n.min() == 1 and n.max() == 7
    freq = np.bincount(n, minlength=8)[1:] / len(n)
    np.testing.assert_allclose(freq, 1 / 7, atol=0.025)


def test_bypass_mask_skips_quantization_for_the_configured_fraction_of_sequences():
    m = np.asarray(bypass_mask(KEY, 20000, 0.5))
    assert abs(m.mean() - 0.5) < 0.02
    assert not np.asarray(bypass_mask(KEY, 100, 0.0)).any()
