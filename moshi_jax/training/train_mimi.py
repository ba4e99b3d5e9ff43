"""Train the Mimi codec: adversarial training with semantic distillation, on the shared training loop.

    moshi-jax train mimi_tiny                         # tiny codec, built-in synthesized speech, CPU, minutes
    python -m moshi_jax.training.train_mimi mimi_tiny steps=50
    moshi-jax train mimi data.sources=/data/audio:1.0 mesh.fsdp=8      # the released architecture

The recipe (spec 4.6; paper-recalled parts are leads): generator = Mimi (SEANet + transformers + split RVQ)
in training mode; a multi-scale STFT discriminator; generator loss = adversarial (hinge or least squares) +
feature matching, optionally multi-scale mel / L1 reconstruction (off in the paper's default), combined by
EnCodec's gradient balancer or fixed weights, + VQ commitment + semantic distillation (1 - cosine between a
linear projection of the semantic RVQ's output and teacher features pooled to 12.5 Hz). The quantizer trains
by EMA (moshi_jax.mimi.vq_training) with quantizer dropout over the acoustic levels and a per-sequence
probability of bypassing quantization. A weight EMA of the generator is kept and exported.

One jitted step (`CodecSteps`) updates everything: generator forward (vjp kept) -> discriminator update on the
detached output -> generator losses with the updated discriminator -> their gradients w.r.t. the audio
(balanced) pulled back through the generator -> AdamW on the generator, EMA of its weights. The whole state
(both param trees, both optimizer states, codebook EMAs, weight EMA, balancer EMAs, RNG) is one pytree with
explicit shardings, donated to the step and checkpointed together by the shared loop (`ProgramSteps`).

At the end, the EMA generator is exported to `<run_dir>/export/mimi.safetensors` in the reference layout with
`mimi.json` beside it (the reference's `mimi_config` dict: `moshi.models.loaders.get_mimi(path,
mimi_config=json.load(...))` loads it; `moshi-jax codec ... --weights` and `moshi-jax data tokenize
--mimi-weights` read the json automatically).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct, traverse_util

from moshi_jax.mimi.config import MimiConfig
from moshi_jax.mimi.discriminator import MultiScaleSTFTDiscriminator
from moshi_jax.mimi.model import MimiModule
from moshi_jax.mimi.vq_training import (
    CodebookState,
    VQTrainOptions,
    bypass_mask,
    centroids,
    dropout_levels,
    init_codebook_state,
    rvq_train,
)
from moshi_jax.training import codec_loss as L
from moshi_jax.training import config as config_lib
from moshi_jax.training.config import CodecConfig, OptimizerConfig, TrainConfig
from moshi_jax.training.loop import Program, ProgramSteps, axis_rules, build_mesh, setup_logging, train_loop
from moshi_jax.training.optimizer import make_optimizer, make_schedule
from moshi_jax.training.train_state import (
    count_params,
    logical_shardings,
    opt_state_shardings,
    replicated,
    with_shardings,
)

logger = logging.getLogger("moshi_jax.train")
Array = jax.Array
RVQS = ("semantic", "acoustic")


@struct.dataclass
class CodecTrainState:
    step: Array  # int32 []
    gen: Any  # {"mimi": Mimi params without codebooks, "distill": {"kernel": [D, teacher_dim]}}, float32
    gen_opt: Any
    disc: Any  # discriminator params
    disc_opt: Any
    vq: dict  # {"semantic": CodebookState, "acoustic": CodebookState}
    ema: Any  # weight EMA of `gen`
    balancer: dict  # {"sum": {loss: EMA of grad norms}, "count": EMA count}
    rng: Array  # uint32 [2]


def is_codebook(path: tuple[str, ...]) -> bool:
    return path[0] == "quantizer" and path[-1].startswith("codebook_")


def strip_codebooks(tree: Any) -> Any:
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_codebook(k)})


def disc_optimizer_config(cfg: TrainConfig) -> OptimizerConfig:
    o, c = cfg.optimizer, cfg.codec
    return dataclasses.replace(o, lr=c.disc_lr, b1=c.disc_b1, b2=c.disc_b2, cycle_momentum=False)


def loss_weights(c: CodecConfig) -> dict[str, float]:
    """The enabled losses on the output audio and their weights."""
    w = {"adv": c.adv_weight, "feat": c.feat_weight, "mel": c.mel_weight, "l1": c.l1_weight}
    w = {k: v for k, v in w.items() if v > 0}
    if not w:
        raise config_lib.ConfigError("codec: every loss on the audio has weight 0 (adv/feat/mel/l1_weight)")
    return w


def signal_preserving_init(mimi: Any, mcfg: MimiConfig, seed: int) -> Any:
    """Re-draw the conv kernels of Mimi params (SEANet, down/upsample) and the quantizer projections with unit
    variance gain, U(+-sqrt(3 / fan_in)), fan_in the inputs one output sample sums (C_in / groups x K, over the
    stride for a transposed conv), and set the conv biases to 0.

    Why: with the reference modules' PyTorch-default init (U(+-1/sqrt(fan_in)), variance 1 / (3 fan_in), biases
    alike) every layer shrinks the signal by ~sqrt(3) (more after each ELU) while the biases do not shrink, so
    a fresh SEANet decoder's output is set by its biases and ignores its input latent (measured on mimi_tiny:
    the part of the output that depends on the latent is 1e-3 of it), and learning has to rebuild the signal
    path before it can reconstruct anything (SI-SNR stayed near chance for 150 steps). Transformers (layer
    scale 0.01, near-identity) and codebooks (EMA buffers) are left as drawn."""
    rng = np.random.default_rng([seed, 23])
    flat = traverse_util.flatten_dict(mimi)
    strides = {f"up_{i}": r for i, r in enumerate(mcfg.ratios)}
    strides["upsample"] = mcfg.resample_stride
    out = {}
    for path, value in flat.items():
        shape, name = value.shape, path[-1]
        conv = path[0] in ("encoder", "decoder", "downsample", "upsample") and name in ("kernel", "bias")
        if conv and name == "bias":
            value = np.zeros(shape)
        elif conv:
            layer = path[-2]
            if layer in strides:  # transposed conv, kernel [C_in, K, C_out / G]
                cin_g = 1 if layer == "upsample" else shape[0]  # the resampling upsample is depthwise
                fan_in = cin_g * shape[1] / strides[layer]
            else:  # conv, kernel [K, C_in / G, C_out]
                fan_in = shape[0] * shape[1]
            bound = np.sqrt(3.0 / fan_in)
            value = rng.uniform(-bound, bound, shape)
        elif path[0] == "quantizer" and name in ("input_proj", "output_proj"):
            bound = np.sqrt(3.0 / shape[0])
            value = rng.uniform(-bound, bound, shape)
        out[path] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(out)


class CodecModel:
    """Mimi in training mode + the discriminator + the losses, as pure functions."""

    def __init__(self, mcfg: MimiConfig, ccfg: CodecConfig, compute_dtype: str = "float32"):
        self.mcfg, self.ccfg = mcfg, ccfg
        self.module = MimiModule(mcfg)
        self.disc = MultiScaleSTFTDiscriminator(tuple(ccfg.disc_scales), ccfg.disc_filters)
        self.vq_opts = VQTrainOptions(decay=ccfg.ema_decay, epsilon=mcfg.codebook_epsilon,
                                      kmeans_iters=ccfg.kmeans_iters, dead_code_every=ccfg.dead_code_every,
                                      threshold=ccfg.dead_code_threshold,
                                      replaced_usage_ratio=ccfg.replaced_usage_ratio)
        self.cdtype = jnp.dtype(compute_dtype)
        self.weights = loss_weights(ccfg)

    # ------------------------------------------------------------------ params
    def levels(self) -> dict[str, int]:
        return {"semantic": self.mcfg.n_q_semantic, "acoustic": self.mcfg.n_q_acoustic}

    def init_vq(self) -> dict[str, CodebookState]:
        return {k: init_codebook_state(n, self.mcfg.bins, self.mcfg.codebook_dim) for k, n in self.levels().items()}

    def full_params(self, mimi: Any, vq: dict) -> Any:
        """Mimi params with the codebooks set to the EMA centroids (constants for the gradient)."""
        quant = {}
        for name in RVQS:
            sub = dict(mimi["quantizer"][name])
            books = jax.lax.stop_gradient(centroids(vq[name], self.mcfg.codebook_epsilon))
            for lvl in range(books.shape[0]):
                sub[f"codebook_{lvl}"] = books[lvl]
            quant[name] = sub
        return {**mimi, "quantizer": quant}

    def _cast(self, tree):
        return jax.tree.map(lambda x: x.astype(self.cdtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def discriminate(self, disc_params, wav: Array):
        return self.disc.apply({"params": disc_params}, wav)

    # ------------------------------------------------------------------ training forward
    def forward_train(self, gen: Any, vq: dict, wav: Array, key: Array, step: Array):
        """wav [B, T] -> (audio [B, T] float32, semantic output [B, F, D], commitment loss, new vq, metrics)."""
        ccfg = self.ccfg
        full = self._cast(self.full_params(gen["mimi"], vq))
        latent, _ = self.module.apply({"params": full}, wav.astype(self.cdtype)[..., None], None,
                                      method=MimiModule.encode_latent)
        B, F, D = latent.shape
        x = latent.astype(jnp.float32).reshape(B * F, D)
        k_drop, k_sem, k_ac, k_mask = jax.random.split(key, 4)
        outs, new_vq, metrics, commits = {}, {}, {}, {}
        n_used = {}
        for name, k_rvq in (("semantic", k_sem), ("acoustic", k_ac)):
            p = gen["mimi"]["quantizer"][name]
            levels = self.levels()[name]
            n_active = levels
            if name == "acoustic" and ccfg.q_dropout:
                n_active = dropout_levels(k_drop, levels)
            xin = x @ p["input_proj"]
            q, _, commit, new_vq[name], m = rvq_train(xin, vq[name], n_active, step, k_rvq, self.vq_opts)
            if ccfg.no_quantization_rate > 0:  # per sequence, each RVQ its own draw (reference vq.py)
                bypass = bypass_mask(jax.random.fold_in(k_mask, len(outs)), B, ccfg.no_quantization_rate)
                q = jnp.where(jnp.repeat(bypass, F)[:, None], xin, q)
            outs[name] = (q @ p["output_proj"]).reshape(B, F, D)
            commits[name], n_used[name] = commit, jnp.asarray(n_active, jnp.float32)
            metrics.update({f"{name}_{k}": v for k, v in m.items()})
        # Reference `_renorm_and_add`: commitment averaged over all used levels of both RVQs.
        commit = ((commits["semantic"] * n_used["semantic"] + commits["acoustic"] * n_used["acoustic"])
                  / (n_used["semantic"] + n_used["acoustic"]))
        metrics["acoustic_levels"] = n_used["acoustic"]
        quantized = (outs["semantic"] + outs["acoustic"]).astype(self.cdtype)
        y, _ = self.module.apply({"params": full}, quantized, None, method=MimiModule.decode_latent)
        return y[..., 0].astype(jnp.float32), outs["semantic"], commit, new_vq, metrics

    def reconstruct(self, mimi: Any, vq: dict, wav: Array, num_codebooks: int | None = None) -> Array:
        """Inference round trip (nearest-centroid codes, `num_codebooks` levels): wav [B, T] -> [B, T]."""
        k = self.mcfg.check_num_codebooks(num_codebooks)
        full = self.full_params(mimi, vq)
        apply = self.module.apply
        latent, _ = apply({"params": full}, wav[..., None], None, method=MimiModule.encode_latent)
        codes = apply({"params": full}, latent, k, method=MimiModule.quantize)
        y, _ = apply({"params": full}, apply({"params": full}, codes, method=MimiModule.dequantize), None,
                     method=MimiModule.decode_latent)
        return y[..., 0]

    # ------------------------------------------------------------------ losses on the audio
    def adversarial_losses(self, disc_params, y: Array, real_fmaps) -> dict[str, Array]:
        """The enabled discriminator-based losses of the generator output y [B, T] (adv, feat)."""
        c, out = self.ccfg, {}
        fake_logits, fake_fmaps = self.discriminate(disc_params, y)
        if "adv" in self.weights:
            out["adv"] = L.generator_adv_loss(fake_logits, c.adversarial)
        if "feat" in self.weights:
            out["feat"] = L.feature_matching_loss(real_fmaps, fake_fmaps)
        return out

    def reconstruction_losses(self, wav: Array, y: Array) -> dict[str, Array]:
        """The enabled reconstruction losses (mel, l1)."""
        c, out = self.ccfg, {}
        if "mel" in self.weights:
            out["mel"] = L.multiscale_mel_loss(wav, y, self.mcfg.sample_rate, tuple(c.mel_scales), c.n_mels)
        if "l1" in self.weights:
            out["l1"] = L.l1_loss(wav, y)
        return out


def make_codec_train_step(model: CodecModel, tx_g, tx_d, schedule):
    """`step(state, batch, frozen) -> (state, metrics)`, pure; batch {"wav": [B, 1, T], "teacher": [B, F, Dt]}."""
    c = model.ccfg
    weights = model.weights

    def step(state: CodecTrainState, batch: dict, frozen: Any = None) -> tuple[CodecTrainState, dict]:
        del frozen
        rng, k_fwd = jax.random.split(state.rng)
        wav = batch["wav"][:, 0, :].astype(jnp.float32)
        teacher = batch["teacher"].astype(jnp.float32)

        def gen_fn(gen):
            y, sem, commit, new_vq, m = model.forward_train(gen, state.vq, wav, k_fwd, state.step)
            distill = jnp.float32(0.0)
            if c.distill_weight > 0:
                distill = L.distillation_loss(sem.astype(jnp.float32) @ gen["distill"]["kernel"], teacher)
            direct = c.commit_weight * commit + c.distill_weight * distill
            return (y, direct), (new_vq, {**m, "commit_loss": commit, "distill_loss": distill})

        (y, direct), gen_vjp, (new_vq, metrics) = jax.vjp(gen_fn, state.gen, has_aux=True)

        # Discriminator update on the detached generator output.
        y_const = jax.lax.stop_gradient(y)

        def d_loss_fn(dp):
            real, _ = model.discriminate(dp, wav)
            fake, _ = model.discriminate(dp, y_const)
            return L.discriminator_loss(real, fake, c.adversarial)

        d_loss, d_grads = jax.value_and_grad(d_loss_fn)(state.disc)
        d_updates, disc_opt = tx_d.update(d_grads, state.disc_opt, state.disc)
        disc = optax.apply_updates(state.disc, d_updates)

        # Generator losses on the audio, with the updated discriminator, and their gradients w.r.t. the audio:
        # one backward pass per loss with the balancer (it needs each gradient's norm), one per group without.
        groups = []
        if "adv" in weights or "feat" in weights:
            real_fmaps = jax.lax.stop_gradient(model.discriminate(disc, wav)[1]) if "feat" in weights else None
            groups.append(jax.vjp(lambda yy: model.adversarial_losses(disc, yy, real_fmaps), y))
        if "mel" in weights or "l1" in weights:
            groups.append(jax.vjp(lambda yy: model.reconstruction_losses(wav, yy), y))
        losses, balancer = {}, state.balancer
        if c.loss_weighting == "balancer":
            per_loss = {}
            for group, vjp in groups:
                losses.update(group)
                per_loss.update({k: vjp({j: jnp.float32(j == k) for j in group})[0] for k in group})
            g_y, ema_sum, count, norms = L.balance(per_loss, weights, balancer["sum"], balancer["count"],
                                                   c.balancer_decay)
            balancer = {"sum": ema_sum, "count": count}
            metrics.update({f"{k}_grad_norm": v for k, v in norms.items()})
        else:
            g_y = jnp.zeros_like(y)
            for group, vjp in groups:
                losses.update(group)
                g_y = g_y + vjp({k: jnp.float32(weights[k]) for k in group})[0]
        (g_gen,) = gen_vjp((g_y.astype(y.dtype), jnp.ones_like(direct)))

        g_updates, gen_opt = tx_g.update(g_gen, state.gen_opt, state.gen)
        gen = optax.apply_updates(state.gen, g_updates)
        # Weight EMA with a warm-up (TF ExponentialMovingAverage's num_updates): decay min(d, (1+t)/(10+t)), so a
        # short run's EMA is not dominated by the random initialisation.
        t = state.step.astype(jnp.float32)
        d = jnp.minimum(c.weight_ema, (1.0 + t) / (10.0 + t))
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.ema, gen) if c.weight_ema > 0 else gen
        total = direct + sum(weights[k] * v for k, v in losses.items())
        out = {"loss": total, "d_loss": d_loss, "grad_norm": optax.tree.norm(g_gen),
               "d_grad_norm": optax.tree.norm(d_grads), "lr": schedule(state.step)}
        out.update({f"{k}_loss": v for k, v in losses.items()})
        out.update({k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()})
        new = CodecTrainState(step=state.step + 1, gen=gen, gen_opt=gen_opt, disc=disc, disc_opt=disc_opt,
                              vq=new_vq, ema=ema, balancer=balancer, rng=rng)
        # The loop's NaN policy (training/step.py does the same for the LM): a step whose losses or gradient norms
        # are not finite leaves every tree as it was (only the step count and RNG move on) and says so.
        finite = (jnp.isfinite(total) & jnp.isfinite(d_loss) & jnp.isfinite(out["grad_norm"])
                  & jnp.isfinite(out["d_grad_norm"]))
        kept = state.replace(step=new.step, rng=rng)
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, kept)
        out["nonfinite"] = 1.0 - finite.astype(jnp.float32)
        return new, out

    return step


def make_codec_eval_step(model: CodecModel):
    """`eval(state, batch, frozen) -> metrics` of the (EMA) generator's inference round trip with the default
    number of codebooks: mel distance (mean |log10 mel diff|, 1024-point FFT, 64 bands), SI-SNR (dB), L1."""

    def eval_step(state: CodecTrainState, batch: dict, frozen: Any = None) -> dict:
        del frozen
        wav = batch["wav"][:, 0, :].astype(jnp.float32)
        gen = state.ema if model.ccfg.weight_ema > 0 else state.gen
        y = model.reconstruct(gen["mimi"], state.vq, wav)
        mel = jnp.mean(L.mel_distance(wav, y, model.mcfg.sample_rate))
        return {"loss": mel, "mel_distance": mel, "si_snr": jnp.mean(L.si_snr(wav, y)), "l1": L.l1_loss(wav, y)}

    return eval_step


@dataclasses.dataclass(frozen=True)
class CodecFunctions:
    model: CodecModel
    tx_g: Any
    tx_d: Any
    train: Any  # (state, batch, frozen) -> (state, metrics)
    eval: Any  # (state, batch, frozen) -> metrics
    build: Any  # (gen params, key) -> CodecTrainState


@functools.lru_cache(maxsize=8)
def codec_functions(mcfg: MimiConfig, ccfg: CodecConfig, opt: OptimizerConfig, disc_opt: OptimizerConfig,
                    steps: int, seq_frames: int, compute_dtype: str) -> CodecFunctions:
    """The pure functions of a codec run, cached per settings: a later `CodecSteps` with the same settings (a
    resumed run, another mesh) wraps the SAME functions, so jit's caches (trace, compile) serve it."""
    model = CodecModel(mcfg, ccfg, compute_dtype)
    tx_g, tx_d = make_optimizer(opt, steps), make_optimizer(disc_opt, steps)
    T = seq_frames * mcfg.frame_size

    def build(gen, key) -> CodecTrainState:
        k_disc, k_state = jax.random.split(key)
        disc = model.disc.init(k_disc, jnp.zeros((1, T), jnp.float32))["params"]
        balancer = {"sum": {k: jnp.float32(0.0) for k in model.weights}, "count": jnp.float32(0.0)}
        return CodecTrainState(step=jnp.zeros((), jnp.int32), gen=gen, gen_opt=tx_g.init(gen), disc=disc,
                               disc_opt=tx_d.init(disc), vq=model.init_vq(),
                               ema=jax.tree.map(lambda p: p + 0.0, gen), balancer=balancer, rng=k_state)

    return CodecFunctions(model, tx_g, tx_d, make_codec_train_step(model, tx_g, tx_d, make_schedule(opt, steps)),
                          make_codec_eval_step(model), build)


class CodecSteps(ProgramSteps):
    """The codec's state spec, sharded init and jitted steps for the shared loop."""

    def __init__(self, cfg: TrainConfig, mcfg: MimiConfig, mesh, rules, batch_shardings: dict):
        from moshi_jax.mimi.model import MimiCodec
        from moshi_jax.training import lora as lora_lib
        from moshi_jax.training.step import _MeshRules

        self.cfg, self.mcfg, self.mesh, self.rules = cfg, mcfg, mesh, rules
        fns = codec_functions(mcfg, cfg.codec, cfg.optimizer, disc_optimizer_config(cfg), cfg.steps,
                              cfg.data.seq_frames, cfg.compute_dtype)
        self.model, self.tx_g, self.tx_d = fns.model, fns.tx_g, fns.tx_d

        boxed = MimiCodec(mcfg).param_axes()
        axes = {k: v for k, v in lora_lib.logical_axes(boxed).items() if not is_codebook(k)}
        axes = {("mimi",) + k: v for k, v in axes.items()}
        axes[("distill", "kernel")] = ("embed", None)
        D = mcfg.dimension
        abstract_gen = {"mimi": strip_codebooks(nn.unbox(boxed)),
                        "distill": {"kernel": jax.ShapeDtypeStruct((D, cfg.codec.teacher_dim), jnp.float32)}}
        abstract_gen = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), abstract_gen)
        gen_sh = logical_shardings(axes, mesh, rules, abstract_gen)
        self.gen_shardings = gen_sh
        rep = replicated(mesh)
        abstract = jax.eval_shape(fns.build, abstract_gen, jax.ShapeDtypeStruct((2,), jnp.uint32))
        state_sh = CodecTrainState(
            step=rep, gen=gen_sh, gen_opt=opt_state_shardings(self.tx_g, abstract.gen_opt, gen_sh, mesh),
            disc=jax.tree.map(lambda _: rep, abstract.disc), disc_opt=jax.tree.map(lambda _: rep, abstract.disc_opt),
            vq=jax.tree.map(lambda _: rep, abstract.vq), ema=gen_sh,
            balancer=jax.tree.map(lambda _: rep, abstract.balancer), rng=rep)
        self.state_shardings = state_sh
        self.abstract_state = with_shardings(abstract, state_sh)
        self.abstract_gen = abstract_gen
        self.n_params = count_params(abstract.gen["mimi"]) + sum(
            int(np.prod(s.embed_sum.shape)) for s in abstract.vq.values())
        self.n_trainable = count_params(abstract.gen) + count_params(abstract.disc)
        self._ctx = lambda: _MeshRules(mesh, rules)
        self._train = jax.jit(fns.train,
                              in_shardings=(state_sh, batch_shardings, None), out_shardings=(state_sh, rep),
                              donate_argnums=(0,))
        self._eval = jax.jit(fns.eval, in_shardings=(state_sh, batch_shardings, None),
                             out_shardings=rep)
        self._init_rest = jax.jit(fns.build, out_shardings=state_sh)

    def initial_gen(self) -> Any:
        """Generator params: Mimi drawn on the host (`host_init`), or `init_from` (a reference Mimi), and the
        distillation projection (uniform +-1/sqrt(D))."""
        from moshi_jax.mimi.model import host_init

        seed = self.cfg.seed
        mimi = host_init(self.mcfg, jax.random.PRNGKey(seed))
        if self.cfg.codec.init == "signal":
            mimi = signal_preserving_init(mimi, self.mcfg, seed)
        rng = np.random.default_rng([seed, 17])
        D, Dt = self.mcfg.dimension, self.cfg.codec.teacher_dim
        distill = rng.uniform(-1 / np.sqrt(D), 1 / np.sqrt(D), (D, Dt)).astype(np.float32)
        return {"mimi": strip_codebooks(mimi), "distill": {"kernel": jnp.asarray(distill)}}

    def init(self):
        gen = jax.device_put(self.initial_gen(), self.gen_shardings)
        with jax.set_mesh(self.mesh):
            state = self._init_rest(gen, jax.random.PRNGKey(self.cfg.seed))
        if self.cfg.init_from:
            state = self._load_reference(state, self.cfg.init_from)
        return state, {}

    def _load_reference(self, state: CodecTrainState, path: str) -> CodecTrainState:
        """Start from a reference Mimi checkpoint: its weights, codebooks as initialised EMA buffers (usage 1)."""
        from moshi_jax.mimi import checkpoint as mimi_ckpt

        params = mimi_ckpt.load_reference(path, self.mcfg)
        gen = dict(jax.device_get(state.gen))
        gen["mimi"] = strip_codebooks(params)
        vq = {}
        for name, n in self.model.levels().items():
            books = jnp.stack([params["quantizer"][name][f"codebook_{i}"] for i in range(n)])
            vq[name] = CodebookState(usage=jnp.ones(books.shape[:2]), embed_sum=books, initialized=jnp.ones((n,)))
        gen = jax.device_put(gen, self.gen_shardings)
        new = state.replace(gen=gen, ema=jax.tree.map(jnp.copy, gen), gen_opt=self.tx_g.init(gen), vq=vq)
        return jax.device_put(new, self.state_shardings)

    def train(self, state, batch, frozen):
        with self._ctx():
            return self._train(state, batch, frozen)

    def evaluate(self, state, batch, frozen):
        with self._ctx():
            return self._eval(state, batch, frozen)

    def export_params(self, state, frozen):
        gen = state.ema if self.cfg.codec.weight_ema > 0 else state.gen
        fn = jax.jit(lambda g, vq: self.model.full_params(g["mimi"], vq))
        return fn(gen, state.vq)

    def lower(self, state, batch):
        """The lowered train step (for AOT compilation from abstract shapes)."""
        with self._ctx():
            return self._train.lower(state, batch, None)


def codec_batch_shardings(mesh) -> dict:
    from moshi_jax.training import mesh as mesh_lib

    return {"wav": mesh_lib.batch_sharding(mesh, 3), "teacher": mesh_lib.batch_sharding(mesh, 3)}


def mimi_program(cfg: TrainConfig, mcfg: MimiConfig) -> Program:
    """Mimi as a `Program` with its own steps (`CodecSteps`), the codec audio pipeline and reference export."""
    from moshi_jax.data import codec_audio

    def train_iter():
        return iter(codec_audio.make_codec_dataset(cfg.data, mcfg, cfg.codec, train=True))

    eval_iter = None
    if cfg.data.eval_sources:
        def eval_iter():
            return iter(codec_audio.make_codec_dataset(cfg.data, mcfg, cfg.codec, train=False))

    def export(params, out_dir: Path) -> list[Path]:
        return export_codec(params, mcfg, out_dir)

    def build_steps(cfg_, mesh, rules):
        return CodecSteps(cfg_, mcfg, mesh, rules, codec_batch_shardings(mesh))

    samples = cfg.data.batch_size * cfg.data.seq_frames * mcfg.frame_size
    return Program(task=None, batch_shardings=codec_batch_shardings, train_iter=train_iter, eval_iter=eval_iter,
                   tokens_per_step=samples, export=export, build_steps=build_steps)


def export_codec(params: Any, mcfg: MimiConfig, out_dir: Path) -> list[Path]:
    """Write `mimi.safetensors` (reference layout) and `mimi.json` (the reference's `mimi_config` dict)."""
    from moshi_jax.io_atomic import atomic_write_text
    from moshi_jax.mimi import checkpoint as mimi_ckpt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = mimi_ckpt.save_reference(params, mcfg, out_dir / "mimi.safetensors")
    cfg_path = mimi_ckpt.config_path_for(path)
    atomic_write_text(cfg_path, json.dumps(mimi_ckpt.reference_config(mcfg), indent=2))
    return [path, cfg_path]


def prepare_codec_data(cfg: TrainConfig) -> TrainConfig:
    """Without `data.sources`: build the built-in synthesized speech set (once) into <run_dir>/codec_data and
    train on its train voices, evaluate on its held-out voices."""
    if cfg.data.sources:
        return cfg
    if cfg.data.builtin != "speech":
        raise config_lib.ConfigError("program=mimi trains on audio: give data.sources (folders of audio files) or "
                                     "keep data.builtin=speech")
    from moshi_jax.data import codec_audio

    t0 = time.perf_counter()
    root = codec_audio.build_codec_dataset(cfg.resolved_run_dir / "codec_data", seed=cfg.data.seed)
    logger.info("built-in codec data ready in %.0fs: %s", time.perf_counter() - t0, root)
    data = dataclasses.replace(cfg.data, sources=(config_lib.DataSource(str(root / "train")),),
                               eval_sources=cfg.data.eval_sources or (config_lib.DataSource(str(root / "heldout")),))
    return dataclasses.replace(cfg, data=data)


def codec_rules(cfg: TrainConfig):
    return tuple(axis_rules(cfg)) + (("codebook", None), ("codebook_dim", None))


def run(cfg: TrainConfig) -> dict:
    """Train the codec of `cfg` (data prepared, mesh from the available devices) -> report dict."""
    cfg = prepare_codec_data(cfg)
    mcfg = config_lib.build_mimi_config(cfg)
    mesh = build_mesh(cfg)
    logger.info("config %s: Mimi %s, %d steps, batch %d x %.2f s, run dir %s", cfg.name, cfg.model.preset,
                cfg.steps, cfg.data.batch_size, cfg.data.seq_frames * mcfg.frame_size / mcfg.sample_rate,
                cfg.resolved_run_dir)
    report = train_loop(cfg, mimi_program(cfg, mcfg), mesh, codec_rules(cfg))
    for key, curve in report["loss_curve"].items():
        logger.info("%-14s %.4f -> %.4f", key, curve["start"], curve["end"])
    if report.get("eval"):
        logger.info("held-out: %s", {k: round(v, 4) for k, v in report["eval"].items() if isinstance(v, float)})
    logger.info("report: %s", cfg.resolved_run_dir / "report.md")
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return {}
    setup_logging()
    name, overrides = config_lib.main_overrides(argv)
    return run(config_lib.load_config(name, overrides))



def aot_compile_codec(cfg: TrainConfig, mesh) -> dict:
    """Lower + compile the codec train step for `mesh` (e.g. TPU topology devices on a CPU host) from abstract
    shapes only; XLA's per-device memory analysis and flops, and the state sizes."""
    import math

    from moshi_jax.training.step import cost_flops, memory_stats

    mcfg = config_lib.build_mimi_config(cfg)
    batch_sh = codec_batch_shardings(mesh)
    steps = CodecSteps(cfg, mcfg, mesh, codec_rules(cfg), batch_sh)
    B, F = cfg.data.batch_size, cfg.data.seq_frames
    batch = {"wav": jax.ShapeDtypeStruct((B, 1, F * mcfg.frame_size), jnp.float32, sharding=batch_sh["wav"]),
             "teacher": jax.ShapeDtypeStruct((B, F, cfg.codec.teacher_dim), jnp.float32,
                                             sharding=batch_sh["teacher"])}
    t0 = time.perf_counter()
    compiled = steps.lower(steps.abstract_state, batch).compile()
    seconds = time.perf_counter() - t0
    mem = memory_stats(compiled)
    state_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(steps.abstract_state))
    return {"config": cfg.name, "program": "mimi", "mesh": {k: int(v) for k, v in mesh.shape.items()},
            "batch": [B, 1, F * mcfg.frame_size], "compute_dtype": cfg.compute_dtype, "remat": cfg.remat,
            "lora": False, "microbatches": 1, "params": steps.n_params, "trainable_params": steps.n_trainable,
            "train_state_bytes_total": state_bytes, "frozen_bytes_total": 0,
            "flops_per_device_step": cost_flops(compiled), "model_flops_per_step": 0.0,
            "compile_seconds": seconds, "num_devices": mesh.size,
            "peak_bytes_per_device_estimate": mem.get("argument_size_in_bytes", 0)
            + mem.get("output_size_in_bytes", 0) - mem.get("alias_size_in_bytes", 0)
            + mem.get("temp_size_in_bytes", 0), **mem}


def export_checkpoint(req, saved: dict, step: int):
    """`moshi-jax export` of a codec run (EXPORTERS["mimi"]): step `step`'s generator (its weight EMA when
    `codec.weight_ema` > 0, as the end-of-run export) -> `mimi.safetensors` + `mimi.json` in `req.out_dir`."""
    from moshi_jax.training import mesh as mesh_lib
    from moshi_jax.training.checkpointing import Checkpointer
    from moshi_jax.training.export import ExportError, ExportResult, checkpoint_dir

    if req.lora_only:
        raise ExportError("--lora-only: a codec run has no LoRA adapter")
    if req.dtype != "float32":
        raise ExportError(f"--dtype {req.dtype}: codec exports are float32 (the reference Mimi's dtype)")
    try:
        cfg = config_lib.from_dict(TrainConfig, saved)
    except (config_lib.ConfigError, TypeError) as e:
        raise ExportError(f"{req.run_dir}/config.json is not a codec training config: {e}") from e
    mcfg = config_lib.build_mimi_config(cfg)
    mesh = mesh_lib.make_mesh((1, jax.device_count(), 1))
    steps = CodecSteps(cfg, mcfg, mesh, codec_rules(cfg), codec_batch_shardings(mesh))
    with Checkpointer(checkpoint_dir(req.run_dir, saved), async_save=False) as ckpt:
        state = ckpt.restore(step, steps.abstract_state)
    params = jax.device_get(steps.export_params(state, {}))
    return ExportResult(kind="mimi", step=step, files=export_codec(params, mcfg, Path(req.out_dir)))


if __name__ == "__main__":
    main()
    sys.exit(0)
