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


def toy_train_config(run_dir, total: int):
    from moshi_jax.training.config import CheckpointConfig, MetricsConfig, OptimizerConfig, TrainConfig

    return TrainConfig(name="toy", run_dir=str(run_dir), steps=total, compute_dtype="float32",
                       optimizer=OptimizerConfig(lr=1e-2, schedule="one_cycle", pct_start=0.3),
                       checkpoint=CheckpointConfig(every=1000, keep=2),
                       metrics=MetricsConfig(log_every=1, progress_bar=False))


def toy_program():
    from train.train_lm import Program

    return Program(task=toy_task(), batch_shardings=batch_sharding, train_iter=lambda: iter(toy_dataset()),
                   tokens_per_step=8 * 8)


def train_toy(run_dir, total: int, stop_at: int, mesh_shape=(2, 2, 2)) -> dict:
    """The project's train loop on the toy LM: up to `stop_at` (resuming from `run_dir`'s checkpoints)."""
    from train.train_lm import train_loop

    cfg = toy_train_config(run_dir, total)
    done = 0
    from moshi_jax.training.checkpointing import Checkpointer

    with Checkpointer(cfg.checkpoint_dir) as ckpt:
        done = ckpt.latest_step() or 0
    return train_loop(cfg, toy_program(), make_mesh(mesh_shape), RULES, stop_after=stop_at - done)


if __name__ == "__main__":  # worker for the kill/resume test: python toy_lm_for_training.py RUN_DIR TOTAL STOP
    import sys

    train_toy(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
