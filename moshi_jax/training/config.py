"""Training configuration: one frozen dataclass tree, Python presets in `configs/`, dotted CLI overrides.

    cfg = load_config("tiny", ["optimizer.lr=3e-4", "mesh.fsdp=2", "model.temporal.num_layers=2"])

`configs/<name>.py` defines `get_config() -> TrainConfig`. Every key is overridable with `key=value`
(`section.field=value`, nested as deep as the dataclasses go). Values are parsed by the field's type:
ints, floats (`3e-4`), bools (`true/false/1/0/yes/no`), strings, `none` for optional fields, comma lists
for tuples, `path:weight,path:weight` for data sources (as moshi-finetune), JSON for the axis rules.
`model.<field>=value` keys other than `model.preset` are overrides of the LM's own config (`LMConfig`),
checked against its fields when the LM config is built. Unknown keys and unparsable values raise
`ConfigError` naming the key and the accepted keys/values.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A bad configuration key or value (names the key and what is accepted)."""


# ----------------------------------------------------------------------------------------------- sections


def _positive(obj, *names: str) -> None:
    for n in names:
        if not getattr(obj, n) > 0:
            raise ConfigError(f"{type(obj).__name__}.{n} must be > 0, got {getattr(obj, n)!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The LM: a preset of `moshi_jax.lm.config.LMConfig` (its classmethod name) plus field overrides."""

    preset: str = "tiny"  # tiny | bench_111m | moshi_2b | moshi_7b
    # (dotted LMConfig field, raw value) pairs, applied in order on the preset; see `build_lm_config`.
    overrides: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class DataSource:
    path: str
    weight: float = 1.0

    def __post_init__(self):
        if not self.weight > 0:
            raise ConfigError(f"data source {self.path!r}: weight must be > 0, got {self.weight}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # Tokenized datasets (see moshi_jax.data), mixed by weight. Empty: see `builtin`.
    sources: tuple[DataSource, ...] = ()
    eval_sources: tuple[DataSource, ...] = ()
    seq_frames: int = 64  # T, frames of 80 ms per training sequence
    batch_size: int = 8  # global batch (sequences per optimizer step, all microbatches together)
    seed: int = 0
    num_workers: int = 0  # grain worker processes (0: in-process)
    # Text/audio shift in frames: > 0 text AFTER the audio it transcribes (streaming ASR), < 0 text BEFORE the
    # audio (streaming TTS), 0 Moshi's aligned inner monologue. See moshi_jax.data.pipeline.
    text_delay_frames: int = 0
    # What to train on when `sources` is empty: "speech" builds the built-in dataset (synthetic two-voice eSpeak
    # dialogues -> Mimi codes + text stream) into <run_dir>/data and uses it; "random": random token grids
    # (smoke tests of the machinery only: nothing to learn).
    builtin: str = "speech"
    # Training-time augmentation of the audio streams the LM reads but does not predict (every stream of an ASR
    # model, the user's streams of Moshi), never of a loss target and never in eval: `input_time_masks` spans
    # of 1..`input_time_mask_frames` frames per window become "no token" (-1, SpecAugment's time masks), then
    # each remaining token is replaced by a uniformly drawn code with probability `input_token_noise`.
    input_time_masks: int = 0
    input_time_mask_frames: int = 3
    input_token_noise: float = 0.0

    def __post_init__(self):
        _positive(self, "seq_frames", "batch_size", "input_time_mask_frames")
        if self.input_time_masks < 0:
            raise ConfigError(f"data.input_time_masks must be >= 0, got {self.input_time_masks}")
        if not 0.0 <= self.input_token_noise < 1.0:
            raise ConfigError(f"data.input_token_noise must be in [0, 1), got {self.input_token_noise}")
        if self.builtin not in BUILTIN_DATA:
            raise ConfigError(f"data.builtin must be one of {BUILTIN_DATA}, got {self.builtin!r}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW as moshi-finetune: betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on every trainable param."""

    lr: float = 1e-4  # peak learning rate
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # one_cycle: torch OneCycleLR (cosine, pct_start, div_factor, final_div_factor), moshi-finetune's choice.
    # cosine: linear warmup for warmup_steps then cosine to min_lr_ratio * lr. constant: warmup then flat.
    schedule: str = "one_cycle"
    pct_start: float = 0.05
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    # torch OneCycleLR's default cycle_momentum=True, which moshi-finetune keeps: Adam's beta1 is annealed
    # max_momentum -> base_momentum -> max_momentum opposite to the LR (so `b1` is unused with one_cycle).
    cycle_momentum: bool = True
    base_momentum: float = 0.85
    max_momentum: float = 0.95
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping
    microbatches: int = 1  # gradient accumulation: the batch is split into this many sequential chunks

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optimizer.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _positive(self, "lr", "microbatches")
        if not 0 < self.pct_start < 1:
            raise ConfigError(f"optimizer.pct_start must be in (0, 1), got {self.pct_start}")


SCHEDULES = ("one_cycle", "cosine", "constant")
BUILTIN_DATA = ("speech", "random")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """moshi-finetune loss weights (spec 4.1)."""

    text_padding_weight: float = 0.5  # weight of PAD / EPAD text targets
    first_codebook_weight_multiplier: float = 100.0  # semantic codebook weight


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (data, fsdp, tensor); one size may be -1 = all remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # Logical axis rules as ((logical_name, mesh_axes), ...); None: moshi_jax.training.mesh.LOGICAL_AXIS_RULES.
    # From the command line as JSON: mesh.rules='[["embed", "fsdp"], ["mlp", "tensor"], ["layers", null]]'.
    rules: tuple[tuple[str, Any], ...] | None = None

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"mesh sizes must be positive with at most one -1, got {sizes}")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ConfigError(f"mesh {tuple(sizes)} does not divide {num_devices} devices")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ConfigError(f"mesh {tuple(sizes)} needs {math.prod(sizes)} devices, {num_devices} available")
        return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    dir: str = ""  # "" -> <run_dir>/checkpoints
    every: int = 500  # save every N steps (and at the end)
    keep: int = 3  # keep the last K checkpoints
    async_save: bool = True
    resume: bool = True  # resume from the latest checkpoint in `dir` when there is one

    def __post_init__(self):
        _positive(self, "every", "keep")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA as moshi-finetune: every Linear gets W + scaling * B(A(x)); scaling is NOT divided by rank."""

    enabled: bool = False  # False: full fine-tuning (every param trained)
    rank: int = 64
    scaling: float = 2.0
    train_embeddings: bool = False  # moshi-finetune `ft_embed`: also train the embedding tables

    def __post_init__(self):
        _positive(self, "rank")


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    log_every: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    # Peak dense FLOP/s of one device for the MFU estimate (bf16). 0: guessed from the device kind.
    peak_flops_per_device: float = 0.0


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process runs (jax.distributed), see moshi_jax.training.distributed. Unset keys fall back to the
    MOSHI_JAX_COORDINATOR / MOSHI_JAX_NUM_PROCESSES / MOSHI_JAX_PROCESS_ID variables, then SLURM, then JAX's own
    detection (TPU pod slices)."""

    mode: str = "auto"  # auto: join when settings / SLURM / a Cloud TPU VM say so | on: always | off: never
    coordinator: str = ""  # host:port of process 0's coordinator service
    num_processes: int = 0  # 0: from the environment
    process_id: int = -1  # -1: from the environment
    initialization_timeout: int = 300  # seconds to wait for every process to join

    def __post_init__(self):
        if self.mode not in DISTRIBUTED_MODES:
            raise ConfigError(f"distributed.mode must be one of {DISTRIBUTED_MODES}, got {self.mode!r}")
        _positive(self, "initialization_timeout")


DISTRIBUTED_MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class CodecConfig:
    """Mimi (codec) training, used when `program="mimi"` (see moshi_jax.training.train_mimi; spec 1.5, 4.6).

    The codec's architecture is `model.preset` (`released` or a `MimiConfig` classmethod, e.g. `tiny`) with
    `model.<MimiConfig field>=value` overrides; the segment length is `data.seq_frames` 80 ms frames; the
    generator's optimizer is `optimizer`, the discriminator's is AdamW with the `disc_*` fields below."""

    # --- multi-scale STFT discriminator: one 2-D conv net per FFT size (hop = n_fft / 4, Hann window)
    disc_scales: tuple[int, ...] = (2048, 1024, 512, 256, 128)
    disc_filters: int = 32
    disc_lr: float = 3e-4
    disc_b1: float = 0.5
    disc_b2: float = 0.9
    # --- generator losses
    adversarial: str = "hinge"  # hinge | lsgan
    adv_weight: float = 3.0
    feat_weight: float = 3.0  # feature matching (L1 between discriminator activations, relative to |real|)
    mel_weight: float = 0.0  # multi-scale log-mel L1 reconstruction: off in the paper's recipe (ablations)
    l1_weight: float = 0.0  # waveform L1 reconstruction: off in the paper's recipe (ablations)
    mel_scales: tuple[int, ...] = (512, 1024, 2048)  # FFT sizes of the mel loss (hop = n_fft / 4)
    n_mels: int = 64
    # "balancer": the losses on the output audio are combined through their gradients w.r.t. the audio, each
    # normalised by an EMA of its norm then weighted (EnCodec's balancer); "fixed": plain weighted sum.
    loss_weighting: str = "balancer"
    balancer_decay: float = 0.999
    commit_weight: float = 1.0  # VQ commitment loss (MSE(x, sg(q)))
    distill_weight: float = 1.0  # semantic distillation (1 - cosine), 0 disables
    # --- quantizer training (reference core_vq.EuclideanCodebook / vq.ResidualVectorQuantizer)
    ema_decay: float = 0.99
    kmeans_iters: int = 50
    dead_code_every: int = 5  # check for unused codes every N steps
    dead_code_threshold: float = 0.1  # replace codes with usage < threshold x uniform usage
    replaced_usage_ratio: float = 1.0
    q_dropout: bool = True  # acoustic levels per step drawn uniformly in 1..n_q_acoustic
    no_quantization_rate: float = 0.5  # per-sequence probability of bypassing the quantizer (paper: ~50 %)
    # --- semantic distillation teacher: "logmel" (built-in deterministic log-mel features, a stand-in for
    # WavLM), "precomputed" (`<audio>.teacher.npy` beside every audio file, e.g. WavLM features at any rate)
    teacher: str = "logmel"
    teacher_dim: int = 64  # feature width (logmel: its number of mel bands)
    # --- weight EMA of the generator (exported); 0 disables
    weight_ema: float = 0.999
    # --- generator init when training from scratch: "signal" (He-uniform conv kernels, zero biases: the signal
    # reaches the output; see train_mimi.signal_preserving_init) or "reference" (the modules' PyTorch-default
    # init, under which a fresh decoder's output ignores its input)
    init: str = "signal"

    def __post_init__(self):
        _positive(self, "disc_filters", "disc_lr", "n_mels", "teacher_dim", "kmeans_iters", "dead_code_every")
        for key, allowed in (("adversarial", ("hinge", "lsgan")), ("loss_weighting", ("balancer", "fixed")),
                             ("teacher", ("logmel", "precomputed")), ("init", ("signal", "reference"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"codec.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if not self.disc_scales:
            raise ConfigError("codec.disc_scales must name at least one FFT size")
        if not 0 <= self.no_quantization_rate < 1:
            raise ConfigError(f"codec.no_quantization_rate must be in [0, 1), got {self.no_quantization_rate}")
        for key in ("ema_decay", "weight_ema", "balancer_decay"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"codec.{key} must be in [0, 1), got {getattr(self, key)}")


PROGRAMS = ("lm", "mimi")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    name: str = "run"
    program: str = "lm"  # what is trained: lm (the Moshi LM, `model` = an LMConfig) | mimi (`model` = a MimiConfig)
    run_dir: str = ""  # "" -> runs/<name>
    steps: int = 100  # optimizer steps in the whole run (the schedule's length)
    seed: int = 0
    compute_dtype: str = "bfloat16"  # activations / matmuls; params are cast inside the step
    param_dtype: str = "float32"  # master weights and optimizer state
    remat: str = "none"  # per-layer rematerialisation: none | full | dots | dots_no_batch
    scan_layers: bool = True  # False: unroll the layer stacks in the train step (faster for shallow models)
    init_from: str | None = None  # reference checkpoint (safetensors, or hf://ORG/NAME[/FILE]) to start from
    # A moshi-finetune LoRA adapter (lora.safetensors of the same base; its config.json beside it gives the
    # scaling) to continue from: needs lora.enabled with the adapter's rank, and init_from = its base weights.
    init_lora_from: str | None = None
    eval_every: int = 0  # 0: no eval
    # A step whose loss or gradient norm is NaN/inf never updates the params (see training/step.py). "stop": the
    # run ends with an error naming the step (no checkpoint is written after it); "skip": the update is skipped,
    # counted (metric `nonfinite`, report `skipped_steps`) and training goes on.
    nan_policy: str = "stop"
    eval_batches: int = 4
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossConfig = LossConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    lora: LoraConfig = LoraConfig()
    metrics: MetricsConfig = MetricsConfig()
    distributed: DistributedConfig = DistributedConfig()
    codec: CodecConfig = CodecConfig()

    def __post_init__(self):
        _positive(self, "steps")
        if self.program not in PROGRAMS:
            raise ConfigError(f"program must be one of {PROGRAMS}, got {self.program!r}")
        for key in ("compute_dtype", "param_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(f"{key} must be one of {DTYPES}, got {getattr(self, key)!r}")
        if self.remat not in REMAT:
            raise ConfigError(f"remat must be one of {REMAT}, got {self.remat!r}")
        if self.nan_policy not in NAN_POLICIES:
            raise ConfigError(f"nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        if self.data.batch_size % self.optimizer.microbatches:
            raise ConfigError(f"data.batch_size {self.data.batch_size} is not divisible by "
                              f"optimizer.microbatches {self.optimizer.microbatches}")

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.resolved_run_dir / "checkpoints"


DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots", "dots_no_batch")
NAN_POLICIES = ("stop", "skip")


def check_paths(cfg: TrainConfig) -> None:
    """The run's paths, checked before any data is built or model compiled: run_dir and checkpoint.dir must be
    (or be creatable as) folders, init_from and local data sources must exist. Raises ConfigError."""
    from moshi_jax.io_atomic import OutputPathError, check_output_path

    for key, path in (("run_dir", cfg.resolved_run_dir), ("checkpoint.dir", cfg.checkpoint_dir)):
        try:
            check_output_path(path, "dir")
        except OutputPathError as e:
            raise ConfigError(f"{key}: {e}") from None
    if cfg.init_from and "://" not in cfg.init_from and not Path(cfg.init_from).is_file():
        raise ConfigError(f"init_from: no such file {cfg.init_from}")
    for key, sources in (("data.sources", cfg.data.sources), ("data.eval_sources", cfg.data.eval_sources)):
        for src in sources:
            if "://" not in src.path and not Path(src.path).exists():
                raise ConfigError(f"{key}: {src.path} not found")


# ----------------------------------------------------------------------------------------------- loading


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))


def get_preset(name: str) -> TrainConfig:
    """`configs/<name>.py:get_config()`, or a path to any such .py file."""
    path = Path(name)
    if path.suffix != ".py":
        path = CONFIGS_DIR / f"{name}.py"
    if not path.is_file():
        raise ConfigError(f"unknown config {name!r}; available: {available_configs()} (or a path to a .py file)")
    spec = importlib.util.spec_from_file_location(f"_moshi_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, expected TrainConfig")
    return cfg


def load_config(name: str, overrides: typing.Sequence[str] = (), check_model: bool = True) -> TrainConfig:
    """Preset `name` with `key=value` overrides applied in order. With `check_model`, the LM overrides
    are validated by building the LM config (needs moshi_jax.lm)."""
    cfg = apply_overrides(get_preset(name), overrides)
    if check_model:
        build_mimi_config(cfg) if cfg.program == "mimi" else build_lm_config(cfg)
    return cfg


def apply_overrides(cfg: Any, overrides: typing.Sequence[str]) -> Any:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        cfg = override(cfg, key.strip(), raw.strip())
    return cfg


def override(cfg: Any, dotted: str, raw: str, _prefix: str = "") -> Any:
    """A copy of dataclass `cfg` with the field at `dotted` set from the string `raw`."""
    head, _, rest = dotted.partition(".")
    full = _prefix + head
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    if head not in fields:
        raise ConfigError(f"unknown config key {full!r}; valid keys here: {sorted(fields)}")
    hints = typing.get_type_hints(type(cfg))
    current = getattr(cfg, head)
    if isinstance(current, ModelConfig) and rest and rest != "preset":
        value = dataclasses.replace(current, overrides=current.overrides + ((rest, raw),))
    elif rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"config key {full!r} is a value, not a section (got {full}.{rest})")
        value = override(current, rest, raw, full + ".")
    else:
        if dataclasses.is_dataclass(current) and not isinstance(current, DataSource):
            raise ConfigError(f"config key {full!r} is a section; set one of its fields "
                              f"{[f.name for f in dataclasses.fields(current)]}")
        value = parse_value(raw, hints[head], full)
    try:
        return dataclasses.replace(cfg, **{head: value})
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{full}={raw!r}: {e}") from e


_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def parse_value(raw: str, tp: Any, key: str) -> Any:
    """Parse the string `raw` as type `tp` (a field annotation)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if type(None) in args and raw.lower() in ("none", "null", ""):
            return None
        if len(non_none) == 1:
            return parse_value(raw, non_none[0], key)
        raise ConfigError(f"{key}: unsupported union type {tp}")
    if key.endswith("rules"):
        try:
            rules = json.loads(raw)
            return tuple((str(name), tuple(ax) if isinstance(ax, list) else ax) for name, ax in rules)
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ConfigError(f"{key}: expected JSON [[logical_name, mesh_axis_or_list_or_null], ...], got {raw!r}"
                              ) from e
    if origin is tuple:
        if args and args[0] is DataSource:
            return tuple(_parse_source(s, key) for s in raw.split(",") if s) if raw else ()
        item_tp = args[0] if args else str
        return tuple(parse_value(s, item_tp, key) for s in raw.split(",") if s) if raw else ()
    if tp is bool:
        if raw.lower() not in _BOOLS:
            raise ConfigError(f"{key}: expected a bool (true/false), got {raw!r}")
        return _BOOLS[raw.lower()]
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            try:
                f = float(raw)  # "1e3"
            except ValueError:
                raise ConfigError(f"{key}: expected an int, got {raw!r}") from None
            if f != int(f):
                raise ConfigError(f"{key}: expected an int, got {raw!r}") from None
            return int(f)
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{key}: expected a float, got {raw!r}") from None
    if tp is str:
        return raw
    raise ConfigError(f"{key}: cannot parse a value of type {tp} from the command line")


def _parse_source(item: str, key: str) -> DataSource:
    path, sep, weight = item.rpartition(":")
    if not sep or not path:
        return DataSource(item)
    try:
        w = float(weight)
    except ValueError:
        return DataSource(item)  # a ':' inside the path (e.g. gs://) and no weight
    return DataSource(path, w)


# ----------------------------------------------------------------------------------------------- json


def to_dict(cfg: Any) -> Any:
    """JSON-compatible nested dict of a config tree (tuples -> lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple | list):
        return [to_dict(x) for x in cfg]
    return cfg


def from_dict(cls: type, d: dict) -> Any:
    """Inverse of `to_dict` (unknown keys are errors)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    kwargs = {k: _from_json(v, hints[k]) for k, v in d.items()}
    return cls(**kwargs)


def _from_json(v: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if v is None:
        return None
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return _from_json(v, non_none[0])
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, v)
    if origin is tuple:
        item_tp = args[0] if args else Any
        return tuple(_from_json(x, item_tp) for x in v)
    if tp is Any:
        return tuple(_from_json(x, Any) for x in v) if isinstance(v, list) else v
    return v


def to_json(cfg: TrainConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def from_json(text: str) -> TrainConfig:
    return from_dict(TrainConfig, json.loads(text))


# ----------------------------------------------------------------------------------------------- LM config


def build_lm_config(cfg: TrainConfig):
    """The LMConfig of this run: `LMConfig.<preset>()` with `model.overrides`, compute dtype and remat
    applied. Raises ConfigError for an unknown preset or LMConfig field."""
    from moshi_jax.lm.config import LMConfig

    presets = sorted(n for n, v in vars(LMConfig).items() if isinstance(v, classmethod | staticmethod))
    if cfg.model.preset not in presets:
        raise ConfigError(f"model.preset {cfg.model.preset!r} unknown; LMConfig presets: {presets}")
    lm = getattr(LMConfig, cfg.model.preset)()
    for key, raw in cfg.model.overrides:
        try:
            lm = override(lm, key, raw, "model.")
        except ConfigError as e:
            raise ConfigError(f"{e} (LMConfig override)") from None
    return _apply_compute_settings(lm, cfg)


def _apply_compute_settings(lm: Any, cfg: TrainConfig) -> Any:
    """Set compute dtype / param dtype / remat / scan_layers on the LM config and on every nested dataclass that
    has those fields (e.g. the temporal and depth TransformerConfigs): one source of truth, the TrainConfig."""
    updates = {}
    for f in dataclasses.fields(lm):
        value = getattr(lm, f.name)
        if f.name == "dtype":
            updates[f.name] = cfg.compute_dtype
        elif f.name == "param_dtype":
            updates[f.name] = cfg.param_dtype
        elif f.name == "remat":
            updates[f.name] = cfg.remat
        elif f.name == "scan_layers":
            updates[f.name] = cfg.scan_layers
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            updates[f.name] = _apply_compute_settings(value, cfg)
    return dataclasses.replace(lm, **updates) if updates else lm


def build_mimi_config(cfg: TrainConfig):
    """The MimiConfig of a codec run: `model.preset` (`released` = the released codec, or a MimiConfig
    classmethod such as `tiny`) with `model.overrides`. Raises ConfigError for an unknown preset or field."""
    from moshi_jax.mimi.config import MimiConfig

    presets = ["released"] + sorted(n for n, v in vars(MimiConfig).items() if isinstance(v, classmethod))
    if cfg.model.preset not in presets:
        raise ConfigError(f"model.preset {cfg.model.preset!r} unknown for program=mimi; Mimi presets: {presets}")
    mimi = MimiConfig() if cfg.model.preset == "released" else getattr(MimiConfig, cfg.model.preset)()
    # All overrides at once (validated together: e.g. sample_rate and ratios only fit each other).
    fields, hints, values = {f.name for f in dataclasses.fields(MimiConfig)}, typing.get_type_hints(MimiConfig), {}
    for key, raw in cfg.model.overrides:
        if key not in fields:
            raise ConfigError(f"unknown config key 'model.{key}' for program=mimi; MimiConfig fields: {sorted(fields)}")
        values[key] = parse_value(raw, hints[key], f"model.{key}")
    try:
        return dataclasses.replace(mimi, **values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model overrides {dict(cfg.model.overrides)}: {e} (MimiConfig)") from None


def main_overrides(argv: typing.Sequence[str]) -> tuple[str, list[str]]:
    """Split `[config_name, key=value, ...]` argv; the config defaults to 'tiny'."""
    argv = list(argv)
    name = "tiny"
    if argv and "=" not in argv[0]:
        name = argv.pop(0)
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ConfigError(f"expected key=value overrides, got {bad}")
    return name, argv

