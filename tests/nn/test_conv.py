"""StreamingConv1d: the few-outputs matmul form (a streamed frame) equals XLA's convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.nn.conv import _FEW, _few_outputs_conv


@pytest.mark.parametrize("K,S,n_out", [(4, 2, 1), (16, 8, 2), (3, 1, 2), (7, 1, _FEW)])
def test_few_outputs_matmul_equals_convolution(K, S, n_out):
    rng = np.random.default_rng(K)
    T = (n_out - 1) * S + K
    xp = jnp.asarray(rng.standard_normal((2, T, 5)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((K, 5, 6)), jnp.float32)
    want = jax.lax.conv_general_dilated(xp, kernel, (S,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
    got = _few_outputs_conv(xp, kernel, S, n_out)
    assert got.shape == want.shape == (2, n_out, 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
