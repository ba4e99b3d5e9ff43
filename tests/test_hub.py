"""Hugging Face repo ids (`--hf-repo`, `hf://`) resolved offline from a local HF cache that the test builds in the
real layout (models--ORG--NAME/{blobs, snapshots/<commit>, refs/main}, HF_HUB_OFFLINE=1): codec, chat, serve and
train take their weights from it; a missing repository or file is a one-line error naming it (exit status 2)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from moshi_jax import hub
from moshi_jax.cli import main
from moshi_jax.mimi.config import MimiConfig

REPO = "kyutai-test/tiny-moshi"
COMMIT = "a" * 40
OLD_COMMIT = "b" * 40
ROOT = Path(__file__).resolve().parents[1]


def add_to_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str, ref: str | None = "main") -> Path:
    """Write `files` as huggingface_hub lays out a download: content-addressed blobs, a snapshot of relative
    symlinks per commit, and refs/<ref> -> commit. Returns the snapshot directory."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    snap = folder / "snapshots" / commit
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def repo_files(tmp_path_factory) -> dict[str, bytes]:
    """A tiny Kyutai-style repository: config.json, LM + Mimi safetensors (reference layout), tokenizer."""
    from moshi_jax.data.speech_synth import SENTENCES
    from moshi_jax.data.tokenize import train_sentencepiece
    from moshi_jax.engine.engine import preset_configs, random_lm_params
    from moshi_jax.lm import checkpoint as lm_ckpt
    from moshi_jax.mimi import checkpoint as mimi_ckpt
    from moshi_jax.mimi.model import MimiCodec

    d = tmp_path_factory.mktemp("src")
    mimi_cfg, lm_cfg = preset_configs("tiny")
    lm_ckpt.save_reference(random_lm_params(lm_cfg, 11), lm_cfg, d / "model.safetensors")
    mimi_ckpt.save_reference(MimiCodec(mimi_cfg).init(jax.random.PRNGKey(12)), mimi_cfg, d / "mimi.safetensors")
    train_sentencepiece(SENTENCES, d / "tok.model", 200)
    conf = dict(lm_cfg.to_reference_kwargs(), mimi_name="mimi.safetensors", tokenizer_name="tok.model")
    (d / "config.json").write_text(json.dumps(conf))
    return {p.name: p.read_bytes() for p in d.iterdir()}


@pytest.fixture
def hf_cache(tmp_path, repo_files, monkeypatch):
    """HF_HOME / HF_HUB_CACHE in tmp, offline, holding REPO at COMMIT (refs/main) and an older commit whose LM
    weights differ (only reachable by pinning --revision)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    add_to_cache(cache, REPO, repo_files, COMMIT)
    old = dict(repo_files)
    old["model.safetensors"] = _rescaled(repo_files["model.safetensors"], 2.0)
    add_to_cache(cache, REPO, old, OLD_COMMIT, ref=None)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # huggingface_hub reads these at import (this process imported it already): the subprocesses read the env.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _rescaled(data: bytes, factor: float) -> bytes:
    from safetensors.numpy import load, save

    return save({k: (v * factor).astype(v.dtype) for k, v in load(data).items()})


def _snapshot(cache: Path, commit: str = COMMIT) -> Path:
    return cache / ("models--" + REPO.replace("/", "--")) / "snapshots" / commit


# ----------------------------------------------------------------------------------------------- resolution


def test_hub_paths_and_repos_resolve_to_the_cached_snapshot_with_revision_pinning(hf_cache):
    snap = _snapshot(hf_cache)
    assert hub.resolve_path(f"hf://{REPO}/mimi.safetensors") == snap / "mimi.safetensors"
    assert hub.resolve_repo(REPO) == snap
    assert hub.resolve_repo(f"hf://{REPO}") == snap
    assert hub.resolve_weights(f"hf://{REPO}", "moshi_name") == snap / "model.safetensors"
    assert hub.resolve_weights(f"hf://{REPO}", "mimi_name") == snap / "mimi.safetensors"  # named by config.json
    assert hub.resolve_weights(f"hf://{REPO}@{OLD_COMMIT}") == _snapshot(hf_cache, OLD_COMMIT) / "model.safetensors"
    assert hub.resolve_repo(REPO, revision=OLD_COMMIT) == _snapshot(hf_cache, OLD_COMMIT)
    assert hub.resolve_weights_dir(f"hf://{REPO}@{OLD_COMMIT}", None) == str(_snapshot(hf_cache, OLD_COMMIT))
    assert hub.resolve_weights_dir(None, REPO) == str(snap)
    assert hub.resolve_weights_dir("local/dir", None) == "local/dir"
    assert hub.resolve_path("some/local/file.safetensors") == Path("some/local/file.safetensors")
    assert hub.resolve_path("file://hf://odd") == Path("hf://odd")


@pytest.mark.parametrize("call, words", [
    (lambda: hub.resolve_repo("nobody/nothing"), "not in the local cache (offline mode, HF_HUB_OFFLINE=1): nobody/"
                                                 "nothing"),
    (lambda: hub.resolve_path(f"hf://{REPO}/missing.safetensors"), "missing.safetensors"),
    (lambda: hub.resolve_repo(REPO, revision="c" * 40), f"revision {'c' * 40} of Hugging Face repository {REPO}"),
    (lambda: hub.resolve_path("hf://justone"), "expected hf://ORG/NAME/FILE"),
    (lambda: hub.resolve_path(f"hf://{REPO}"), "names a repository, not a file"),
])
def test_missing_repo_file_or_revision_is_a_hub_error_naming_it(hf_cache, call, words):
    with pytest.raises(hub.HubError) as e:
        call()
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv, words", [
    (["codec", "roundtrip", "-o", "x.wav", "--preset", "tiny", "--hf-repo", "nobody/nothing"], "nobody/nothing"),
    (["codec", "roundtrip", "-o", "x.wav", "--preset", "tiny", "--weights", f"hf://{REPO}/nope.safetensors"],
     "nope.safetensors"),
    (["chat", "-o", "x.wav", "--hf-repo", "nobody/nothing"], "nobody/nothing"),
    (["serve", "--hf-repo", "nobody/nothing"], "nobody/nothing"),
    (["train", "tiny", "--hf-repo", "nobody/nothing"], "nobody/nothing"),
    (["train", "tiny", f"init_from=hf://{REPO}/nope.safetensors"], "nope.safetensors"),
    (["chat", "-o", "x.wav", "--hf-repo", REPO, "--weights-dir", "d"], "not both"),
    (["chat", "-o", "x.wav", "--tokenizer", f"hf://{REPO}/nope.model"], "nope.model"),
    (["data", "builtin", "-o", "d", "--mimi-weights", "hf://nobody/nothing/m.safetensors"], "nobody/nothing"),
])
def test_cli_missing_repo_or_file_exits_2_with_one_line_naming_it(hf_cache, argv, words, caplog, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and words in errors[0] and "\n" not in errors[0], errors


def test_missing_repo_in_a_fresh_process_with_hf_hub_offline_from_the_environment(hf_cache, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "moshi_jax.cli", "codec", "roundtrip", "--preset", "tiny", "-o",
                        str(tmp_path / "x.wav"), "--hf-repo", "nobody/nothing"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "ERROR" in ln]
    assert len(lines) == 1 and "nobody/nothing" in lines[0] and "HF_HUB_OFFLINE" in lines[0], r.stderr


# ----------------------------------------------------------------------------------------------- commands


def test_codec_takes_the_repo_mimi_weights(hf_cache, tmp_path, caplog):
    """`codec roundtrip --hf-repo`: the output equals the roundtrip with the same weights given as a local file."""
    import logging

    import soundfile as sf

    caplog.set_level(logging.INFO)
    wav = tmp_path / "in.wav"
    sf.write(wav, np.random.default_rng(0).normal(0, 0.1, 9600).astype(np.float32), 24000)  # 0.4 s
    base = ["codec", "roundtrip", str(wav), "--preset", "tiny", "--chunk-frames", "5"]
    assert main(base + ["-o", str(tmp_path / "hub.wav"), "--hf-repo", REPO]) == 0
    assert f"loading Mimi weights from {_snapshot(hf_cache) / 'mimi.safetensors'}" in caplog.text
    assert main(base + ["-o", str(tmp_path / "local.wav"), "--weights",
                        str(_snapshot(hf_cache) / "mimi.safetensors")]) == 0
    a, b = sf.read(tmp_path / "hub.wav")[0], sf.read(tmp_path / "local.wav")[0]
    assert a.shape == (9600,)
    np.testing.assert_array_equal(a, b)


@pytest.fixture
def tiny_codec_engine(monkeypatch):
    """The CLI has no flag for a repository's codec size (Kyutai repositories all use the released Mimi): hand
    Engine.load the tiny Mimi config of the test repository; everything else is the real load."""
    from moshi_jax.engine import engine as engine_mod
    from moshi_jax.mimi.config import MimiConfig

    real = engine_mod.Engine.load.__func__
    seen = []

    def load(cls, weights_dir=None, **kw):
        seen.append(weights_dir)
        return real(cls, weights_dir, **{**kw, "mimi_cfg": MimiConfig.tiny()})

    monkeypatch.setattr(engine_mod.Engine, "load", classmethod(load))
    return seen


def test_chat_runs_from_hf_repo_at_a_pinned_revision(hf_cache, tiny_codec_engine, tmp_path):
    argv = ["chat", "-o", str(tmp_path / "a.wav"), "--max-seconds", "0.24", "--greedy", "--hf-repo", REPO,
            "--revision", OLD_COMMIT]
    assert main(argv) == 0
    assert tiny_codec_engine == [str(_snapshot(hf_cache, OLD_COMMIT))]
    assert (tmp_path / "a.wav").is_file()


def test_serve_loads_the_model_of_hf_repo(hf_cache, tiny_codec_engine, monkeypatch):
    from moshi_jax.engine import server

    served = []
    monkeypatch.setattr(server, "serve", lambda engine, params, **kw: served.append((engine, kw)))
    assert main(["serve", "--hf-repo", REPO, "--port", "0"]) == 0
    assert tiny_codec_engine == [str(_snapshot(hf_cache))]
    engine, kw = served[0]
    assert engine.lm_cfg.dim == 64 and kw["port"] == 0


def test_train_init_from_hf_repo_starts_from_the_repo_weights(hf_cache, capsys):
    """`train --hf-repo R --revision C` records init_from=hf://R@C (resolved through the cache before anything
    else runs) and the LM program's init loads that revision's weights."""
    from moshi_jax.lm import checkpoint as lm_ckpt
    from moshi_jax.training import config as config_lib
    from moshi_jax.training.train_lm import lm_program

    assert main(["train", "--hf-repo", REPO, "--revision", OLD_COMMIT, "--print-config", "tiny",
                 f"model.card={MimiConfig.tiny().bins}"]) == 0
    cfg = config_lib.from_json(capsys.readouterr().out)
    assert cfg.init_from == f"hf://{REPO}@{OLD_COMMIT}"
    lm_cfg = config_lib.build_lm_config(cfg)
    got = lm_program(cfg, lm_cfg).init_params()
    want = lm_ckpt.load_reference(_snapshot(hf_cache, OLD_COMMIT) / "model.safetensors", lm_cfg)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    newest = lm_ckpt.load_reference(_snapshot(hf_cache) / "model.safetensors", lm_cfg)
    assert not np.array_equal(np.asarray(got["text_emb"]), np.asarray(newest["text_emb"]))
