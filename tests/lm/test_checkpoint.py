"""Reference LM checkpoints: strict import (file / state dict, bf16 / float32, released / live key names),
export that the reference loads strictly, repository directories, and the 7B layout checked abstractly."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from test_model_parity import (
    MOSHI_SMALL_KWARGS,
    TEST_LM_KWARGS,
    assert_outputs_match,
    build_reference,
    jit_forward,
    random_codes,
    reference_outputs,
)

from moshi_jax.lm import checkpoint as ck
from moshi_jax.lm.config import MOSHI_7B_KWARGS, LMConfig
from moshi_jax.lm.model import LMModel

CONFIGS = {"moshi_small": MOSHI_SMALL_KWARGS, "test_lm": TEST_LM_KWARGS}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    kwargs = CONFIGS[request.param]
    ref = build_reference(kwargs, seed=5)
    return kwargs, LMConfig.from_reference_kwargs(kwargs), ref


def _released_layout(state_dict) -> dict[str, np.ndarray]:
    """A live reference state dict -> the released file layout (stacked per-step attention projections)."""
    src = ck._Source({k: v.numpy() for k, v in state_dict.items()})
    return {k: src.get(k) for k in src.keys()}


@pytest.mark.parity
def test_export_is_loaded_strictly_by_the_reference_and_gives_identical_logits(case, tmp_path):
    kwargs, cfg, ref = case
    params = ck.load_reference(ref.state_dict(), cfg)
    path = tmp_path / "model.safetensors"
    ck.save_reference(params, cfg, path)
    import torch
    from moshi.models import loaders

    # get_moshi_lm loads with load_state_dict(strict=True): any missing / unexpected key would raise.
    ref2 = loaders.get_moshi_lm(path, lm_kwargs=dict(kwargs), dtype=torch.float32)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ref2.state_dict()[k]), k
    codes = random_codes(cfg, B=2, T=7, seed=2)
    out1, out2 = reference_outputs(ref, codes), reference_outputs(ref2, codes)
    for a, b in zip(out1, out2, strict=True):
        np.testing.assert_array_equal(a, b)
    # The exported file uses the released key names (stacked projections), like moshiko's model.safetensors.
    from safetensors import safe_open

    with safe_open(str(path), "numpy") as f:
        keys = set(f.keys())
    assert "transformer.layers.0.self_attn.in_proj_weight" in keys
    assert not any(".in_projs." in k for k in keys)
    assert keys == set(ck.reference_shapes(cfg))


@pytest.mark.parity
def test_import_from_released_layout_file_equals_import_from_live_state_dict(case, tmp_path):
    _, cfg, ref = case
    from safetensors.numpy import save_file

    path = tmp_path / "released.safetensors"
    save_file(_released_layout(ref.state_dict()), str(path))
    a = ck.load_reference(ref.state_dict(), cfg)
    b = ck.load_reference(path, cfg)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)
    codes = random_codes(cfg, B=1, T=6, seed=4)
    assert_outputs_match(reference_outputs(ref, codes), jit_forward(b, jnp.asarray(codes, jnp.int32), cfg))


def test_attention_projection_named_in_proj_dot_weight_imports_as_the_released_name(tmp_path):
    """Checkpoints whose attention input projection was an nn.Linear name it `self_attn.in_proj.weight`; the
    reference's load hook takes that name as `in_proj_weight`, and so does the import."""
    cfg = LMConfig.from_reference_kwargs(TEST_LM_KWARGS)
    released = _released_layout(build_reference(TEST_LM_KWARGS, seed=3).state_dict())
    renamed = {k.replace(".self_attn.in_proj_weight", ".self_attn.in_proj.weight"): v for k, v in released.items()}
    assert sum(".in_proj.weight" in k for k in renamed) == cfg.temporal.num_layers + cfg.depth.num_layers
    a, b = ck.load_reference(released, cfg), ck.load_reference(renamed, cfg)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)


@pytest.mark.parity
def test_bf16_checkpoint_imports_exactly_as_float32_or_bf16_params(tmp_path):
    import torch
    from safetensors.torch import save_file

    cfg = LMConfig.from_reference_kwargs(TEST_LM_KWARGS)
    ref = build_reference(TEST_LM_KWARGS, seed=7)
    sd16 = {k: v.to(torch.bfloat16).contiguous() for k, v in ref.state_dict().items()}
    path = tmp_path / "bf16.safetensors"
    save_file(sd16, str(path))
    p32 = ck.load_reference(path, cfg)  # config default: float32 params
    p16 = ck.load_reference(path, cfg, dtype="bfloat16")
    p_mem = ck.load_reference(sd16, cfg, dtype=jnp.float32)  # in-memory torch bf16 tensors
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p32))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b, np.float32)), p32, p16)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), p32, p_mem)
    want = sd16["text_linear.weight"].float().numpy().T
    np.testing.assert_array_equal(p32["text_linear"], want)
    # Export of bf16 params writes bf16 tensors with the same values.
    out = ck.to_reference_state_dict(p16, cfg)
    assert out["text_linear.weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out["emb.0.weight"].astype(np.float32), sd16["emb.0.weight"].float().numpy())


def _numpy_sd(kwargs, seed=0):
    return {k: v.numpy() for k, v in build_reference(kwargs, seed).state_dict().items()}


@pytest.mark.parity
def test_missing_key_is_an_error_naming_it():
    cfg = LMConfig.from_reference_kwargs(TEST_LM_KWARGS)
    sd = _numpy_sd(TEST_LM_KWARGS)
    del sd["depformer_emb.1.low_rank.weight"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): depformer_emb\.1\.low_rank\.weight"):
        ck.load_reference(sd, cfg)


@pytest.mark.parity
def test_unexpected_key_is_an_error_naming_it():
    cfg = LMConfig.from_reference_kwargs(TEST_LM_KWARGS)
    sd = _numpy_sd(TEST_LM_KWARGS)
    sd["extra_heads.0.weight"] = np.zeros((6, 16), np.float32)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): extra_heads\.0\.weight"):
        ck.load_reference(sd, cfg)


@pytest.mark.parity
def test_misshaped_key_is_an_error_naming_it_and_both_shapes():
    cfg = LMConfig.from_reference_kwargs(TEST_LM_KWARGS)
    sd = _numpy_sd(TEST_LM_KWARGS)
    sd["text_emb.weight"] = sd["text_emb.weight"][:-1]
    with pytest.raises(ValueError, match=r"misshaped keys \(1\): text_emb\.weight: checkpoint \(48, 16\), "
                                         r"expected \(49, 16\)"):
        ck.load_reference(sd, cfg)


@pytest.mark.parity
def test_a_per_step_projection_of_another_width_is_reported_as_misshaped_not_stacked():
    cfg = LMConfig.from_reference_kwargs(TEST_LM_KWARGS)
    sd = _numpy_sd(TEST_LM_KWARGS)
    key = "depformer.layers.0.self_attn.in_projs.1.weight"  # (48, 16): one step of the stacked projection
    sd[key] = sd[key][:, :-1]  # same rows: the stacked row count still adds up to the expected one
    with pytest.raises(ValueError, match=r"misshaped keys \(1\): depformer\.layers\.0\.self_attn\.in_proj_weight"):
        ck.load_reference(sd, cfg)


@pytest.mark.parity
@pytest.mark.parametrize("n", [20, 21])
def test_a_long_list_of_missing_keys_names_twenty_and_gives_the_count(n):
    cfg = LMConfig.from_reference_kwargs(TEST_LM_KWARGS)
    sd = _released_layout(build_reference(TEST_LM_KWARGS, seed=0).state_dict())
    gone = sorted(k for k in sd if k.startswith(("transformer.", "depformer.")))[:n]
    for k in gone:
        del sd[k]
    with pytest.raises(ValueError, match=rf"missing keys \({n}\): ") as e:
        ck.load_reference(sd, cfg)
    listed = str(e.value).split(f"missing keys ({n}): ")[1].split(" | ")[0]
    if n > 20:
        assert listed.endswith(f"; ... ({n} in all)") and listed.count(";") == 20
    else:  # all of them, nothing elided
        assert listed.split("; ") == gone


def test_export_with_a_dtype_casts_every_tensor_to_it():
    cfg = LMConfig.from_reference_kwargs(TEST_LM_KWARGS)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), ck.abstract_params(cfg))
    f32 = ck.to_reference_state_dict(params, cfg)
    b16 = ck.to_reference_state_dict(params, cfg, dtype="bfloat16")
    assert set(b16) == set(f32)
    for k, v in b16.items():
        assert v.dtype == ml_dtypes.bfloat16, k
        np.testing.assert_array_equal(v, f32[k].astype(ml_dtypes.bfloat16))


@pytest.mark.parity
def test_checkpoint_of_another_config_is_rejected_with_all_problems_listed():
    cfg = LMConfig.from_reference_kwargs({**TEST_LM_KWARGS, "num_layers": 1})
    with pytest.raises(ValueError, match=r"unexpected keys \(\d+\): .*; transformer\.layers\.1\."):
        ck.load_reference(_numpy_sd(TEST_LM_KWARGS), cfg)


@pytest.mark.parity
def test_import_places_each_param_with_the_given_logical_sharding():
    import flax.linen as nn
    from jax.sharding import Mesh, NamedSharding

    cfg = LMConfig.from_reference_kwargs(MOSHI_SMALL_KWARGS)
    sd = _numpy_sd(MOSHI_SMALL_KWARGS, seed=3)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))
    rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"))
    boxed = jax.eval_shape(lambda k: LMModel(cfg).init(k, jnp.zeros((1, cfg.num_streams, 2), jnp.int32)),
                           jax.random.PRNGKey(0))["params"]
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), rules)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                             is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    params = ck.load_reference(sd, cfg, shardings=shardings)
    plain = ck.load_reference(sd, cfg)
    in_proj = params["transformer"]["layers"]["self_attn"]["in_proj"]  # [layers, embed, qkv, heads, head_dim]
    assert in_proj.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor", None)
    assert len({s.device for s in in_proj.addressable_shards}) == 8
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, plain)
    with pytest.raises(ValueError, match="shardings tree does not match"):
        ck.load_reference(sd, cfg, shardings={"emb": shardings["emb"]})


def test_missing_checkpoint_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="LM checkpoint not found"):
        ck.load_reference(tmp_path / "nope.safetensors", LMConfig.tiny())


@pytest.mark.parity
def test_load_pretrained_reads_config_json_and_model_file_of_a_repo_dir(tmp_path):
    kwargs = MOSHI_SMALL_KWARGS
    ref = build_reference(kwargs, seed=9)
    conf = {**kwargs, "moshi_name": "lm.safetensors", "mimi_name": "mimi.safetensors", "model_type": "moshi",
            "lm_gen_config": {"temp": 0.6}, "tokenizer_name": "tok.model"}
    (tmp_path / "config.json").write_text(json.dumps(conf))
    from safetensors.numpy import save_file

    save_file(_released_layout(ref.state_dict()), str(tmp_path / "lm.safetensors"))
    info = ck.read_repo(tmp_path)
    assert info.mimi_weights == tmp_path / "mimi.safetensors" and info.lm_gen_config == {"temp": 0.6}
    cfg, params = ck.load_pretrained(tmp_path)
    assert cfg == LMConfig.from_reference_kwargs(kwargs)
    codes = random_codes(cfg, B=1, T=5, seed=1)
    assert_outputs_match(reference_outputs(ref, codes), jit_forward(params, jnp.asarray(codes, jnp.int32), cfg))
    cfg16, p16 = ck.load_pretrained(tmp_path, dtype="bfloat16")
    assert cfg16.dtype == "bfloat16" and p16["text_emb"].dtype == jnp.bfloat16


def test_a_repository_directory_that_does_not_exist_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model repository directory not found: .*nowhere"):
        ck.read_repo(tmp_path / "nowhere")


@pytest.mark.parity
def test_per_step_projections_with_a_step_missing_are_reported_not_stacked():
    # in_projs.1 ... without .0: no complete run of steps to stack, so the stacked name is missing and the parts
    # are unexpected (a part whose neighbours are missing is never stacked into another step's place).
    cfg = LMConfig.from_reference_kwargs(TEST_LM_KWARGS)
    sd = _numpy_sd(TEST_LM_KWARGS)
    del sd["depformer.layers.0.self_attn.in_projs.0.weight"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): depformer\.layers\.0\.self_attn\.in_proj_weight") as e:
        ck.load_reference(sd, cfg)
    assert "unexpected keys" in str(e.value) and "depformer.layers.0.self_attn.in_projs.1.weight" in str(e.value)


# ------------------------------------------------------------------------------------------------- 7B, abstractly


@pytest.fixture(scope="module")
def abstract_7b():
    return ck.abstract_params(LMConfig.moshi_7b())  # ShapeDtypeStructs only: nothing allocated


def test_7b_param_tree_has_the_released_parameter_count_and_maps_onto_the_reference_layout(abstract_7b):
    cfg = LMConfig.moshi_7b()
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_7b))
    assert n == 7_687_729_152
    ck.check_layout(cfg, abstract_7b)  # every leaf covered, every converted slice the right shape
    shapes = ck.reference_shapes(cfg)
    assert len(shapes) == 355 and sum(int(np.prod(s)) for s in shapes.values()) == n
    # Spot checks against the released file (spec section 3.2).
    assert shapes["transformer.layers.31.self_attn.in_proj_weight"] == (12288, 4096)
    assert shapes["transformer.layers.0.gating.linear_in.weight"] == (22528, 4096)
    assert shapes["depformer.layers.5.self_attn.in_proj_weight"] == (24576, 1024)
    assert shapes["depformer.layers.0.self_attn.out_proj.weight"] == (8192, 1024)
    assert shapes["depformer.layers.0.gating.7.linear_out.weight"] == (1024, 2816)
    assert shapes["out_norm.alpha"] == (1, 1, 4096) and shapes["depformer_emb.6.weight"] == (2049, 1024)


LAYOUT_VARIANTS = {
    "moshi_7b": MOSHI_7B_KWARGS,
    "moshi_2b": LMConfig.moshi_2b().to_reference_kwargs(),
    "test_lm": TEST_LM_KWARGS,
    "text_card_out_layer_scale": {**TEST_LM_KWARGS, "text_card_out": 40, "layer_scale": 0.1,
                                  "depformer_layer_scale": 0.2},
    "shared_depformer_weights": {**MOSHI_SMALL_KWARGS, "depformer_multi_linear": False,
                                 "depformer_weights_per_step": False},
    "layer_norm_f32_silu": {**TEST_LM_KWARGS, "norm": "layer_norm_f32", "gating": "silu"},
}


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(LAYOUT_VARIANTS))
def test_key_list_and_shapes_equal_the_reference_model_built_on_the_meta_device(name):
    import torch
    from moshi.models.lm import LMModel as RefLM

    kwargs = LAYOUT_VARIANTS[name]
    cfg = LMConfig.from_reference_kwargs(kwargs)
    ref = RefLM(device="meta", dtype=torch.bfloat16, **kwargs)  # no memory allocated (7B included)
    src = ck._Source(ref.state_dict())
    got = {k: src.shape(k) for k in src.keys()}
    assert got == ck.reference_shapes(cfg)
    if name != "moshi_7b":  # 7B: see the eval_shape test above
        ck.check_layout(cfg)


@pytest.mark.parity
def test_depformer_with_shared_weights_and_one_input_projection_equals_reference():
    kwargs = LAYOUT_VARIANTS["shared_depformer_weights"]
    cfg = LMConfig.from_reference_kwargs(kwargs)
    assert cfg.depth.weights_per_step == 0 and cfg.num_depformer_in == 1
    ref = build_reference(kwargs, seed=11)
    params = ck.load_reference(ref.state_dict(), cfg)
    codes = random_codes(cfg, B=2, T=4, seed=5)
    assert_outputs_match(reference_outputs(ref, codes), jit_forward(params, jnp.asarray(codes, jnp.int32), cfg))


def test_2b_and_bench_presets_map_onto_their_reference_layouts():
    for cfg, count in ((LMConfig.moshi_2b(), 3_729_761_280), (LMConfig.bench_111m(), 111_627_264)):
        abstract = ck.abstract_params(cfg)
        assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract)) == count
        ck.check_layout(cfg, abstract)


def test_layout_check_refuses_a_param_tree_the_key_table_does_not_cover():
    """`check_layout` guards the port's own key table: a param tree of another shape (here: one more temporal
    layer than the table's config) is reported, not silently half-mapped."""
    cfg = LMConfig.from_reference_kwargs(TEST_LM_KWARGS)
    ck.check_layout(cfg)  # the config's own tree: covered
    other = ck.abstract_params(LMConfig.from_reference_kwargs({**TEST_LM_KWARGS, "num_layers": 3}))
    with pytest.raises(ValueError, match="reference layout does not match the JAX params"):
        ck.check_layout(cfg, other)


def test_layout_check_refuses_a_key_whose_export_conversion_does_not_give_back_the_reference_shape(monkeypatch):
    """Both directions of every conversion are checked: an entry that imports to the right slice but exports to
    another shape (here: flattened) is reported."""
    cfg = LMConfig.from_reference_kwargs(TEST_LM_KWARGS)
    table = ck.reference_layout(cfg)
    i = next(i for i, e in enumerate(table) if len(e.ref_shape) == 2)
    bad = list(table)
    bad[i] = dataclasses.replace(table[i], to_ref=lambda a: a.reshape(-1))
    monkeypatch.setattr(ck, "reference_layout", lambda _cfg: bad)
    with pytest.raises(ValueError, match=re.escape(table[i].key)):
        ck.check_layout(cfg)


@pytest.mark.parity
def test_a_misshaped_key_of_a_torch_state_dict_names_both_shapes_as_tuples():
    cfg = LMConfig.from_reference_kwargs(TEST_LM_KWARGS)
    sd = build_reference(TEST_LM_KWARGS, seed=0).state_dict()
    sd["text_emb.weight"] = sd["text_emb.weight"][:-1]
    with pytest.raises(ValueError, match=r"text_emb\.weight: checkpoint \(48, 16\), expected \(49, 16\)"):
        ck.load_reference(sd, cfg)


@pytest.mark.parity
def test_exporting_params_that_lack_a_tensor_names_it():
    cfg = LMConfig.from_reference_kwargs(TEST_LM_KWARGS)
    params = ck.load_reference(_numpy_sd(TEST_LM_KWARGS), cfg)
    del params["text_emb"]
    with pytest.raises(ValueError, match=r"params have no text_emb \(needed for text_emb\.weight\)"):
        ck.to_reference_state_dict(params, cfg)


def test_a_hibiki_repository_embeds_eos_like_pad_and_a_moshi_one_keeps_its_eos(tmp_path):
    """The reference's get_moshi gives Hibiki's EOS (2) the PAD (3) text embedding, so an early EOS is ignored."""
    from safetensors.numpy import save_file

    kwargs = TEST_LM_KWARGS
    released = _released_layout(build_reference(kwargs, seed=4).state_dict())
    for model_type in ("hibiki", "moshi"):
        repo = tmp_path / model_type
        repo.mkdir()
        (repo / "config.json").write_text(json.dumps({**kwargs, "moshi_name": "lm.safetensors",
                                                      "model_type": model_type}))
        save_file(released, str(repo / "lm.safetensors"))
        _, params = ck.load_pretrained(repo)
        emb = np.asarray(params["text_emb"])
        np.testing.assert_array_equal(emb[3], released["text_emb.weight"][3])  # PAD as stored
        if model_type == "hibiki":
            np.testing.assert_array_equal(emb[2], emb[3])
            np.testing.assert_array_equal(np.delete(emb, 2, 0), np.delete(released["text_emb.weight"], 2, 0))
        else:
            np.testing.assert_array_equal(emb, released["text_emb.weight"])
