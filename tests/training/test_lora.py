"""LoRA as a param-tree transform: targets, reference LoRALinear math, B=0 identity, frozen base, export."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from toy_lm_for_training import RULES, ToyLM, batch_sharding, make_mesh, random_batch, toy_config, toy_task

from moshi_jax.training import lora as lora_lib
from moshi_jax.training.config import LoraConfig, OptimizerConfig
from moshi_jax.training.optimizer import make_optimizer, make_schedule
from moshi_jax.training.step import ShardedStep, make_train_step
from moshi_jax.training.train_state import build_state_spec, export_params, init_train_state

OPT = OptimizerConfig(lr=1e-2, schedule="constant")
LORA = LoraConfig(enabled=True, rank=4, scaling=2.0)


def _abstract():
    boxed = jax.eval_shape(toy_task().init, jax.random.PRNGKey(0))
    return nn.unbox(boxed), lora_lib.logical_axes(boxed)


def test_targets_are_every_linear_kernel_not_norms_or_embeddings():
    params, axes = _abstract()
    layouts = lora_lib.lora_layouts(params, axes)
    names = {"/".join(k) for k in layouts}
    assert names == {"transformer/layers/self_attn/in_proj", "transformer/layers/self_attn/out_proj",
                     "transformer/layers/mlp/linear_in", "transformer/layers/mlp/linear_out", "text_linear"}
    out_proj = layouts[("transformer", "layers", "self_attn", "out_proj")]
    assert (out_proj.lead, out_proj.in_shape, out_proj.out_shape) == ((2,), (2, 8), (16,))
    in_proj = layouts[("transformer", "layers", "self_attn", "in_proj")]
    assert (in_proj.lead, in_proj.in_shape, in_proj.out_shape) == ((2,), (16,), (3, 2, 8))
    lora = jax.jit(lambda k: lora_lib.init_lora(k, layouts, rank=4))(jax.random.PRNGKey(0))
    a = lora["transformer"]["layers"]["self_attn"]["out_proj"]["a"]
    b = lora["transformer"]["layers"]["self_attn"]["out_proj"]["b"]
    assert a.shape == (2, 2, 8, 4) and b.shape == (2, 4, 16) and not np.any(np.asarray(b))
    bound = 1 / np.sqrt(16)  # kaiming_uniform(a=sqrt(5)) on lora_A: U(+-1/sqrt(in_features))
    assert np.abs(np.asarray(a)).max() <= bound and np.abs(np.asarray(a)).max() > 0.8 * bound


@pytest.mark.parity
def test_merged_kernel_equals_reference_lora_linear():
    import torch
    from moshi.modules.lora import LoRALinear, replace_lora_with_linear

    torch.manual_seed(0)
    lay = lora_lib.LoraLayout(shape=(2, 8, 16), axes=("heads", "head_dim", "embed"), n_lead=0, n_in=2)
    rng = np.random.default_rng(0)
    w = rng.normal(size=lay.shape).astype(np.float32)
    a = rng.normal(size=(2, 8, 3)).astype(np.float32)
    b = rng.normal(size=(3, 16)).astype(np.float32)
    merged = lora_lib.merge({"w": jnp.asarray(w)}, {"w": {"a": a, "b": b}}, {("w",): lay}, scaling=2.0)["w"]

    ref = LoRALinear(16, 16, rank=3, scaling=2.0, dtype=torch.float32)
    with torch.no_grad():
        ref.frozen_W.weight.copy_(torch.tensor(w.reshape(16, 16).T))
        ref.lora_A.weight.copy_(torch.tensor(a.reshape(16, 3).T))
        ref.lora_B.weight.copy_(torch.tensor(b.T))
        x = rng.normal(size=(5, 16)).astype(np.float32)
        y_ref = ref(torch.tensor(x)).numpy()
        holder = torch.nn.Sequential(ref)
        replace_lora_with_linear(holder)
        w_ref_merged = holder[0].weight.numpy()
    y = x @ np.asarray(merged).reshape(16, 16)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(merged).reshape(16, 16), w_ref_merged.T, rtol=1e-6, atol=1e-6)


def _lora_setup(lora=LORA):
    task, tx = toy_task(), make_optimizer(OPT, 10)
    mesh = make_mesh((2, 2, 2))
    spec = build_state_spec(task, tx, mesh, RULES, lora)
    state, frozen = init_train_state(spec, task, tx, seed=0)
    return task, tx, mesh, spec, state, frozen


def test_lora_training_changes_only_lora_params_and_export_equals_on_the_fly_model():
    task, tx, mesh, spec, state, frozen = _lora_setup()
    model = ToyLM(toy_config())
    tokens = random_batch(5)["tokens"]

    apply = jax.jit(lambda params: model.apply({"params": params}, tokens))
    combine = jax.jit(spec.partition.combine)

    def logits(params):
        return np.asarray(apply(params))

    base0 = combine({"lora": jax.tree.map(jnp.zeros_like, state.params["lora"]), "base": {}}, frozen)
    # B = 0 at init: the LoRA model is exactly the base model.
    np.testing.assert_array_equal(logits(combine(state.params, frozen)), logits(base0))
    assert set(state.params) == {"lora", "base"} and state.params["base"] == {}
    frozen_before = jax.device_get(frozen)

    fn = make_train_step(task, spec.partition, tx, make_schedule(OPT, 10))
    step = ShardedStep(fn, spec, batch_sharding(mesh))
    b = jax.device_put(random_batch(0), batch_sharding(mesh))
    losses = []
    for _ in range(3):
        state, m = step(state, b, frozen)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    # The frozen base is untouched; every B left zero.
    for x, y in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)
    for path, leaf in traverse_util.flatten_dict(jax.device_get(state.params["lora"])).items():
        if path[-1] == "b":
            assert np.abs(leaf).max() > 0, path
    # Export (merged float32 params) through the plain model equals the on-the-fly LoRA forward.
    exported = export_params(spec, state, frozen)
    assert jax.tree.structure(exported) == jax.tree.structure(base0)
    np.testing.assert_allclose(logits(exported), logits(combine(state.params, frozen)),
                               rtol=1e-6, atol=1e-6)
    assert np.abs(logits(exported) - logits(base0)).max() > 1e-3


def test_gradient_reaches_only_trainable_tree_and_embeddings_with_train_embeddings():
    task, tx = toy_task(), make_optimizer(OPT, 10)
    spec = build_state_spec(task, tx, make_mesh((1, 1, 1)), RULES, LoraConfig(enabled=True, rank=2,
                                                                              train_embeddings=True))
    assert set(traverse_util.flatten_dict(spec.abstract_state.params["base"])) == {("text_emb",)}
    assert ("text_emb",) not in traverse_util.flatten_dict(spec.abstract_frozen)
    assert ("text_linear",) in traverse_util.flatten_dict(spec.abstract_frozen)
    # The optimizer state only covers the trainable tree (LoRA factors + embeddings).
    n_train = sum(x.size for x in jax.tree.leaves(spec.abstract_state.params))
    mu = spec.abstract_state.opt_state[1].inner_state[0].mu
    assert sum(x.size for x in jax.tree.leaves(mu)) == n_train
    assert n_train == lora_lib.lora_param_count(spec.partition.layouts, 2) + 32 * 16
