"""The reference PyTorch Mimi as a parity oracle: built with seeded random weights (including codebooks,
LayerNorms and LayerScales, so that every tensor of the import is exercised), plus helpers."""

from __future__ import annotations

import numpy as np

from moshi_jax.mimi import checkpoint as mimi_ckpt
from moshi_jax.mimi.config import MimiConfig


def build_reference(cfg: MimiConfig, seed: int = 0, num_codebooks: int | None = None):
    """Reference `MimiModel` for `cfg` with random weights; codebook scale matched to the projected latent
    (so that codes are spread over the codebook, not all 0)."""
    import torch
    from moshi.models import loaders

    torch.set_num_threads(1)  # the thread count changes float bits; keep the oracle deterministic
    torch.manual_seed(seed)
    ref = loaders.get_mimi(None, mimi_config=mimi_ckpt.reference_config(cfg),
                           num_codebooks=num_codebooks or cfg.num_codebooks)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".norm" in name:  # LayerNorm weight ~ 1, bias ~ 0, both random
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
            elif "layer_scale" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.2)
        # Scale of the projected latent on noise input, to size the codebooks.
        wav = torch.randn(1, 1, 4 * cfg.frame_size, generator=g) * 0.3
        latent = ref.encode_to_latent(wav, quantize=False)
        for rvq in (ref.quantizer.rvq_first, ref.quantizer.rvq_rest):
            std = float(rvq.input_proj(latent).std())
            for layer in rvq.vq.layers:
                cb = layer._codebook
                usage = torch.rand(cb.cluster_usage.shape, generator=g) + 0.5
                cb.cluster_usage.copy_(usage)
                cb.embedding_sum.copy_(torch.randn(cb.embedding_sum.shape, generator=g) * std * usage[:, None])
                cb._initialized.fill_(1.0)
                cb.register_buffer("_embedding", None, persistent=False)  # drop the cached centroids
    return ref


def state_dict_numpy(ref) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}


def reference_latent(ref, wav: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return ref.encode_to_latent(torch.from_numpy(wav), quantize=False).numpy()


def clear_code_mask(ref, latent: np.ndarray, num_codebooks: int, rel_gap: float = 1e-4) -> np.ndarray:
    """[B, K, F] bool: codes whose nearest-vs-second-nearest squared distance gap is clear (relative
    `rel_gap`) at that level and at every earlier level of the same RVQ (an unclear level changes the
    residual seen by the later ones). Computed in float64 from the reference's latent `[B, D, F]`."""
    import torch

    latent = torch.from_numpy(latent)
    q = ref.quantizer
    n_sem = q.n_q_semantic
    groups = [(q.rvq_first, range(0, min(n_sem, num_codebooks)))]
    if num_codebooks > n_sem:
        groups.append((q.rvq_rest, range(n_sem, num_codebooks)))
    B, _, F = latent.shape
    mask = np.zeros((B * F, num_codebooks), bool)
    for rvq, levels in groups:
        with torch.no_grad():
            x = rvq.input_proj(latent).transpose(1, 2).reshape(B * F, -1).double().numpy()
        ok = np.ones(B * F, bool)
        for j, level in enumerate(levels):
            cb = rvq.vq.layers[j]._codebook.embedding.double().numpy()
            d = ((x[:, None, :] - cb[None]) ** 2).sum(-1)
            two = np.sort(d, axis=1)[:, :2]
            ok &= (two[:, 1] - two[:, 0]) > rel_gap * two[:, 1]
            mask[:, level] = ok
            x = x - cb[d.argmin(1)]
    return mask.reshape(B, F, num_codebooks).transpose(0, 2, 1)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
