"""`moshi-jax export` of a tiny LoRA run (from a reference checkpoint) and LoRA adapter interchange with the reference:
the `--lora-only` adapter runs in the reference loaders (the server's code path) with our merged model's logits,
the merged export of step N is the params restored from step N, `--best` picks the best evaluated kept checkpoint,
and a moshi-finetune-style adapter made by the reference's LoRA modules imports and continues training."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from moshi_jax.cli import main
from moshi_jax.lm import checkpoint as lm_ckpt
from moshi_jax.lm.config import LMConfig
from moshi_jax.lm.model import forward
from moshi_jax.training import config as config_lib
from moshi_jax.training.train_lm import synthetic_codes

RANK, SCALING = 4, 2.0
OVERRIDES = ["data.builtin=random", "data.seq_frames=8", "data.batch_size=8", "compute_dtype=float32",
             "optimizer.schedule=constant", "optimizer.lr=1e-2", "optimizer.warmup_steps=0",
             "metrics.progress_bar=false", "metrics.log_every=1", "checkpoint.async_save=false",
             "metrics.tensorboard=false"]


def _reference_lm(lora: bool):
    import torch
    from moshi.models import loaders

    kw = LMConfig.tiny().to_reference_kwargs()
    if lora:
        kw.update(lora=True, lora_rank=RANK, lora_scaling=SCALING)
    torch.manual_seed(0)
    return loaders.get_moshi_lm(None, lm_kwargs=kw, device="cpu", dtype=torch.float32)


@functools.cache
def _base_state_dict() -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in _reference_lm(False).state_dict().items()}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """4 steps of LoRA (+ embeddings) fine-tuning of the tiny LM from a reference checkpoint; checkpoints at 2 and 4
    (and 1: Orbax saves the first step too), none at 3."""
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("export")
    save_file(_base_state_dict(), str(d / "base.safetensors"))
    run = d / "run"
    assert main(["train", "tiny", *OVERRIDES, f"run_dir={run}", f"init_from={d / 'base.safetensors'}", "steps=4",
                 "lora.enabled=true", f"lora.rank={RANK}", f"lora.scaling={SCALING}", "lora.train_embeddings=true",
                 "checkpoint.every=2", "checkpoint.keep=3"]) == 0
    assert {2, 4} <= {int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()}
    return d, run


def _codes():
    return np.asarray(next(synthetic_codes(LMConfig.tiny(), 2, 8, seed=3))["codes"])


def _rel_err(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def _assert_same_logits(ours, ref, tol=1e-5):
    tmask = np.asarray(ours.text_mask)
    np.testing.assert_array_equal(tmask, ref.text_mask.numpy())
    amask = np.asarray(ours.audio_mask)
    assert _rel_err(np.asarray(ours.text_logits)[tmask], ref.text_logits.numpy()[tmask]) <= tol
    assert _rel_err(np.asarray(ours.audio_logits)[amask], ref.logits.numpy()[amask]) <= tol


@functools.cache
def _resume_setup(run: Path):
    """The run's state spec and frozen base, built the way the training loop does on resume."""
    from moshi_jax.training import loop
    from moshi_jax.training.mesh import make_mesh
    from moshi_jax.training.optimizer import make_optimizer
    from moshi_jax.training.train_lm import lm_program
    from moshi_jax.training.train_state import build_state_spec

    cfg = config_lib.from_json((run / "config.json").read_text())
    program = lm_program(cfg, config_lib.build_lm_config(cfg))
    tx = make_optimizer(cfg.optimizer, cfg.steps)
    spec = build_state_spec(program.task, tx, make_mesh((1, jax.device_count(), 1)), loop.axis_rules(cfg), cfg.lora)
    return spec, loop._initial_state(cfg, program, spec, tx)[1]


@functools.cache
def _restored_model_params(run: Path, step: int):
    """Merged params of `step` as the loop would export them after resuming there (full TrainState restore)."""
    from moshi_jax.training.checkpointing import Checkpointer
    from moshi_jax.training.train_state import export_params

    spec, frozen = _resume_setup(run)
    with Checkpointer(run / "checkpoints") as ckpt:
        state = ckpt.restore(step, spec.abstract_state)
    return jax.device_get(export_params(spec, state, frozen))


# ----------------------------------------------------------------------------------------------- export


def test_merged_export_of_step_n_equals_the_params_restored_from_step_n(lora_run, tmp_path):
    _, run = lora_run
    assert main(["export", str(run), "--step", "2", "-o", str(tmp_path / "s2"), "--no-progress"]) == 0
    lm_cfg = LMConfig.tiny()
    exported = lm_ckpt.load_reference(tmp_path / "s2" / "model.safetensors", lm_cfg)
    want = _restored_model_params(run, 2)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(exported), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    conf = json.loads((tmp_path / "s2" / "config.json").read_text())
    assert LMConfig.from_reference_kwargs(conf) == lm_cfg and conf["moshi_name"] == "model.safetensors"
    assert "lora" not in conf
    later = _restored_model_params(run, 4)  # the latest step differs
    assert not np.array_equal(np.asarray(later["text_linear"]), np.asarray(want["text_linear"]))


@pytest.mark.parity
def test_lora_only_export_in_the_reference_loaders_gives_our_merged_logits(lora_run, tmp_path):
    """The reference server's path: CheckpointInfo(config_path=config.json, lora_weights=lora.safetensors) over the
    base weights -> get_moshi (LoRALinear modules, unfused and fused)."""
    import torch
    from moshi.models import loaders

    d, run = lora_run
    out = tmp_path / "adapter"
    assert main(["export", str(run), "--lora-only", "-o", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "lora.safetensors"]
    conf = json.loads((out / "config.json").read_text())
    assert (conf["lora"], conf["lora_rank"], conf["lora_scaling"]) == (True, RANK, SCALING)
    from safetensors.numpy import load_file

    adapter = load_file(str(out / "lora.safetensors"))
    assert "text_emb.weight" in adapter and "transformer.layers.0.self_attn.in_projs.0.lora_A.weight" in adapter
    assert not any("frozen_W" in k for k in adapter)

    codes = _codes()
    ours = forward(_restored_model_params(run, 4), codes, LMConfig.tiny())
    for fuse in (False, True):
        info = loaders.CheckpointInfo.from_hf_repo(
            "unused/not-downloaded", moshi_weights=str(d / "base.safetensors"), mimi_weights=str(d / "none"),
            tokenizer=str(d / "none"), config_path=str(out / "config.json"), lora_weights=str(out / "lora.safetensors"))
        ref = info.get_moshi(device="cpu", dtype=torch.float32, fuse_lora=fuse)
        assert fuse or any(type(m).__name__ == "LoRALinear" for m in ref.modules())
        with torch.no_grad():
            _assert_same_logits(ours, ref(torch.tensor(codes, dtype=torch.long)))


def test_best_exports_the_kept_checkpoint_with_the_lowest_eval_loss(lora_run, tmp_path, caplog):
    _, src = lora_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    saved = json.loads((run / "config.json").read_text())
    saved["checkpoint"]["dir"] = ""  # the copy's own checkpoints/
    (run / "config.json").write_text(json.dumps(saved))
    assert main(["export", str(run), "--best", "-o", str(tmp_path / "x")]) == 2
    assert "no eval loss" in caplog.text
    with open(run / "metrics.jsonl", "a") as f:
        for step, loss in ((1, 7.0), (2, 5.0), (3, 3.0), (4, 6.0)):  # step 3 has no checkpoint
            f.write(json.dumps({"prefix": "eval", "step": step, "loss": loss}) + "\n")
    assert main(["export", str(run), "--best", "--lora-only", "--dtype", "bfloat16", "-o", str(tmp_path / "best"),
                 "--no-progress"]) == 0
    assert "exported step 2" in caplog.text and "step 3 (3.0000)" in caplog.text
    assert main(["export", str(run), "--step", "2", "--lora-only", "-o", str(tmp_path / "s2"), "--no-progress"]) == 0
    from safetensors.numpy import load_file

    best = load_file(str(tmp_path / "best" / "lora.safetensors"))
    s2 = load_file(str(tmp_path / "s2" / "lora.safetensors"))
    assert set(best) == set(s2)
    for k, v in s2.items():  # bfloat16: the float32 export rounded
        assert best[k].dtype.name == "bfloat16" and v.dtype == np.float32
        np.testing.assert_array_equal(best[k], v.astype(best[k].dtype))


@pytest.mark.parametrize("edit, argv, words", [
    (None, ["--step", "3"], "no checkpoint of step 3"),
    ({"lora": {"enabled": False, "rank": RANK, "scaling": SCALING, "train_embeddings": True}}, ["--lora-only"],
     "full fine-tuning run"),
    ({"program": "speech_to_cheese"}, [], "no exporter for program kind 'speech_to_cheese'"),
])
def test_export_errors_are_one_line_and_exit_2(lora_run, tmp_path, caplog, edit, argv, words):
    _, src = lora_run
    run = tmp_path / "run"
    run.mkdir()
    saved = json.loads((src / "config.json").read_text())
    saved.update(edit or {})
    saved["checkpoint"]["dir"] = str(src / "checkpoints")
    (run / "config.json").write_text(json.dumps(saved))
    assert main(["export", str(run), *argv, "-o", str(tmp_path / "x")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and words in errors[0], errors


def test_metrics_jsonl_records_every_train_step(lora_run):
    _, run = lora_run
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["prefix"] == "train"] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in recs)


# ----------------------------------------------------------------------------------------------- import


@pytest.fixture(scope="module")
def reference_adapter(tmp_path_factory):
    """A moshi-finetune-style adapter made with the reference's LoRA modules (`lora=True` in get_moshi_lm):
    trained-looking lora_A / lora_B on every Linear and, as `ft_embed`, changed embedding tables; saved as
    moshi-finetune does (the modules whose params all train) with its config.json. Returns (dir, reference
    LoRA model)."""
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("adapter")
    ref = _reference_lm(True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "emb" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    sd = ref.state_dict()
    adapter = {k: v.contiguous() for k, v in sd.items() if "lora_" in k or ("emb" in k and "frozen" not in k)}
    save_file(adapter, str(d / "lora.safetensors"))
    base = {k.replace(".frozen_W", ""): v.contiguous() for k, v in _reference_lm(True).state_dict().items()
            if "lora_" not in k}
    save_file(base, str(d / "base.safetensors"))
    conf = dict(LMConfig.tiny().to_reference_kwargs(), lora=True, lora_rank=RANK, lora_scaling=SCALING)
    (d / "config.json").write_text(json.dumps(conf))
    return d, ref


def _import_config(d: Path, *extra: str):
    return config_lib.load_config("tiny", OVERRIDES + [
        f"init_from={d / 'base.safetensors'}", f"init_lora_from={d / 'lora.safetensors'}", "lora.enabled=true",
        f"lora.rank={RANK}", f"lora.scaling={SCALING}", *extra])


@pytest.mark.parity
def test_reference_adapter_imports_to_the_reference_lora_model(reference_adapter):
    import torch

    from moshi_jax.training import lora as lora_lib
    from moshi_jax.training.train_lm import lm_program
    from moshi_jax.training.train_state import make_partition

    d, ref = reference_adapter
    cfg = _import_config(d, "lora.train_embeddings=true")
    lm_cfg = config_lib.build_lm_config(cfg)
    program = lm_program(cfg, lm_cfg)
    boxed = jax.eval_shape(program.task.init, jax.random.PRNGKey(0))
    from flax import linen as nn

    partition = make_partition(cfg.lora, nn.unbox(boxed), lora_lib.logical_axes(boxed))
    params = lora_lib.merge(program.init_params(), program.init_lora(partition), partition.layouts, SCALING)
    codes = _codes()
    with torch.no_grad():
        _assert_same_logits(forward(params, codes, lm_cfg), ref(torch.tensor(codes, dtype=torch.long)))


def test_reference_adapter_continues_training_and_exports_back(reference_adapter, tmp_path):
    from safetensors.numpy import load_file

    d, _ = reference_adapter
    run = tmp_path / "run"
    assert main(["train", "tiny", *OVERRIDES, f"run_dir={run}", f"init_from={d / 'base.safetensors'}",
                 f"init_lora_from={d / 'lora.safetensors'}", "lora.enabled=true", f"lora.rank={RANK}",
                 f"lora.scaling={SCALING}", "lora.train_embeddings=true", "optimizer.lr=1e-3", "steps=2"]) == 0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(np.isfinite(r["loss"]) for r in recs)
    assert main(["export", str(run), "--lora-only", "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    before, after = load_file(str(d / "lora.safetensors")), load_file(str(tmp_path / "out" / "lora.safetensors"))
    assert set(after) == set(before)
    # Two AdamW steps of lr 1e-3 from the imported adapter: every tensor moved, by about the step size (a fresh
    # start would have lora_B = 0, ~0.05 away).
    for k in before:
        diff = np.abs(after[k] - before[k]).max()
        assert 0 < diff < 0.01, (k, diff)


@pytest.mark.parametrize("extra, words", [
    (["lora.rank=8"], "has rank 4; set lora.rank=4"),
    (["lora.scaling=1.0"], "lora_scaling 2 (its config.json); set lora.scaling=2"),
])
def test_adapter_with_other_lora_settings_is_a_clear_error(reference_adapter, tmp_path, caplog, extra, words):
    d, _ = reference_adapter
    argv = ["train", "tiny", *OVERRIDES, f"run_dir={tmp_path}", f"init_from={d / 'base.safetensors'}",
            f"init_lora_from={d / 'lora.safetensors'}", "lora.enabled=true", f"lora.rank={RANK}",
            f"lora.scaling={SCALING}", "steps=1", *extra]
    assert main(argv) == 2
    assert words in caplog.text


def test_init_lora_from_without_lora_or_base_is_a_config_error():
    from moshi_jax.training.train_lm import lm_program

    for extra in (["init_from=x"], ["lora.enabled=true"]):
        cfg = config_lib.load_config("tiny", OVERRIDES + ["init_lora_from=y", *extra])
        with pytest.raises(config_lib.ConfigError, match="init_lora_from needs lora.enabled=true"):
            lm_program(cfg, config_lib.build_lm_config(cfg))
