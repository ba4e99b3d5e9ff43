"""`Engine.load` from a repository directory laid out like a downloaded Kyutai repo (tiny models written with
the reference exporters): weights, tokenizer and the repo's sampling settings arrive in the engine."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from moshi_jax.data.speech_synth import SENTENCES
from moshi_jax.data.tokenize import train_sentencepiece
from moshi_jax.engine.engine import Engine, EngineConfig, preset_configs, random_lm_params
from moshi_jax.lm import checkpoint as lm_ckpt
from moshi_jax.mimi import checkpoint as mimi_ckpt
from moshi_jax.mimi.model import MimiCodec
from moshi_jax.nn.sampling import SamplingConfig


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("repo")
    mimi_cfg, lm_cfg = preset_configs("tiny")
    lm_params = random_lm_params(lm_cfg, 11)
    mimi_params = MimiCodec(mimi_cfg).init(jax.random.PRNGKey(12))
    lm_ckpt.save_reference(lm_params, lm_cfg, d / "model.safetensors")
    mimi_ckpt.save_reference(mimi_params, mimi_cfg, d / "mimi.safetensors")
    train_sentencepiece(SENTENCES, d / "tok.model", 200)
    conf = dict(lm_cfg.to_reference_kwargs(), mimi_name="mimi.safetensors", tokenizer_name="tok.model",
                lm_gen_config={"temp": 0.5, "top_k_text": 7})
    (d / "config.json").write_text(json.dumps(conf))
    return d, mimi_cfg, lm_cfg, lm_params, mimi_params


def test_load_repo_brings_weights_tokenizer_and_repo_sampling(repo):
    d, mimi_cfg, lm_cfg, lm_params, mimi_params = repo
    engine, params = Engine.load(d, mimi_cfg=mimi_cfg)
    assert engine.lm_cfg == lm_cfg
    for a, b in zip(jax.tree.leaves(params["lm"]), jax.tree.leaves(lm_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(params["mimi"]), jax.tree.leaves(mimi_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert engine.cfg.sampling == SamplingConfig(temp=0.5, top_k_text=7)
    hello = engine.tokenizer.encode("hello")[0]
    assert engine.text_piece(hello) == engine.tokenizer.decode_piece(hello)
    # explicit sampling wins over the repository's
    engine2, _ = Engine.load(d, mimi_cfg=mimi_cfg, cfg=EngineConfig(sampling=SamplingConfig.greedy()))
    assert engine2.cfg.sampling == SamplingConfig.greedy()


def test_load_repo_missing_files_are_named(repo, tmp_path):
    d = repo[0]
    with pytest.raises(FileNotFoundError, match="not a directory"):
        Engine.load(tmp_path / "nope")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="LM weights not found"):
        Engine.load(partial)
    with pytest.raises(ValueError, match="unknown preset"):
        Engine.load(None, preset="huge")
