"""Split residual vector quantizer (reference `SplitResidualVectorQuantizer`), inference path.

Two independent RVQs read the SAME latent, each through its own 1x1 input projection: the semantic
one (`n_q_semantic` = 1 level) and the acoustic one (the remaining levels); the acoustic RVQ does not
quantize the semantic residual. Decoding sums each RVQ's centroids in codebook space, projects back
with its output projection, and adds the two. Codes for K levels are the first K of
[semantic levels, acoustic levels].

Codebooks are stored as centroids, one `[bins, codebook_dim]` array per level (the reference's
`embedding_sum / clamp(cluster_usage, eps)`, computed at import).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from moshi_jax.mimi.config import MimiConfig

Array = jax.Array


def _uniform(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)  # PyTorch's default Conv1d init

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def nearest_code(x: Array, codebook: Array) -> Array:
    """Index of the nearest centroid (Euclidean) for each row: x `[N, D]`, codebook `[bins, D]` -> `[N]`.

    argmin |x - c|^2 = argmin (|c|^2 - 2 c.x): one matmul, ties resolved to the lowest index as in
    torch's argmin. The codebook is the matmul's left operand so that it is read in place (as the right
    one, XLA first copies a transposed codebook). For a single row (a streamed frame, batch 1), the scores
    are one fused pass over the codebook instead, sum(c * (c - 2 x)): the step is bound by reading weights,
    and this reads each codebook once rather than twice (norms, then a matrix-vector product)."""
    if x.shape[0] == 1:
        return jnp.argmin(jnp.sum(codebook * (codebook - 2.0 * x), axis=-1))[None].astype(jnp.int32)
    norms = jnp.sum(codebook * codebook, axis=-1)
    scores = norms[:, None] - 2.0 * (codebook @ x.T)  # [bins, N]
    return jnp.argmin(scores, axis=0).astype(jnp.int32)


class ResidualVQ(nn.Module):
    """One RVQ with input/output projections. `encode(x [B, T, dim], n) -> codes [B, T, n]`,
    `decode(codes [B, T, n]) -> [B, T, dim]` (any n <= levels)."""

    levels: int
    dim: int  # input / output width (the Mimi latent)
    codebook_dim: int
    bins: int

    def setup(self):
        self.input_proj = self.param(
            "input_proj", nn.with_logical_partitioning(_uniform(self.dim), ("embed", "codebook_dim")),
            (self.dim, self.codebook_dim), jnp.float32)
        self.output_proj = self.param(
            "output_proj", nn.with_logical_partitioning(_uniform(self.codebook_dim), ("codebook_dim", "embed")),
            (self.codebook_dim, self.dim), jnp.float32)
        # One array per level (not one stacked array): a streaming step reads each used codebook once, in
        # place; slicing a stacked array inside the jitted step would copy it first.
        self.codebooks = [
            self.param(f"codebook_{i}", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                      ("codebook", "codebook_dim")),
                       (self.bins, self.codebook_dim), jnp.float32)
            for i in range(self.levels)
        ]

    def encode(self, x: Array, n: int) -> Array:
        if not 1 <= n <= self.levels:
            raise ValueError(f"{self.name}: {n} levels requested, this RVQ has {self.levels}")
        B, T, _ = x.shape
        residual = (x @ self.input_proj).reshape(B * T, self.codebook_dim)
        codes = []
        for codebook in self.codebooks[:n]:
            idx = nearest_code(residual, codebook)
            residual = residual - codebook[idx]
            codes.append(idx)
        return jnp.stack(codes, axis=-1).reshape(B, T, n)

    def decode(self, codes: Array) -> Array:
        n = codes.shape[-1]
        if not 1 <= n <= self.levels:
            raise ValueError(f"{self.name}: codes have {n} levels, this RVQ has {self.levels}")
        q = self.codebooks[0][codes[..., 0]]
        for i in range(1, n):  # summed level by level, in the reference's order
            q = q + self.codebooks[i][codes[..., i]]
        return q @ self.output_proj

    def __call__(self, x: Array) -> Array:
        """Quantize and dequantize with all levels (used to create the parameters)."""
        return self.decode(self.encode(x, self.levels))


class SplitRVQ(nn.Module):
    """`encode(x [B, T, dimension], k) -> codes [B, T, k]`; `decode(codes [B, T, k]) -> [B, T, dimension]`."""

    cfg: MimiConfig

    def setup(self):
        cfg = self.cfg
        self.semantic = ResidualVQ(cfg.n_q_semantic, cfg.dimension, cfg.codebook_dim, cfg.bins)
        self.acoustic = ResidualVQ(cfg.n_q_acoustic, cfg.dimension, cfg.codebook_dim, cfg.bins)

    def encode(self, x: Array, k: int) -> Array:
        k = self.cfg.check_num_codebooks(k)
        n_sem = self.cfg.n_q_semantic
        codes = self.semantic.encode(x, n_sem)
        if k > n_sem:
            codes = jnp.concatenate([codes, self.acoustic.encode(x, k - n_sem)], axis=-1)
        return codes

    def decode(self, codes: Array) -> Array:
        self.cfg.check_num_codebooks(codes.shape[-1])
        n_sem = self.cfg.n_q_semantic
        out = self.semantic.decode(codes[..., :n_sem])
        if codes.shape[-1] > n_sem:
            out = out + self.acoustic.decode(codes[..., n_sem:])
        return out

    def __call__(self, x: Array) -> Array:
        return self.decode(self.encode(x, self.cfg.n_q))
