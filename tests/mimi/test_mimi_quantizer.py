"""Nearest-centroid search: the single-row (streaming) form picks exactly the codes of the batched form."""

import jax.numpy as jnp
import numpy as np

from moshi_jax.mimi.quantizer import nearest_code


def test_single_row_search_equals_batched_search_and_brute_force():
    rng = np.random.default_rng(0)
    codebook = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
    x = rng.standard_normal((9, 16)).astype(np.float32)
    x[3] = np.asarray(codebook[5])  # an exact hit
    batched = np.asarray(nearest_code(jnp.asarray(x), codebook))
    single = np.asarray([int(nearest_code(jnp.asarray(row[None]), codebook)[0]) for row in x])
    brute = np.argmin(((x[:, None] - np.asarray(codebook)[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(single, batched)
    np.testing.assert_array_equal(batched, brute)
    assert batched[3] == 5
