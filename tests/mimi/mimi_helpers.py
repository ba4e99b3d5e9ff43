"""Small helpers shared by the Mimi tests (no reference package needed)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def random_params(module: nn.Module, *args, seed: int = 0):
    """Random params for `module.init(key, *args)`, filled on the host (fan-in scaled uniform, so
    activations stay O(1)): a traced init compiles one threefry per parameter, which is slow on CPU."""
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *args))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.uniform(-1, 1, s.shape) / np.sqrt(max(1, s.size // s.shape[-1])), jnp.float32),
        shapes)
