"""A short ASR-layout train + eval run on a tiny synthesized corpus (the CI version of configs/asr_small.py):
the eval reads the held-out split only, its logged loss is the model's loss on exactly those rows, the report
shows the eval table and the loss-curve figure. (Learning itself is measured by benchmarks/learning.py.)"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from moshi_jax.data import speech_corpus
from moshi_jax.data.pipeline import make_dataset
from moshi_jax.data.records import TokenizedDataset
from moshi_jax.training import config as config_lib
from moshi_jax.training import curves

DELAY = 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    # no trailing silence: windows of pure silence would be the same in both splits and blur the membership test
    info = json.loads(speech_corpus.build_corpus(out, num_sentences=6, num_heldout=2, seed=0, num_codebooks=8,
                                                 trailing_silence=0.0, progress=False).read_text())
    return info["tokens"]


def _config(corpus, run_dir, *extra):
    return config_lib.load_config("asr_small", [
        f"data.sources={corpus['train']}", f"data.eval_sources={corpus['heldout_sentences']}",
        "data.seq_frames=16", "data.batch_size=8", f"data.text_delay_frames={DELAY}", "steps=4", "eval_every=2",
        "eval_batches=50", "checkpoint.every=4", "optimizer.warmup_steps=1", f"run_dir={run_dir}",
        "metrics.progress_bar=false", "metrics.tensorboard=true", "model.temporal.num_layers=1", *extra])


def _grids(path, lm_cfg, data_cfg) -> set[bytes]:
    """Every T-frame window the pipeline can cut from a dataset, as bytes (to test membership)."""
    from moshi_jax.data import pipeline

    channels, codebooks = pipeline.stream_layout(lm_cfg)
    layout = pipeline._Layout(channels, codebooks, DELAY)
    out = set()
    for codes, meta in TokenizedDataset.open(path):
        grid = pipeline.to_model_grid(codes, "audio", int(meta.get("channels", 1)), layout)
        T = data_cfg.seq_frames
        for k in range(0, grid.shape[1], T):
            w = grid[:, k:k + T]
            w = np.pad(w, ((0, 0), (0, T - w.shape[1])), constant_values=-1)
            out.add(np.ascontiguousarray(w, np.int32).tobytes())
    return out


def test_eval_batches_hold_held_out_rows_only(corpus, tmp_path):
    cfg = _config(corpus, tmp_path / "run")
    lm_cfg = config_lib.build_lm_config(cfg)
    heldout = _grids(corpus["heldout_sentences"], lm_cfg, cfg.data)
    train = _grids(corpus["train"], lm_cfg, cfg.data)
    assert not heldout & train
    seen = set()
    for batch in make_dataset(cfg.data, lm_cfg, train=False):
        for row, src in zip(batch["codes"], batch["source"], strict=True):
            if src >= 0:  # -1: padding rows of the last batch (all -1, no loss)
                seen.add(np.ascontiguousarray(row, np.int32).tobytes())
            else:
                assert (row == -1).all()
    assert seen == heldout  # every held-out window, nothing else


def test_short_asr_run_logs_held_out_eval_loss_and_reports_curves(corpus, tmp_path):
    from moshi_jax.lm import checkpoint as lm_ckpt
    from moshi_jax.lm.model import forward
    from moshi_jax.training import loss as loss_lib
    from moshi_jax.training.train_lm import run

    run_dir = tmp_path / "run"
    cfg = _config(corpus, run_dir)
    report = run(cfg)
    lm_cfg = config_lib.build_lm_config(cfg)
    evals = curves.read_metrics(run_dir / "metrics.jsonl")["eval"]
    assert [r["step"] for r in evals] == [2, 4]
    # the logged eval loss at the last step == the exported model's loss on the held-out batches
    params = lm_ckpt.load_reference(report["export"][0], lm_cfg)
    losses = []
    for batch in make_dataset(cfg.data, lm_cfg, train=False):
        out = forward(params, batch["codes"], lm_cfg)
        losses.append(float(loss_lib.lm_loss(out, batch["codes"], lm_cfg,
                                             text_padding_weight=cfg.loss.text_padding_weight,
                                             first_codebook_weight_multiplier=cfg.loss.first_codebook_weight_multiplier
                                             )[0]))
    assert evals[-1]["loss"] == pytest.approx(np.mean(losses), rel=1e-4)
    # the same model on the TRAIN split gives another number: the eval is not reading training rows
    import dataclasses

    on_train = dataclasses.replace(cfg.data, eval_sources=cfg.data.sources)
    train_losses = [float(loss_lib.lm_loss(forward(params, b["codes"], lm_cfg), b["codes"], lm_cfg,
                                           text_padding_weight=cfg.loss.text_padding_weight)[0])
                    for b in make_dataset(on_train, lm_cfg, train=False)]
    assert abs(np.mean(train_losses) - evals[-1]["loss"]) > 1e-4
    md = (run_dir / "report.md").read_text()
    assert "Held-out eval" in md and "| 4 |" in md
    assert "![loss curves](loss_curves.png)" in md and (run_dir / "loss_curves.png").stat().st_size > 1000
    assert any(p.name.startswith("events") for p in (run_dir / "tensorboard").iterdir())
    jax.clear_caches()
