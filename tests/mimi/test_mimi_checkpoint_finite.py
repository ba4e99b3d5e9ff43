"""Non-finite Mimi weights are refused when loaded (naming the tensor) and never exported; the codec command
exits 2 instead of encoding all-zero codes."""

import logging

import jax
import numpy as np
import pytest
import soundfile as sf
from safetensors.numpy import save_file

from moshi_jax.cli import main
from moshi_jax.finite import NonFiniteError
from moshi_jax.mimi import checkpoint as mimi_ckpt
from moshi_jax.mimi.config import MimiConfig
from moshi_jax.mimi.model import MimiCodec

CFG = MimiConfig.tiny()
KEY = "encoder.model.0.conv.conv.weight"


@pytest.fixture(scope="module")
def params():
    return MimiCodec(CFG).init(jax.random.PRNGKey(0))


@pytest.fixture
def nan_state_dict(params):
    sd = mimi_ckpt.to_reference_state_dict(params, CFG)
    assert KEY in sd
    sd[KEY] = sd[KEY].copy()
    sd[KEY].flat[3] = np.nan
    return sd


def test_loading_nan_weights_names_the_tensor(nan_state_dict):
    with pytest.raises(NonFiniteError, match=rf"NaN/inf values in {KEY} \(1 of \d+ values\)"):
        mimi_ckpt.load_reference(nan_state_dict, CFG)


def test_nan_weights_are_never_saved_and_the_old_file_stays(params, tmp_path):
    path = mimi_ckpt.save_reference(params, CFG, tmp_path / "mimi.safetensors")
    before = path.read_bytes()
    broken = jax.tree.map(lambda x: x, params)
    leaf = next(iter(jax.tree_util.tree_leaves_with_path(broken)))
    bad = jax.tree_util.tree_map_with_path(lambda p, x: x * np.nan if p == leaf[0] else x, broken)
    with pytest.raises(NonFiniteError, match="refusing to save Mimi weights"):
        mimi_ckpt.save_reference(bad, CFG, path)
    assert path.read_bytes() == before


def test_codec_command_with_nan_weights_exits_2_naming_the_tensor(nan_state_dict, tmp_path, caplog):
    weights = tmp_path / "nan.safetensors"
    save_file(nan_state_dict, str(weights))
    wav = tmp_path / "in.wav"
    sf.write(wav, np.zeros(2400, np.float32) + 0.1, 24000, subtype="FLOAT")
    out = tmp_path / "codes.npy"
    with caplog.at_level(logging.ERROR):
        assert main(["codec", "encode", str(wav), "-o", str(out), "--weights", str(weights), "--preset", "tiny"]) == 2
    assert not out.exists()
    assert any(KEY in r.getMessage() and "NaN" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
