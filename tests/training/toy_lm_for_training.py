"""A small real Linen LM for the training-core tests (token embedding -> shared Transformer -> vocab head,
next-token cross-entropy), with logical axis names on every param like the project's models."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moshi_jax.nn.transformer import Transformer, TransformerConfig
from moshi_jax.training.train_state import TrainTask

VOCAB = 32
RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
         ("vocab", "tensor"), ("layers", None), ("qkv", None), ("head_dim", None), ("norm", None),
         ("gate", None), ("steps", None))


def toy_config(dtype: str = "float32") -> TransformerConfig:
    return TransformerConfig(d_model=16, num_heads=2, num_layers=2, dim_feedforward=64, norm="rms_norm",
                             gating="silu", dtype=dtype)


class ToyLM(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, tokens):  # [B, T] int32 -> logits [B, T, VOCAB] float32
        d = self.cfg.d_model
        emb = self.param("text_emb", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
                         (VOCAB, d), jnp.float32)
        x = emb[tokens].astype(self.cfg.dtype)
        x, _ = Transformer(self.cfg, name="transformer")(x)
        head = self.param("text_linear", nn.with_logical_partitioning(
            nn.initializers.normal(d ** -0.5), ("embed", "vocab")), (d, VOCAB), jnp.float32)
        return (x @ head.astype(x.dtype)).astype(jnp.float32)


def toy_task(cfg: TransformerConfig | None = None, seq: int = 8) -> TrainTask:
    cfg = cfg or toy_config()
    model = ToyLM(cfg)

    def init(key):
        return model.init(key, jnp.zeros((1, seq), jnp.int32))["params"]

    def loss(params, batch, rng):
        del rng
        tokens = batch["tokens"]
        logits = model.apply({"params": params}, tokens[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        return ce.mean(), {"text_loss": ce.mean()}

    return TrainTask(init=init, loss=loss)


def make_mesh(shape=(2, 2, 2)) -> Mesh:
    n = shape[0] * shape[1] * shape[2]
    devices = jax.devices()[:n]
    import numpy as np

    return Mesh(np.array(devices).reshape(shape), ("data", "fsdp", "tensor"),
                axis_types=(jax.sharding.AxisType.Auto,) * 3)


def batch_sharding(mesh: Mesh) -> dict:
    return {"tokens": NamedSharding(mesh, PartitionSpec(("data", "fsdp")))}


def random_batch(seed: int, batch: int = 8, seq: int = 8) -> dict:
    return {"tokens": jax.random.randint(jax.random.PRNGKey(seed), (batch, seq), 0, VOCAB, jnp.int32)}


# ----------------------------------------------------------------------------------------- resumable toy run


def toy_dataset(seed: int = 0, batch: int = 8, seq: int = 8):
    """Grain pipeline of random token rows (row i is a function of i), shuffled: the order is the state."""
    import grain
    import numpy as np

    def make(i):
        return {"tokens": np.random.default_rng(int(i)).integers(0, VOCAB, (seq,), dtype=np.int32)}

    return grain.MapDataset.range(100_000).shuffle(seed=seed).map(make).to_iter_dataset().batch(
        batch, drop_remainder=True)


def train_toy(ckpt_dir, total: int, stop_at: int, mesh_shape=(2, 2, 2)):
    """Train the toy LM up to `stop_at` (resuming from the latest checkpoint in `ckpt_dir` if any), then save.
    Returns (state, [sum of each consumed batch])."""
    from moshi_jax.training.checkpointing import Checkpointer
    from moshi_jax.training.config import OptimizerConfig
    from moshi_jax.training.optimizer import make_optimizer, make_schedule
    from moshi_jax.training.step import ShardedStep, make_train_step
    from moshi_jax.training.train_state import build_state_spec, init_train_state

    opt = OptimizerConfig(lr=1e-2, schedule="one_cycle", pct_start=0.3)
    task, tx = toy_task(), make_optimizer(opt, total)
    mesh = make_mesh(mesh_shape)
    spec = build_state_spec(task, tx, mesh, RULES)
    ckpt = Checkpointer(ckpt_dir, every=1000, keep=2, async_save=True)
    it = iter(toy_dataset())
    if ckpt.latest_step() is not None:
        state, frozen = ckpt.restore(ckpt.latest_step(), spec.abstract_state, it), {}
    else:
        state, frozen = init_train_state(spec, task, tx, seed=0)
    step = ShardedStep(make_train_step(task, spec.partition, tx, make_schedule(opt, total)), spec,
                       batch_sharding(mesh))
    sums = []
    while int(state.step) < stop_at:
        b = next(it)
        sums.append(int(b["tokens"].sum()))
        state, _ = step(state, jax.device_put(b, batch_sharding(mesh)), frozen)
    ckpt.save(int(state.step), state, it, config={"total": total}, force=True)
    ckpt.close()
    return state, sums


if __name__ == "__main__":  # worker for the kill/resume test: python toy_lm_for_training.py DIR TOTAL STOP OUT
    import sys

    import numpy as np

    ckpt_dir, total, stop_at, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    state, sums = train_toy(ckpt_dir, total, stop_at)
    leaves = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}
    np.savez(out, sums=np.asarray(sums), **leaves)
