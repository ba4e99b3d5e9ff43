"""Non-finite LM weights are refused when loaded (naming the reference key) and never exported."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.finite import NonFiniteError
from moshi_jax.lm import checkpoint as ck
from moshi_jax.lm.config import LMConfig

CFG = LMConfig.tiny()


@pytest.fixture(scope="module")
def state_dict():
    """Random values in the tiny LM's reference layout (shapes from eval_shape: nothing is compiled)."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32),
                          ck.abstract_params(CFG))
    return ck.to_reference_state_dict(params, CFG)


def test_loading_a_nan_tensor_names_its_key(state_dict):
    sd = dict(state_dict)
    sd["text_linear.weight"] = sd["text_linear.weight"].copy()
    sd["text_linear.weight"][0, :2] = [np.nan, np.inf]
    with pytest.raises(NonFiniteError, match=r"NaN/inf values in text_linear\.weight \(2 of \d+ values\)"):
        ck.load_reference(sd, CFG)


def test_values_overflowing_the_param_dtype_are_refused(state_dict):
    sd = dict(state_dict)
    sd["emb.0.weight"] = sd["emb.0.weight"].copy()
    sd["emb.0.weight"][0, 0] = 3e38  # finite in float32, inf in float16
    with pytest.raises(NonFiniteError, match=r"emb\.0\.weight"):
        ck.load_reference(sd, CFG, dtype="float16")


def test_export_round_trip_refuses_nan_params_and_keeps_the_old_file(state_dict, tmp_path):
    params = ck.load_reference(state_dict, CFG)
    path = tmp_path / "model.safetensors"
    ck.save_reference(params, CFG, path)
    before = path.read_bytes()
    params["text_linear"] = params["text_linear"].at[0, 0].set(jnp.nan)
    with pytest.raises(NonFiniteError, match="refusing to save LM weights.*text_linear.weight"):
        ck.save_reference(params, CFG, path)
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("n", [5, 6])
def test_non_finite_tensors_are_named_up_to_five_and_the_rest_counted(state_dict, n):
    sd = dict(state_dict)
    bad = sorted(sd)[:n]
    for k in bad:
        sd[k] = sd[k].copy()
        sd[k].flat[0] = np.nan
    with pytest.raises(NonFiniteError) as e:
        ck.load_reference(sd, CFG)
    assert sum(k in str(e.value) for k in bad) >= 5
    assert str(e.value).endswith(" and 1 more") if n == 6 else "more" not in str(e.value)
