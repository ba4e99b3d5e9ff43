"""Per-backend kernel choices (moshi_jax.nn.backend): picked by platform in one place, forced by override / env,
and every CPU trick computes what the portable path computes (bit for bit where it only moves data)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moshi_jax.nn import backend, matmul
from moshi_jax.nn import kv_cache as kvc


def test_choices_are_the_cpu_tricks_on_cpu_and_portable_elsewhere(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.choices("cpu") == backend.CPU
    assert backend.choices("gpu") == backend.PORTABLE and backend.choices("tpu") == backend.PORTABLE
    assert backend.choices() == backend.CPU  # the tests run on CPU
    with backend.override("portable"):
        assert backend.choices("cpu") == backend.PORTABLE
        with backend.override("cpu"):
            assert backend.choices("tpu") == backend.CPU
        assert backend.choices() == backend.PORTABLE
    assert backend.choices() == backend.CPU
    monkeypatch.setenv(backend.ENV_VAR, "portable")
    assert backend.choices("cpu") == backend.PORTABLE
    monkeypatch.setenv(backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="MOSHI_JAX_KERNELS"):
        backend.choices()


def _traced(which, fn, *args):
    with backend.override(which):  # a fresh function per trace: jit caches traces by function
        return jax.jit(lambda *a: fn(*a))(*args)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_ring_write_by_update_slices_equals_the_scatter_bit_for_bit(dtype):
    r = np.random.default_rng(0)
    B, C, H, D, T = 3, 8, 2, 4, 3
    cache = kvc.init_kv_cache(B, C, H, D, dtype)
    cache = cache.replace(keys=jnp.asarray(r.standard_normal(cache.keys.shape), dtype),
                          values=jnp.asarray(r.standard_normal(cache.values.shape), dtype))
    k = jnp.asarray(r.standard_normal((B, T, H, D)), jnp.float32)  # cast to the ring's dtype by `write`
    v = jnp.asarray(r.standard_normal((B, T, H, D)), jnp.float32)
    pos = jnp.asarray([[0, 1, 2], [6, 7, 8], [13, 14, 15]], jnp.int32)  # item 1 and 2 wrap around the ring
    cpu = _traced("cpu", kvc.write, cache, k, v, pos)
    portable = _traced("portable", kvc.write, cache, k, v, pos)
    for a, b in zip(jax.tree.leaves(cpu), jax.tree.leaves(portable), strict=True):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    assert not np.array_equal(np.asarray(cpu.keys.astype(jnp.float32)), np.asarray(cache.keys.astype(jnp.float32)))


@pytest.mark.parametrize("written", [1, 70, 150, 400])
def test_prefix_ring_attention_equals_whole_ring_attention(written):
    """CPU's `lax.switch` over ring prefixes equals one masked attention over the whole ring, while the ring
    fills (prefixes 64 / 128 / 256) and once it wrapped."""
    r = np.random.default_rng(written)
    B, C, H, D = 2, 300, 2, 8
    cache = kvc.init_kv_cache(B, C, H, D, jnp.bfloat16)
    last = np.asarray([written - 1, max(written // 2 - 1, 0)])  # items at different positions
    pos = last[:, None] - (last[:, None] - np.arange(C)[None]) % C  # the latest position written to each slot
    pos = np.where(pos >= 0, pos, -1)
    cache = cache.replace(keys=jnp.asarray(r.standard_normal(cache.keys.shape), jnp.bfloat16),
                          values=jnp.asarray(r.standard_normal(cache.values.shape), jnp.bfloat16),
                          positions=jnp.asarray(pos, jnp.int32))
    q = jnp.asarray(r.standard_normal((B, 1, H, D)), jnp.bfloat16)
    q_pos = jnp.asarray(last[:, None], jnp.int32)
    a = _traced("cpu", lambda *x: kvc.attend(*x, True, 250), q, cache, q_pos)
    b = _traced("portable", lambda *x: kvc.attend(*x, True, 250), q, cache, q_pos)
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-2)
    assert np.abs(np.asarray(a, np.float32)).max() > 0.05


def test_materialised_transposes_give_the_portable_gradients():
    r = np.random.default_rng(1)
    x = jnp.asarray(r.standard_normal((4, 16, 32)), jnp.bfloat16)
    w = jnp.asarray(r.standard_normal((32, 24)), jnp.bfloat16)

    def loss(x, w):
        return matmul.einsum("btd,df->btf", x, w).astype(jnp.float32).sum()

    ga = _traced("cpu", jax.grad(loss, argnums=(0, 1)), x, w)
    gb = _traced("portable", jax.grad(loss, argnums=(0, 1)), x, w)
    for a, b in zip(ga, gb, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-2)


def test_the_cpu_set_is_every_cpu_trick_and_the_portable_set_none():
    # What the module documents (and the memory / speed figures in the README were measured with).
    assert backend.CPU == backend.Choices(materialize_transposes=True, ring_attention="prefix",
                                          ring_write="update_slices", strided_conv="polyphase")
    assert backend.PORTABLE == backend.Choices(materialize_transposes=False, ring_attention="whole",
                                               ring_write="scatter", strided_conv="direct")
    assert backend.NAMED == {"cpu": backend.CPU, "portable": backend.PORTABLE}


def test_the_shared_choice_sets_cannot_be_changed_by_accident():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        backend.CPU.ring_attention = "whole"
    assert hash(backend.CPU) != hash(backend.PORTABLE)  # usable as (part of) a cache key
