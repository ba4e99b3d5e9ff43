"""Mesh construction over the available devices, batch shardings, and logical-axis rules coverage."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, PartitionSpec

from moshi_jax.nn.transformer import Transformer, TransformerConfig
from moshi_jax.training import lora as lora_lib
from moshi_jax.training.mesh import (
    LOGICAL_AXIS_RULES,
    batch_divisor,
    batch_sharding,
    make_mesh,
    missing_rules,
    param_partition_specs,
)


def test_make_mesh_fills_minus_one_from_the_available_devices_with_auto_axes():
    n = jax.device_count()
    mesh = make_mesh((1, -1, 1))
    assert dict(mesh.shape) == {"data": 1, "fsdp": n, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    small = make_mesh((1, 1, 1))
    assert small.size == 1 and small.devices.flat[0] == jax.devices()[0]
    if n % 2 == 0:
        assert dict(make_mesh((2, -1, 1)).shape)["fsdp"] == n // 2


@pytest.mark.parametrize("shape,message", [
    ((1, 2), "3 sizes"),
    ((1, -1, -1), "at most one -1"),
    ((1, 0, 1), "positive"),
])
def test_bad_mesh_shapes_are_clear_errors(shape, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(shape)


def test_mesh_larger_than_the_device_count_is_a_clear_error():
    n = jax.device_count()
    with pytest.raises(ValueError, match=f"needs {2 * n} devices, only {n} available"):
        make_mesh((2, n, 1))


def test_batch_sharding_splits_the_leading_axis_over_data_and_fsdp():
    mesh = make_mesh((1, -1, 1))
    sh = batch_sharding(mesh, 3)
    assert sh.spec == PartitionSpec(("data", "fsdp"), None, None)
    assert batch_divisor(mesh) == jax.device_count()
    x = jax.device_put(jnp.zeros((2 * jax.device_count(), 3, 5)), sh)
    assert {s.data.shape for s in x.addressable_shards} == {(2, 3, 5)}
    with pytest.raises(ValueError, match="at least 1 dimension"):
        batch_sharding(mesh, 0)


def _transformer_axes(weights_per_step: int):
    cfg = TransformerConfig(d_model=16, num_heads=2, num_layers=2, dim_feedforward=64, norm="rms_norm_f32",
                            gating="silu", weights_per_step=weights_per_step, layer_scale=0.1)
    boxed = jax.eval_shape(lambda k: Transformer(cfg).init(k, jnp.zeros((1, 4, 16)))["params"],
                           jax.random.PRNGKey(0))
    return lora_lib.logical_axes(boxed)


def test_rules_cover_every_logical_axis_of_the_shared_transformer():
    for wps in (0, 4):
        axes = _transformer_axes(wps)
        assert missing_rules(axes) == {}
    assert missing_rules({("w",): ("embed", "nonexistent")}) == {"nonexistent": [("w",)]}


def test_transformer_params_shard_embed_on_fsdp_and_wide_axes_on_tensor():
    specs = param_partition_specs(_transformer_axes(4))
    layer = ("layers",)
    assert specs[layer + ("self_attn", "in_proj")] == PartitionSpec(None, None, "fsdp", None, "tensor", None)
    assert specs[layer + ("mlp", "linear_in")] == PartitionSpec(None, None, "fsdp", None, "tensor")
    assert specs[layer + ("norm1", "alpha")] == PartitionSpec(None, None)
    assert nn.logical_to_mesh_axes(("vocab", "embed"), LOGICAL_AXIS_RULES) == PartitionSpec("tensor", "fsdp")


def test_fit_spec_drops_mesh_axes_that_do_not_divide_the_dimension():
    from moshi_jax.training.mesh import fit_spec

    mesh = make_mesh((2, 2, 2))
    assert fit_spec(PartitionSpec("tensor", "fsdp"), (513, 64), mesh) == PartitionSpec(None, "fsdp")
    assert fit_spec(PartitionSpec("tensor", "fsdp"), (512, 64), mesh) == PartitionSpec("tensor", "fsdp")
    # A multi-axis entry keeps its longest dividing prefix; missing trailing entries stay replicated.
    assert fit_spec(PartitionSpec(("data", "fsdp")), (6, 3), mesh) == PartitionSpec("data", None)
    assert fit_spec(PartitionSpec(("data", "fsdp")), (3, 3), mesh) == PartitionSpec(None, None)
