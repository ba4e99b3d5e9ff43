"""Training-time residual vector quantization: EMA codebooks, k-means init, dead codes, commitment, STE.

    state = init_codebook_state(levels, bins, dim)
    q, codes, commit, state, metrics = rvq_train(x, state, n_active, step, key, opts)   # x [N, dim]

Pure functions of the reference's training machinery (`moshi/quantization/core_vq.py`, spec 1.5), on the
codebook-space vectors (after the RVQ's input projection):

- codebooks are EMA statistics, `usage` [L, bins] and `embed_sum` [L, bins, dim]; a centroid is
  embed_sum / max(usage, eps) (what the released checkpoint stores and `quantizer.py` reads);
- a level is k-means-initialised (`kmeans_iters` Lloyd iterations from random batch vectors, empty clusters
  resampled) on the first step it is used, but only once the level before it was initialised in an EARLIER
  step (as the reference: otherwise the next level would cluster the near-zero residual of the same batch);
  until then it quantizes with its all-zero codebook;
- every `dead_code_every` steps (counted by the global step, where the reference counts calls per codebook),
  codes whose usage fell under `threshold x` the uniform usage are replaced by random batch vectors, with
  usage `replaced_usage_ratio x` uniform; then usage and embed_sum take their EMA update (decay `decay`) with
  this batch's assignment counts and sums;
- commitment loss per level MSE(residual, sg(q)) (gradient to the encoder only), averaged over the levels
  used; the output is x + sg(sum q - x) (straight-through estimator on the total: encodec issue 25);
- levels >= `n_active` (quantizer dropout, a traced int) are skipped: no output, no loss, no update.

Under `jax.jit` with the rows sharded over the data axes, the counts, sums, k-means and sampling are global
(XLA inserts the all-reduces), so a sharded step computes what the single-device step computes: the
reference's `_average_tensors` all-reduce comes for free.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from moshi_jax.mimi.quantizer import nearest_code

Array = jax.Array


@struct.dataclass
class CodebookState:
    """EMA codebook statistics of one RVQ (L levels)."""

    usage: Array  # float32 [L, bins]: EMA of per-step assignment counts (reference `cluster_usage`)
    embed_sum: Array  # float32 [L, bins, dim]: EMA of per-step sums of assigned vectors (`embedding_sum`)
    initialized: Array  # float32 [L]: 1 once k-means-initialised (`_initialized`)


@dataclasses.dataclass(frozen=True)
class VQTrainOptions:
    decay: float = 0.99
    epsilon: float = 1e-5
    kmeans_iters: int = 50
    dead_code_every: int = 5
    threshold: float = 0.1
    replaced_usage_ratio: float = 1.0


def init_codebook_state(levels: int, bins: int, dim: int) -> CodebookState:
    """The reference's fresh buffers: usage ones, embed_sum zeros, not initialised."""
    return CodebookState(usage=jnp.ones((levels, bins), jnp.float32),
                         embed_sum=jnp.zeros((levels, bins, dim), jnp.float32),
                         initialized=jnp.zeros((levels,), jnp.float32))


def centroids(state: CodebookState, epsilon: float = 1e-5) -> Array:
    """[L, bins, dim] = embed_sum / max(usage, eps)."""
    return state.embed_sum / jnp.maximum(state.usage, epsilon)[..., None]


def sample_vectors(samples: Array, num: int, key: Array) -> Array:
    """`num` rows of samples [N, d]: without replacement when N >= num, else with."""
    n = samples.shape[0]
    if n >= num:
        idx = jax.random.permutation(key, n)[:num]
    else:
        idx = jax.random.randint(key, (num,), 0, n)
    return samples[idx]


def kmeans(samples: Array, k: int, iters: int, key: Array) -> tuple[Array, Array]:
    """Lloyd's k-means from `k` random samples; an empty cluster takes a fresh random sample each iteration.
    samples [N, d] -> (means [k, d], counts [k] clamped to >= 1), as the reference's `_run_kmeans`."""
    key, k0 = jax.random.split(key)
    means = sample_vectors(samples, k, k0)

    def body(i, carry):
        means, _ = carry
        buckets = nearest_code(samples, means)
        counts = jnp.zeros((k,), jnp.float32).at[buckets].add(1.0)
        empty = counts == 0
        counts = jnp.maximum(counts, 1.0)
        sums = jnp.zeros_like(means).at[buckets].add(samples)
        resampled = sample_vectors(samples, k, jax.random.fold_in(key, i))
        return jnp.where(empty[:, None], resampled, sums / counts[:, None]), counts

    return jax.lax.fori_loop(0, iters, body, (means, jnp.ones((k,), jnp.float32)))


def entropy(usage: Array) -> Array:
    """Entropy of the usage distribution over the last axis, divided by log(bins) (1 = uniform use)."""
    p = usage / jnp.sum(usage, axis=-1, keepdims=True)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1) / jnp.log(usage.shape[-1])


def rvq_train(x: Array, state: CodebookState, n_active, step, key: Array, opts: VQTrainOptions
              ) -> tuple[Array, Array, Array, CodebookState, dict]:
    """One training forward of an RVQ on x [N, dim] (float32).

    Returns (quantized [N, dim] with the straight-through estimator, codes int32 [N, L] (levels >= n_active
    are -1), commitment loss (mean over the active levels), updated state, metrics). `n_active` (1..L) and
    `step` may be traced."""
    L, bins, _ = state.embed_sum.shape
    n_active = jnp.asarray(n_active, jnp.int32)
    check_dead = (jnp.asarray(step, jnp.int32) + 1) % opts.dead_code_every == 0
    init_before = state.initialized
    residual = x
    q_sum = jnp.zeros_like(x)
    commit = jnp.float32(0.0)
    usages, sums, inits, codes_out, expired_out = [], [], [], [], []
    for lvl in range(L):
        k_init, k_dead = jax.random.split(jax.random.fold_in(key, lvl))
        active = lvl < n_active
        r = jax.lax.stop_gradient(residual)
        prev_ok = True if lvl == 0 else init_before[lvl - 1] > 0
        can_init = active & (init_before[lvl] == 0) & prev_ok

        def do_init(r=r, k_init=k_init):
            means, counts = kmeans(r, bins, opts.kmeans_iters, k_init)
            return counts, means * counts[:, None], jnp.float32(1.0)

        def keep(lvl=lvl):
            return state.usage[lvl], state.embed_sum[lvl], state.initialized[lvl]

        usage, esum, inited = jax.lax.cond(can_init, do_init, keep)
        codebook = esum / jnp.maximum(usage, opts.epsilon)[:, None]
        codes = nearest_code(r, codebook)
        q = codebook[codes]
        commit = commit + jnp.where(active, jnp.mean(jnp.square(residual - jax.lax.stop_gradient(q))), 0.0)

        # Dead codes (reference order: after the assignment, before the EMA update).
        replace_usage = opts.replaced_usage_ratio * jnp.sum(usage) / bins
        expired = (usage < opts.threshold * jnp.sum(usage) / bins) & check_dead & (inited > 0) & active
        fresh = sample_vectors(r, bins, k_dead)
        esum = jnp.where(expired[:, None], replace_usage * fresh, esum)
        usage = jnp.where(expired, replace_usage, usage)

        # EMA update with this batch's assignments.
        counts = jnp.zeros((bins,), jnp.float32).at[codes].add(1.0)
        batch_sum = jnp.zeros_like(esum).at[codes].add(r)
        d = opts.decay
        usage = jnp.where(active, d * usage + (1 - d) * counts, usage)
        esum = jnp.where(active, d * esum + (1 - d) * batch_sum, esum)

        q = jnp.where(active, q, 0.0)
        q_sum = q_sum + q
        residual = residual - jax.lax.stop_gradient(q)
        usages.append(usage)
        sums.append(esum)
        inits.append(inited)
        codes_out.append(jnp.where(active, codes, -1))
        expired_out.append(jnp.where(check_dead & active, jnp.mean(expired.astype(jnp.float32)), 0.0))

    quantized = x + jax.lax.stop_gradient(q_sum - x)
    new = CodebookState(usage=jnp.stack(usages), embed_sum=jnp.stack(sums), initialized=jnp.stack(inits))
    n = jnp.maximum(n_active, 1).astype(jnp.float32)
    level_mask = (jnp.arange(L) < n_active).astype(jnp.float32)
    metrics = {"entropy": jnp.sum(entropy(new.usage) * level_mask) / n,
               "expired": jnp.sum(jnp.stack(expired_out)) / n,
               "initialized": jnp.mean(new.initialized)}
    return quantized, jnp.stack(codes_out, axis=-1), commit / n, new, metrics


def dropout_levels(key: Array, levels: int) -> Array:
    """Quantizer dropout: the number of levels used this step, uniform in 1..levels (int32 [])."""
    return jax.random.randint(key, (), 1, levels + 1)


def bypass_mask(key: Array, batch: int, rate: float) -> Array:
    """Per-sequence "no quantization" draw: bool [batch], True with probability `rate` (the sequence's
    latent skips the quantizer, reference `no_quantization_rate`)."""
    return jax.random.uniform(key, (batch,)) < rate
