"""Configuration of the Moshi LM (multi-stream RQ-Transformer): one frozen dataclass, presets, and the
conversion from / to the reference's `LMModel` kwargs (a Kyutai repository's `config.json`).

Stream layout (reference): stream 0 is text, streams 1..n_q are audio codebooks (1..dep_q the model's
own audio, the rest input-only, e.g. the user's audio for Moshi). `delays` has one entry per stream.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moshi_jax.nn.norms import NORMS
from moshi_jax.nn.transformer import TransformerConfig

# config.json keys that describe the repository (file names, generation defaults), not the LM itself.
REPO_ONLY_KEYS = ("moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name", "model_type",
                  "lm_gen_config", "tts_config", "stt_config", "model_id")
# Reference kwargs that are deprecated or have no effect on the weights / outputs we compute.
_IGNORED_KWARGS = ("depformer_causal", "depformer_context", "gradient_checkpointing", "cross_attention_in_depformer")
# Reference options this port does not implement: refused with a clear error instead of silently ignored.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "demux_second_text_stream": False, "demux_second_stream": False, "norm_emb": False, "bias_proj": False,
    "depformer_norm": None, "extra_heads_num_heads": 0, "conditioners": None, "fuser": None, "condition_provider": None,
    "cross_attention": False, "kv_repeat": 1, "depformer_kv_repeat": 1, "quantize": False, "lora": False,
    "skip_self_attn": False, "depformer_skip_self_attn": False,
}


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Hyperparameters of the Moshi LM. Each one lives in exactly one place: the transformer stacks' own
    settings (width, depth, norm, gating, RoPE, context, dtypes, remat) are in `temporal` / `depth`."""

    text_card: int  # text vocabulary; the input table has one more row (the initial token `text_card`)
    card: int  # audio codebook size; input tables have one more row (the initial token `card`)
    n_q: int  # number of audio streams (Moshi: 8 own + 8 user)
    dep_q: int  # audio streams predicted by the depth transformer (0: text-only model)
    delays: tuple[int, ...]  # per stream (text first), len n_q + 1
    temporal: TransformerConfig  # Helium (the temporal transformer); its `norm` is also out_norm's
    depth: TransformerConfig | None  # the depformer; None when dep_q == 0
    depformer_multi_linear: bool = False  # one temporal->depformer projection per depth step (reference default)
    depformer_low_rank_embeddings: int | None = None  # depformer token tables of this rank + a linear
    existing_text_padding_id: int = 3
    existing_text_end_padding_id: int = 0
    text_card_out: int | None = None  # text head size if different from text_card

    def __post_init__(self):
        object.__setattr__(self, "delays", tuple(self.delays))  # hashable: configs are jit static args
        if self.n_q < self.dep_q:
            raise ValueError(f"dep_q ({self.dep_q}) cannot exceed n_q ({self.n_q})")
        if len(self.delays) != self.n_q + 1:
            raise ValueError(f"delays has {len(self.delays)} entries, expected n_q + 1 = {self.n_q + 1}")
        if any(d < 0 for d in self.delays):
            raise ValueError(f"delays must be >= 0, got {self.delays}")
        if (self.depth is None) != (self.dep_q == 0):
            raise ValueError("depth must be None exactly when dep_q == 0")
        if self.temporal.norm not in NORMS:
            raise ValueError(f"unknown norm {self.temporal.norm!r}; expected one of {sorted(NORMS)}")
        if self.depth is not None:
            if self.depth.norm != self.temporal.norm:
                raise ValueError("the reference uses one `norm` for both transformers")
            if self.depth.weights_per_step not in (0, self.dep_q):
                raise ValueError(f"depth.weights_per_step must be 0 or dep_q ({self.dep_q})")
            if self.depth.weights_per_step_schedule is not None and not self.depth.weights_per_step:
                raise ValueError("depformer_weights_per_step_schedule needs depformer weights_per_step")
            if self.depth.context is not None and self.depth.context < self.dep_q:
                raise ValueError("depth.context must cover the dep_q depth steps (or be None)")

    # ------------------------------------------------------------------ derived values
    @property
    def text_initial_token_id(self) -> int:
        return self.text_card

    @property
    def initial_token_id(self) -> int:
        return self.card

    @property
    def zero_token_id(self) -> int:
        return -1

    @property
    def ungenerated_token_id(self) -> int:
        return -2

    @property
    def num_streams(self) -> int:
        return 1 + self.n_q

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def dim(self) -> int:
        return self.temporal.d_model

    @property
    def text_out(self) -> int:
        return self.text_card if self.text_card_out is None else self.text_card_out

    @property
    def depformer_weights_per_step_schedule(self) -> tuple[int, ...] | None:
        return None if self.depth is None else self.depth.weights_per_step_schedule

    @property
    def num_depformer_in(self) -> int:
        """Number of temporal->depformer projections (reference `len(depformer_in)`)."""
        if not self.depformer_multi_linear:
            return 1
        schedule = self.depformer_weights_per_step_schedule
        return max(schedule) + 1 if schedule else self.dep_q

    def depformer_in_index(self, k: int) -> int:
        """Which depformer_in projection depth step `k` uses."""
        if not self.depformer_multi_linear:
            return 0
        schedule = self.depformer_weights_per_step_schedule
        return schedule[k] if schedule else k

    @property
    def dtype(self) -> str:
        """Compute dtype (the temporal transformer's; `with_dtypes` keeps both stacks equal)."""
        return self.temporal.dtype

    @property
    def param_dtype(self) -> str:
        return self.temporal.param_dtype

    def with_dtypes(self, dtype: str, param_dtype: str | None = None) -> LMConfig:
        """Same model with compute dtype `dtype` (and param dtype, default unchanged) in both stacks."""
        upd = {"dtype": dtype} if param_dtype is None else {"dtype": dtype, "param_dtype": param_dtype}
        depth = None if self.depth is None else dataclasses.replace(self.depth, **upd)
        return dataclasses.replace(self, temporal=dataclasses.replace(self.temporal, **upd), depth=depth)

    # ------------------------------------------------------------------ presets
    @classmethod
    def moshi_7b(cls) -> LMConfig:
        """The released moshiko / moshika 7B (reference `loaders._lm_kwargs`), 7,687,729,152 params."""
        return cls.from_reference_kwargs(MOSHI_7B_KWARGS)

    @classmethod
    def moshi_2b(cls) -> LMConfig:
        """The 2B-style config of `moshi_dev_2b.json` (Hibiki-style: 32 streams, 16 predicted), without its
        LUT conditioner."""
        return cls.from_reference_kwargs(MOSHI_2B_KWARGS)

    @classmethod
    def bench_111m(cls) -> LMConfig:
        """The 111.6M-param benchmark config: released vocab and hyperparameters, dim 512 x 6 layers,
        depformer 256 x 4 layers."""
        return cls.from_reference_kwargs(BENCH_111M_KWARGS)

    @classmethod
    def tiny(cls) -> LMConfig:
        """Tiny Moshi-shaped config for tests and smoke runs (released structure and delays)."""
        return cls.from_reference_kwargs(TINY_KWARGS)

    @classmethod
    def stt_small(cls) -> LMConfig:
        """Small streaming speech-to-text LM (the reference's STT layout: no depformer, every audio stream an
        input, all delays 0; the text lag is the data's `text_delay_frames`): 8 codebooks of the tiny Mimi
        (64 bins; the TTS model's 8, so the ASR model can also read generated codes), dim 192 x 4 layers.
        Sized for CPU training (configs/asr_small.py)."""
        return cls.from_reference_kwargs(STT_SMALL_KWARGS)

    @classmethod
    def stt_base(cls) -> LMConfig:
        """`stt_small` at dim 512 x 8 layers (configs/asr_gpu.py)."""
        return cls.from_reference_kwargs(STT_BASE_KWARGS)

    @classmethod
    def tts_small(cls) -> LMConfig:
        """Small streaming TTS LM: one speaker's 8 tiny-Mimi codebooks, all predicted by a depformer
        (n_q == dep_q, Moshi's acoustic delay of 1 frame), dim 192 x 4 layers. CPU (configs/tts_small.py)."""
        return cls.from_reference_kwargs(TTS_SMALL_KWARGS)

    @classmethod
    def tts_base(cls) -> LMConfig:
        """`tts_small` at dim 512 x 8 layers, depformer 256 x 4 (configs/tts_gpu.py)."""
        return cls.from_reference_kwargs(TTS_BASE_KWARGS)

    # ------------------------------------------------------------------ reference kwargs
    @classmethod
    def from_reference_kwargs(cls, kwargs: dict[str, Any]) -> LMConfig:
        """Build from the reference's `LMModel` kwargs or a Kyutai repository's `config.json` (repository keys
        such as `moshi_name` / `lm_gen_config` are ignored). Options this port does not implement raise."""
        kw = dict(kwargs)
        for key in REPO_ONLY_KEYS + _IGNORED_KWARGS + ("lora_rank", "lora_scaling"):
            kw.pop(key, None)
        for key, default in _UNSUPPORTED_DEFAULTS.items():
            if key in kw:
                value = kw.pop(key)
                if value != default and not (default is None and not value):
                    raise ValueError(f"reference LM option {key}={value!r} is not supported by moshi_jax")
        if "activation" in kw:
            raise ValueError("reference LM option `activation` (a torch callable) is not supported; the plain "
                             "MLP uses gelu as in the reference default")
        dim = kw.pop("dim", 128)
        num_heads = kw.pop("num_heads", 8)
        hidden_scale = kw.pop("hidden_scale", 4)
        norm = kw.pop("norm", "layer_norm")
        causal = kw.pop("causal", True)
        n_q, dep_q = kw.pop("n_q", 8), kw.pop("dep_q", 8)
        card, text_card = kw.pop("card", 1024), kw.pop("text_card", 32000)
        delays = tuple(kw.pop("delays", [0]))
        dep = {k.removeprefix("depformer_"): kw.pop(k) for k in list(kw) if k.startswith("depformer_")}
        dep_dim = dep.pop("dim", 256)
        dep_ff = dep.pop("dim_feedforward", None)
        if isinstance(dep_ff, list | tuple):
            if len(set(dep_ff)) != 1:
                raise ValueError("per-step depformer_dim_feedforward lists with different sizes are not supported")
            dep_ff = dep_ff[0]
        multi_linear = dep.pop("multi_linear", False)
        wps = dep.pop("weights_per_step", False)
        schedule = dep.pop("weights_per_step_schedule", None)
        low_rank = dep.pop("low_rank_embeddings", None)
        dep_pos = dep.pop("pos_emb", "sin")
        top = {k: kw.pop(k) for k in ("existing_text_padding_id", "existing_text_end_padding_id", "text_card_out")
               if k in kw}
        # Remaining: StreamingTransformer kwargs shared by both stacks (the depformer overrides with its own).
        shared = {k: kw.pop(k) for k in ("num_layers", "gating", "layer_scale", "max_period", "positional_scale",
                                         "positional_embedding") if k in kw}
        context = kw.pop("context", None)
        if kw:
            raise ValueError(f"unknown reference LM kwargs: {sorted(kw)}")
        unknown_dep = set(dep) - {"num_heads", "num_layers", "gating", "layer_scale", "max_period",
                                  "positional_scale"}
        if unknown_dep:
            raise ValueError(f"unknown reference depformer kwargs: {sorted('depformer_' + k for k in unknown_dep)}")
        if "num_layers" not in shared:
            raise ValueError("reference LM kwargs need `num_layers`")
        temporal = TransformerConfig(
            d_model=dim, num_heads=num_heads, num_layers=shared["num_layers"],
            dim_feedforward=int(hidden_scale * dim), causal=causal, context=context, norm=norm,
            gating=shared.get("gating", "none"), layer_scale=shared.get("layer_scale"),
            positional_embedding=shared.get("positional_embedding", "sin"),
            max_period=float(shared.get("max_period", 10_000)),
            positional_scale=float(shared.get("positional_scale", 1.0)))
        depth = None
        if dep_q > 0:
            if "num_heads" not in dep:
                raise ValueError("reference LM kwargs need `depformer_num_heads` when dep_q > 0")
            merged = {**shared, **dep}
            depth = TransformerConfig(
                d_model=dep_dim, num_heads=merged["num_heads"], num_layers=merged["num_layers"],
                dim_feedforward=int(hidden_scale * dep_dim) if dep_ff is None else int(dep_ff), causal=causal,
                # The reference forces context None for the depformer; the KV ring then holds the dep_q steps.
                context=None if wps else dep_q, norm=norm, gating=merged.get("gating", "none"),
                layer_scale=merged.get("layer_scale"), positional_embedding=dep_pos,
                max_period=float(merged.get("max_period", 10_000)),
                positional_scale=float(merged.get("positional_scale", 1.0)),
                weights_per_step=dep_q if wps else 0,
                weights_per_step_schedule=None if schedule is None else tuple(schedule))
        elif schedule is not None:
            raise ValueError("depformer_weights_per_step_schedule given with dep_q == 0")
        return cls(text_card=text_card, card=card, n_q=n_q, dep_q=dep_q, delays=delays, temporal=temporal,
                   depth=depth, depformer_multi_linear=multi_linear, depformer_low_rank_embeddings=low_rank, **top)

    def to_reference_kwargs(self) -> dict[str, Any]:
        """The reference `LMModel` kwargs (`loaders.get_moshi_lm(..., lm_kwargs=...)`) of this config;
        `from_reference_kwargs(cfg.to_reference_kwargs()) == cfg`."""
        t = self.temporal
        hidden_scale = t.dim_feedforward / t.d_model
        if int(hidden_scale * t.d_model) != t.dim_feedforward:
            raise ValueError(f"temporal dim_feedforward {t.dim_feedforward} is not expressible as hidden_scale * dim")
        if t.weights_per_step:
            raise ValueError("the reference temporal transformer has no weights_per_step")
        kw: dict[str, Any] = {
            "dim": t.d_model, "text_card": self.text_card, "existing_text_padding_id": self.existing_text_padding_id,
            "existing_text_end_padding_id": self.existing_text_end_padding_id, "n_q": self.n_q,
            "dep_q": self.dep_q, "card": self.card, "num_heads": t.num_heads, "num_layers": t.num_layers,
            "hidden_scale": hidden_scale, "causal": t.causal, "layer_scale": t.layer_scale, "context": t.context,
            "max_period": t.max_period, "positional_scale": t.positional_scale, "gating": t.gating, "norm": t.norm,
            "positional_embedding": t.positional_embedding, "delays": list(self.delays),
            "depformer_multi_linear": self.depformer_multi_linear,
        }
        if self.text_card_out is not None:
            kw["text_card_out"] = self.text_card_out
        if self.depformer_low_rank_embeddings is not None:
            kw["depformer_low_rank_embeddings"] = self.depformer_low_rank_embeddings
        d = self.depth
        if d is not None:
            if d.causal != t.causal or d.norm != t.norm:
                raise ValueError("the reference shares `causal` and `norm` between the two transformers")
            kw.update({
                "depformer_dim": d.d_model, "depformer_dim_feedforward": d.dim_feedforward,
                "depformer_num_heads": d.num_heads, "depformer_num_layers": d.num_layers,
                "depformer_layer_scale": d.layer_scale, "depformer_max_period": d.max_period,
                "depformer_positional_scale": d.positional_scale, "depformer_gating": d.gating,
                "depformer_pos_emb": d.positional_embedding, "depformer_weights_per_step": bool(d.weights_per_step),
            })
            if d.weights_per_step_schedule is not None:
                kw["depformer_weights_per_step_schedule"] = list(d.weights_per_step_schedule)
        return kw


# Reference kwargs of the presets (the released ones copied from the reference's loaders / configs).
MOSHI_7B_KWARGS: dict[str, Any] = {
    "dim": 4096, "text_card": 32000, "existing_text_padding_id": 3, "n_q": 16, "dep_q": 8, "card": 2048,
    "num_heads": 32, "num_layers": 32, "hidden_scale": 4.125, "causal": True, "layer_scale": None, "context": 3000,
    "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32", "positional_embedding": "rope",
    "depformer_dim": 1024, "depformer_dim_feedforward": int(4.125 * 1024), "depformer_num_heads": 16,
    "depformer_num_layers": 6, "depformer_layer_scale": None, "depformer_multi_linear": True,
    "depformer_context": 8, "depformer_max_period": 10000, "depformer_gating": "silu", "depformer_pos_emb": "none",
    "depformer_weights_per_step": True, "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}
MOSHI_2B_KWARGS: dict[str, Any] = {
    **MOSHI_7B_KWARGS, "dim": 2560, "num_heads": 20, "num_layers": 24, "max_period": 100000, "text_card": 48000,
    "n_q": 32, "dep_q": 16, "depformer_context": 16, "delays": [0, 0] + [2] * 15 + [0] + [2] * 15,
}
BENCH_111M_KWARGS: dict[str, Any] = {
    **MOSHI_7B_KWARGS, "dim": 512, "num_heads": 8, "num_layers": 6, "depformer_dim": 256,
    "depformer_dim_feedforward": int(4.125 * 256), "depformer_num_heads": 4, "depformer_num_layers": 4,
}
TINY_KWARGS: dict[str, Any] = {
    **MOSHI_7B_KWARGS, "dim": 64, "num_heads": 4, "num_layers": 2, "text_card": 512, "context": 256,
    "depformer_dim": 32, "depformer_dim_feedforward": int(4.125 * 32), "depformer_num_heads": 2,
    "depformer_num_layers": 2,
}
_SMALL_KWARGS: dict[str, Any] = {
    **TINY_KWARGS, "dim": 192, "num_heads": 4, "num_layers": 4, "card": 64, "context": 128,
}
STT_SMALL_KWARGS: dict[str, Any] = {
    **{k: v for k, v in _SMALL_KWARGS.items() if not k.startswith("depformer")}, "n_q": 8, "dep_q": 0,
    "delays": [0] * 9,
}
STT_BASE_KWARGS: dict[str, Any] = {**STT_SMALL_KWARGS, "dim": 512, "num_heads": 8, "num_layers": 8, "context": 256}
TTS_SMALL_KWARGS: dict[str, Any] = {
    **_SMALL_KWARGS, "n_q": 8, "dep_q": 8, "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1], "depformer_dim": 64,
    "depformer_dim_feedforward": int(4.125 * 64), "depformer_num_heads": 4, "depformer_num_layers": 2,
}
TTS_BASE_KWARGS: dict[str, Any] = {
    **TTS_SMALL_KWARGS, "dim": 512, "num_heads": 8, "num_layers": 8, "context": 256, "depformer_dim": 256,
    "depformer_dim_feedforward": int(4.125 * 256), "depformer_num_layers": 4,
}
