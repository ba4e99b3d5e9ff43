"""Training the REAL Moshi LM (LMConfig.tiny): sharded step == single-device step from an imported reference
checkpoint, every param's PartitionSpec against a checked-in snapshot, LoRA fine-tuning through `moshi-jax
train`, and export to the reference layout loaded back by the reference package.

Regenerate the snapshot after an intended change of param names / logical axes / rules (and review the diff):
    python tests/training/test_lm_training.py
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from moshi_jax.lm.config import LMConfig
from moshi_jax.training import config as config_lib
from moshi_jax.training import lora as lora_lib
from moshi_jax.training.mesh import LOGICAL_AXIS_RULES, make_mesh, missing_rules, param_partition_specs
from moshi_jax.training.optimizer import make_optimizer, make_schedule
from moshi_jax.training.step import ShardedStep, make_train_step
from moshi_jax.training.train_lm import lm_program, synthetic_codes, to_global
from moshi_jax.training.train_state import build_state_spec, init_from_params

SNAPSHOT = Path(__file__).with_name("sharding_snapshot_tiny.json")
B, T = 8, 8
OVERRIDES = ["data.builtin=random", f"data.seq_frames={T}", f"data.batch_size={B}", "compute_dtype=float32",
             "optimizer.schedule=constant", "optimizer.lr=1e-3", "optimizer.warmup_steps=0"]


def _train_config(*extra: str):
    return config_lib.load_config("tiny", OVERRIDES + list(extra))


@functools.cache
def _reference_state_dict() -> dict[str, np.ndarray]:
    """A randomly initialised reference LMModel (tiny config) as a numpy state dict."""
    import torch
    from moshi.models import loaders

    torch.manual_seed(0)
    ref = loaders.get_moshi_lm(None, lm_kwargs=LMConfig.tiny().to_reference_kwargs(), device="cpu",
                               dtype=torch.float32)
    return {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}


# ----------------------------------------------------------------------------------------------- sharding


def _partition_table() -> dict[str, dict[str, list]]:
    """{param path: {"logical": axes, "mesh": PartitionSpec entries on the (2, 2, 2) mesh}} of the tiny LM's
    train state under LOGICAL_AXIS_RULES (mesh axes that do not divide a dimension are dropped: `fit_spec`)."""
    cfg = _train_config()
    program = lm_program(cfg, config_lib.build_lm_config(cfg))
    spec = build_state_spec(program.task, make_optimizer(cfg.optimizer, cfg.steps), make_mesh((2, 2, 2)),
                            LOGICAL_AXIS_RULES)
    shardings = traverse_util.flatten_dict(spec.state_shardings.params)

    def mesh_entry(e):
        return list(e) if isinstance(e, tuple) else e

    return {"/".join(k): {"logical": list(spec.axes[k]), "mesh": [mesh_entry(e) for e in shardings[k].spec]}
            for k in sorted(spec.axes)}


def test_every_lm_param_partition_spec_matches_the_checked_in_snapshot():
    table = _partition_table()
    snapshot = json.loads(SNAPSHOT.read_text())
    assert sorted(table) == sorted(snapshot), "param set changed: regenerate the snapshot (see module doc)"
    diffs = {k: (snapshot[k], table[k]) for k in table if table[k] != snapshot[k]}
    assert not diffs, f"PartitionSpecs changed (snapshot, now): {diffs}"


def test_rules_cover_every_logical_axis_name_of_the_lm():
    cfg = _train_config()
    program = lm_program(cfg, config_lib.build_lm_config(cfg))
    axes = lora_lib.logical_axes(jax.eval_shape(program.task.init, jax.random.PRNGKey(0)))
    assert missing_rules(axes) == {}
    specs = param_partition_specs(axes)
    assert specs[("text_emb",)] == jax.sharding.PartitionSpec("tensor", "fsdp")
    # On a real mesh the 513-row table cannot be split in 2 along vocab: only embed stays sharded. Every big
    # kernel keeps both its fsdp and tensor sharding.
    table = _partition_table()
    assert table["text_emb"]["mesh"] == [None, "fsdp"]
    assert table["text_linear"]["mesh"] == ["fsdp", "tensor"]
    for name in ("transformer/layers/mlp/linear_in", "transformer/layers/self_attn/in_proj"):
        assert {"fsdp", "tensor"} <= set(table[name]["mesh"]), name


def test_lora_factors_and_their_adam_moments_are_sharded_not_replicated_on_an_fsdp_mesh():
    cfg = _train_config("lora.enabled=true", "lora.rank=8")
    program = lm_program(cfg, config_lib.build_lm_config(cfg))
    spec = build_state_spec(program.task, make_optimizer(cfg.optimizer, cfg.steps), make_mesh((1, 8, 1)),
                            LOGICAL_AXIS_RULES, cfg.lora)
    leaves = jax.tree_util.tree_leaves_with_path(spec.abstract_state.params["lora"])
    assert len(leaves) > 20
    for path, x in leaves:  # a: input axis (embed) on fsdp; b: the rank axis on fsdp (its outputs are tensor-only)
        assert x.sharding.shard_shape(x.shape) != x.shape, jax.tree_util.keystr(path)
    mu = spec.abstract_state.opt_state[1].inner_state[0].mu["lora"]
    for x, y in zip(jax.tree.leaves(mu), jax.tree.leaves(spec.abstract_state.params["lora"]), strict=True):
        assert x.sharding.spec == y.sharding.spec


# ----------------------------------------------------------------------------------------------- step parity


@functools.cache
def _two_steps(mesh_shape: tuple[int, int, int]):
    """Full fine-tuning from the imported reference checkpoint: (state, [metrics] of 2 steps, spec)."""
    from moshi_jax.lm.checkpoint import load_reference

    cfg = _train_config()
    lm_cfg = config_lib.build_lm_config(cfg)
    program = lm_program(cfg, lm_cfg)
    mesh = make_mesh(mesh_shape)
    tx = make_optimizer(cfg.optimizer, cfg.steps)
    spec = build_state_spec(program.task, tx, mesh, LOGICAL_AXIS_RULES)
    state, frozen = init_from_params(spec, load_reference(_reference_state_dict(), lm_cfg), tx, seed=0)
    step = ShardedStep(make_train_step(program.task, spec.partition, tx, make_schedule(cfg.optimizer, cfg.steps)),
                       spec, program.batch_shardings(mesh))
    batch = next(synthetic_codes(lm_cfg, B, T, seed=0))
    metrics = []
    for _ in range(2):  # the same batch twice: the second loss must be lower
        state, m = step(state, to_global(batch, program.batch_shardings(mesh)), frozen)
        metrics.append(jax.device_get(m))
    return state, metrics, spec


def _rel_err(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12))


@pytest.mark.parity
def test_full_finetune_step_on_2x2x2_mesh_equals_single_device_step():
    s8, m8, spec8 = _two_steps((2, 2, 2))
    s1, m1, _ = _two_steps((1, 1, 1))
    for a, b in zip(m8, m1, strict=True):
        for k in ("loss", "text_loss", "audio_loss", "semantic_loss", "acoustic_loss", "grad_norm"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
    assert m8[1]["loss"] < m8[0]["loss"]
    # The params really are sharded over the 8 devices (fsdp on embed, tensor on vocab / mlp / heads).
    w = s8.params["transformer"]["layers"]["mlp"]["linear_in"]
    assert w.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor")
    assert {s.data.shape for s in w.addressable_shards} == {(w.shape[0], w.shape[1] // 2, 2, w.shape[3] // 2)}
    assert spec8.state_shardings.opt_state[1].inner_state[0].mu["transformer"]["layers"]["mlp"]["linear_in"] \
        .spec == w.sharding.spec
    bad = []
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(s8.params), jax.tree.leaves(s1.params), strict=True):
        err = _rel_err(jax.device_get(x), jax.device_get(y))
        if err > 1e-5:
            bad.append((jax.tree_util.keystr(path), err))
    assert not bad, f"updated params differ (path, relative error): {bad}"


# ----------------------------------------------------------------------------------------------- LoRA + export


@pytest.mark.parity
def test_cli_lora_finetune_from_reference_checkpoint_exports_weights_the_reference_loads(tmp_path):
    import torch
    from moshi.models import loaders
    from safetensors.numpy import load_file, save_file

    from moshi_jax.cli import main as cli_main
    from moshi_jax.lm.checkpoint import load_reference
    from moshi_jax.lm.model import forward

    init = tmp_path / "init.safetensors"
    sd = _reference_state_dict()
    save_file(sd, str(init))
    run = tmp_path / "run"
    rc = cli_main(["train", "tiny", *OVERRIDES, f"run_dir={run}", f"init_from={init}", "lora.enabled=true",
                   "lora.rank=4", "optimizer.lr=1e-2", "steps=2", "metrics.progress_bar=false",
                   "metrics.log_every=1", "checkpoint.async_save=false"])
    assert rc == 0
    report = json.loads((run / "report.json").read_text())
    assert report["end_step"] == 2 and report["lora"] and report["trainable_params"] < report["params"] / 4
    assert (run / "checkpoints" / "2").is_dir() and (run / "report.md").is_file()

    exported_path = Path(report["export"][0])
    lm_cfg = LMConfig.tiny()
    ref = loaders.get_moshi_lm(str(exported_path), lm_kwargs=lm_cfg.to_reference_kwargs(), device="cpu",
                               dtype=torch.float32)  # strict load_state_dict: every key and shape must match
    loaded = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    assert set(loaded) == set(sd) and len(load_file(str(exported_path))) > 0
    # LoRA trains the Linear kernels only: embeddings and norms come out exactly as imported.
    for k in ("text_emb.weight", "emb.0.weight", "out_norm.alpha", "depformer_text_emb.weight"):
        np.testing.assert_array_equal(loaded[k], sd[k], err_msg=k)
    linear_keys = [k for k in sd if "gating" in k or "self_attn" in k or k in ("text_linear.weight",)]
    assert linear_keys and all(not np.array_equal(loaded[k], sd[k]) for k in linear_keys)
    codes = next(synthetic_codes(lm_cfg, 2, T, seed=3))["codes"]
    with torch.no_grad():
        out_ref = ref(torch.tensor(codes, dtype=torch.long))
    ours = forward(load_reference(str(exported_path), lm_cfg), codes, lm_cfg)
    mask = np.asarray(ours.text_mask)
    np.testing.assert_array_equal(mask, out_ref.text_mask.numpy())
    np.testing.assert_allclose(np.asarray(ours.text_logits)[mask], out_ref.text_logits.numpy()[mask],
                               rtol=1e-4, atol=1e-4)
    amask = np.asarray(ours.audio_mask)
    np.testing.assert_allclose(np.asarray(ours.audio_logits)[amask], out_ref.logits.numpy()[amask],
                               rtol=1e-4, atol=1e-4)


def test_batch_not_divisible_by_the_batch_shards_is_a_clear_error(tmp_path):
    from moshi_jax.training.train_lm import train_loop

    cfg = _train_config("data.batch_size=6", f"run_dir={tmp_path}")
    with pytest.raises(config_lib.ConfigError, match="not divisible by the 4 batch shards"):
        train_loop(cfg, lm_program(cfg, config_lib.build_lm_config(cfg)), make_mesh((2, 2, 2)), LOGICAL_AXIS_RULES)


if __name__ == "__main__":  # regenerate the snapshot (8 simulated devices, as tests/conftest.py sets up)
    import os

    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # read when jax starts its backend
    os.environ["JAX_PLATFORMS"] = "cpu"
    table = _partition_table()  # one line per param, for readable diffs
    SNAPSHOT.write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in table.items()) + "\n}\n")
    print(f"wrote {SNAPSHOT} ({len(table)} params)", file=sys.stderr)
