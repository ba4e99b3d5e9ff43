"""Reference checkpoint import / export: strict key checking, codebook formula, round trips, and an exported
file that the reference `MimiModel.load_state_dict` accepts and runs identically."""

import jax
import numpy as np
import pytest
from mimi_reference import build_reference, rel_err, state_dict_numpy

from moshi_jax.mimi import checkpoint as mimi_ckpt
from moshi_jax.mimi.config import MimiConfig
from moshi_jax.mimi.model import MimiCodec

CFG = MimiConfig.tiny()


@pytest.fixture(scope="module")
def params():
    return MimiCodec(CFG).init(jax.random.PRNGKey(0))


@pytest.fixture
def state_dict(params):
    return mimi_ckpt.to_reference_state_dict(params, CFG)


def _same(a, b) -> bool:
    return jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b))


def test_export_then_import_gives_back_the_same_params(params, state_dict, tmp_path):
    assert _same(mimi_ckpt.load_reference(state_dict, CFG), params)
    path = mimi_ckpt.save_reference(params, CFG, tmp_path / "mimi.safetensors")
    assert _same(mimi_ckpt.load_reference(path, CFG), params)
    assert _same(mimi_ckpt.load_reference(str(path), CFG), params)


def test_missing_unexpected_and_misshaped_keys_are_named(state_dict):
    sd = dict(state_dict)
    del sd["encoder.model.3.conv.conv.bias"]
    del sd["quantizer.rvq_rest.vq.layers.30._codebook.embedding_sum"]
    sd["decoder.model.99.conv.conv.weight"] = np.zeros((1,), np.float32)
    sd["upsample.convtr.convtr.convtr.weight"] = np.zeros((16, 2, 4), np.float32)
    with pytest.raises(ValueError) as err:
        mimi_ckpt.load_reference(sd, CFG)
    msg = str(err.value)
    missing = "encoder.model.3.conv.conv.bias, quantizer.rvq_rest.vq.layers.30._codebook.embedding_sum"
    assert f"missing keys: {missing}" in msg
    assert "unexpected keys: decoder.model.99.conv.conv.weight" in msg
    assert "wrongly shaped keys: upsample.convtr.convtr.convtr.weight (16, 2, 4) (expected (16, 1, 4))" in msg


def test_a_checkpoint_of_another_config_is_rejected(state_dict):
    with pytest.raises(ValueError, match="wrongly shaped keys: encoder.model.0.conv.conv.weight"):
        mimi_ckpt.load_reference(state_dict, MimiConfig.tiny(n_filters=8))


def test_unreadable_or_missing_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        mimi_ckpt.load_reference(bad, CFG)
    with pytest.raises(ValueError, match="checkpoint file not found"):
        mimi_ckpt.load_reference(tmp_path / "nope.safetensors", CFG)


def test_codebook_is_embedding_sum_over_clamped_cluster_usage(state_dict):
    sd = dict(state_dict)
    prefix = "quantizer.rvq_rest.vq.layers.2._codebook"
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((CFG.bins, CFG.codebook_dim)).astype(np.float32)
    usage = rng.uniform(0.5, 3.0, CFG.bins).astype(np.float32)
    usage[:3] = [0.0, 1e-7, 2e-5]  # the first two are clamped to 1e-5
    sd[f"{prefix}.embedding_sum"], sd[f"{prefix}.cluster_usage"] = emb, usage
    got = np.asarray(mimi_ckpt.load_reference(sd, CFG)["quantizer"]["acoustic"]["codebook_2"])
    np.testing.assert_allclose(got, emb / np.maximum(usage, 1e-5)[:, None], rtol=1e-6)
    np.testing.assert_allclose(got[0], emb[0] / 1e-5, rtol=1e-6)


def test_reference_module_key_names_and_older_buffer_names_are_accepted(params, state_dict):
    # `MimiModel.state_dict()` names the attention weights `in_projs.0` / `out_projs.0` (the released file:
    # `in_proj_weight` / `out_proj.weight`); older files name codebook buffers `embed_sum` / `cluster_size` /
    # `inited`. The reference's load hooks accept all of them, so does the import.
    sd = {}
    for k, v in state_dict.items():
        k = k.replace("self_attn.in_proj_weight", "self_attn.in_projs.0.weight")
        k = k.replace("self_attn.out_proj.weight", "self_attn.out_projs.0.weight")
        k = k.replace("_codebook.embedding_sum", "_codebook.embed_sum").replace("_codebook.cluster_usage",
                                                                                 "_codebook.cluster_size")
        sd[k.replace("_codebook._initialized", "_codebook.inited")] = v
    assert _same(mimi_ckpt.load_reference(sd, CFG), params)


@pytest.mark.parity
def test_exported_file_loads_strictly_in_the_reference_and_gives_the_same_outputs(tmp_path):
    import torch
    from moshi.models import loaders

    ref = build_reference(CFG)  # random reference -> ours -> file -> a fresh reference
    params = mimi_ckpt.load_reference(state_dict_numpy(ref), CFG)
    path = mimi_ckpt.save_reference(params, CFG, tmp_path / "export.safetensors")
    torch.set_num_threads(1)
    reloaded = loaders.get_mimi(str(path), mimi_config=mimi_ckpt.reference_config(CFG))  # strict load_state_dict
    codec = MimiCodec(CFG)
    wav = (0.3 * np.random.default_rng(0).standard_normal((2, 1, 3 * 1920))).astype(np.float32)
    with torch.no_grad():
        latent = reloaded.encode_to_latent(torch.from_numpy(wav), quantize=False).numpy()
        codes = reloaded.encode(torch.from_numpy(wav)).numpy()
        audio = reloaded.decode(torch.from_numpy(codes)).numpy()
        original = ref.decode(torch.from_numpy(codes)).numpy()
    assert rel_err(codec.encode_to_latent(params, wav), latent) <= 1e-5
    assert rel_err(codec.decode(params, codes), audio) <= 1e-5
    assert rel_err(audio, original) <= 1e-6  # the round trip through our params lost nothing


@pytest.mark.parity
@pytest.mark.slow
def test_released_config_export_matches_the_reference_key_layout():
    import torch
    from moshi.models import loaders

    cfg = MimiConfig()
    ref = loaders.get_mimi(None)
    exported = mimi_ckpt.to_reference_state_dict(MimiCodec(cfg).init(jax.random.PRNGKey(0)), cfg)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    sizes = sum(v.size for v in exported.values())
    assert sizes == 96_151_393  # the released checkpoint's parameter + buffer count
