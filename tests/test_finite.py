"""Finite checks name every bad tensor and count its bad values, for float32, bfloat16 and jax arrays."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from moshi_jax.finite import NonFiniteError, check_array, check_finite, count_nonfinite


def test_counts_nan_and_inf_in_any_float_dtype_and_ignores_integers():
    assert count_nonfinite(np.array([1.0, np.nan, np.inf, -np.inf], np.float32)) == 3
    assert count_nonfinite(np.array([1.0, np.nan], ml_dtypes.bfloat16)) == 1
    assert count_nonfinite(jnp.array([np.inf, 0.0], jnp.bfloat16)) == 1
    assert count_nonfinite(np.arange(5)) == 0


def test_check_finite_names_the_tensors_of_a_tree():
    tree = {"a": {"w": np.array([1.0, np.nan], np.float32)}, "b": np.ones(3, np.float32),
            "c": jnp.array([np.inf, np.inf, 1.0])}
    with pytest.raises(NonFiniteError, match=r"^weights: non-finite \(NaN/inf\) values in a/w \(1 of 2 values\), "
                                             r"c \(2 of 3 values\)$"):
        check_finite(tree, "weights")
    check_finite({"b": tree["b"]}, "weights")
    with pytest.raises(NonFiniteError, match="x.weight"):
        check_finite([("x.weight", np.array([np.nan]))], "state dict")
    with pytest.raises(NonFiniteError, match="audio: 1 of 2 values"):
        check_array(np.array([0.0, np.nan]), "audio")
