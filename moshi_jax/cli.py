"""The `moshi-jax` command. Thin: parses arguments and dispatches to the library."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("moshi_jax")


class CLIError(Exception):
    """A user mistake (bad argument, path or input): one log line without a traceback, exit status 2."""

    exit_code = 2


class JobError(CLIError):
    """The job ran but cannot give a correct result (training diverged, NaN output, nothing produced):
    one log line, exit status 1."""

    exit_code = 1


def _output_file(path: str) -> None:
    """Checks of a file the command will write, done before any model is built."""
    from moshi_jax.io_atomic import OutputPathError, check_output_path

    try:
        check_output_path(path, "file")
    except OutputPathError as e:
        raise CLIError(str(e)) from None


def _output_dir(path: str) -> None:
    from moshi_jax.io_atomic import OutputPathError, check_output_path

    try:
        check_output_path(path, "dir")
    except OutputPathError as e:
        raise CLIError(str(e)) from None


def _at_least(flag: str, value, low) -> None:
    if value is not None and not value >= low:
        raise CLIError(f"{flag} must be >= {low}, got {value}")


def _input_file(flag: str, path: str | None) -> None:
    if path is not None and not Path(path).is_file():
        what = "is a folder, not a file" if Path(path).is_dir() else "not found"
        raise CLIError(f"{flag} {path}: {what}")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


# ---------------------------------------------------------------------------------------------- hub


def _add_hub_args(q, what: str) -> None:
    """`--hf-repo ORG/NAME [--revision REV]`: take `what` from a Hugging Face repository (moshi_jax.hub)."""
    q.add_argument("--hf-repo", default=None, metavar="ORG/NAME",
                   help=f"Hugging Face repository to take {what} from (e.g. kyutai/moshiko-pytorch-bf16), through "
                        "the local HF cache ($HF_HOME / $HF_HUB_CACHE; HF_HUB_OFFLINE=1: cache only)")
    q.add_argument("--revision", default=None, help="branch, tag or commit of --hf-repo / hf:// paths (default main)")


def _resolve_hub(args: argparse.Namespace) -> None:
    """Turn `--hf-repo` and `hf://ORG/NAME/FILE` arguments into local paths (in the HF cache), in place, before
    a command runs; a missing repository or file is a one-line CLIError naming it."""
    from moshi_jax import hub

    hf_repo, revision = getattr(args, "hf_repo", None), getattr(args, "revision", None)
    try:
        if hasattr(args, "weights_dir"):  # chat / asr / tts / serve: a whole repository
            args.weights_dir = hub.resolve_weights_dir(args.weights_dir, hf_repo, revision)
        elif hasattr(args, "weights"):  # codec: the repository's Mimi file
            if hf_repo is not None and args.weights is not None:
                raise CLIError("give either --weights or --hf-repo, not both")
            spec = f"hf://{hf_repo}" if hf_repo is not None else args.weights
            args.weights = hub.resolve_weights(spec, "mimi_name", revision)
        for name in ("mimi_weights", "tokenizer"):
            if isinstance(getattr(args, name, None), str):
                key = "mimi_name" if name == "mimi_weights" else "tokenizer_name"
                setattr(args, name, str(hub.resolve_weights(getattr(args, name), key, revision)))
    except hub.HubError as e:
        raise CLIError(str(e)) from e
    if isinstance(getattr(args, "weights", None), Path):
        args.weights = str(args.weights)


# ---------------------------------------------------------------------------------------------- codec


def _mimi_config(preset: str, weights: str | None = None):
    """The preset's MimiConfig, or the config saved beside trained weights (`<weights stem>.json`)."""
    from moshi_jax.mimi import checkpoint as mimi_ckpt
    from moshi_jax.mimi.config import MimiConfig

    try:
        beside = mimi_ckpt.config_beside(weights)
    except ValueError as e:
        raise CLIError(str(e)) from e
    if beside is not None:
        return beside
    return MimiConfig() if preset == "released" else MimiConfig.tiny()


def _load_codec(weights: str | None, seed: int, preset: str = "released"):

    from moshi_jax.mimi import checkpoint as mimi_ckpt
    from moshi_jax.mimi.model import MimiCodec

    cfg = _mimi_config(preset, weights)
    codec = MimiCodec(cfg)
    try:
        params = mimi_ckpt.load_or_random(weights, cfg, seed)
    except ValueError as e:
        raise CLIError(str(e)) from e
    return cfg, codec, params


def _read_audio(path: str | None, sample_rate: int):
    """[1, T] float32 at `sample_rate` (the built-in speech sample without `path`)."""
    import numpy as np

    from moshi_jax.audio import AudioError, load_audio

    if path is None:
        from moshi_jax.data.speech_synth import builtin_sample

        log.info("no input given: using the built-in speech sample (synthesised locally with eSpeak NG)")
        return np.asarray(builtin_sample(), np.float32)[None]
    try:
        return load_audio(path, sample_rate=sample_rate, mono=True)
    except AudioError as e:
        raise CLIError(str(e)) from e


def _encode(codec, params, wav, num_codebooks: int | None, chunk_frames: int):
    """wav [1, T] -> codes [K, F], streamed in fixed-size chunks (constant memory, one compile)."""
    import numpy as np
    from tqdm import tqdm

    frame = codec.cfg.frame_size
    n_frames = -(-wav.shape[-1] // frame)
    padded = np.zeros((1, 1, n_frames * frame), np.float32)
    padded[0, 0, : wav.shape[-1]] = wav[0]
    n_chunks = -(-n_frames // chunk_frames)
    padded = np.pad(padded, ((0, 0), (0, 0), (0, n_chunks * chunk_frames * frame - padded.shape[-1])))
    state = codec.init_state(1, num_codebooks=num_codebooks)
    out = []
    for i in tqdm(range(n_chunks), desc="encode", unit="chunk", disable=n_chunks < 2):
        chunk = padded[..., i * chunk_frames * frame: (i + 1) * chunk_frames * frame]
        state, codes = codec.encode_chunk(params, state, chunk)
        out.append(np.asarray(codes))
    return np.concatenate(out, axis=-1)[0, :, :n_frames]


def _decode(codec, params, codes, chunk_frames: int):
    """codes [K, F] -> wav [F * frame_size], streamed in fixed-size chunks."""
    import numpy as np
    from tqdm import tqdm

    K, F = codes.shape
    n_chunks = -(-F // chunk_frames)
    padded = np.zeros((1, K, n_chunks * chunk_frames), np.int32)
    padded[0, :, :F] = codes
    state = codec.init_state(1, num_codebooks=K)
    out = []
    for i in tqdm(range(n_chunks), desc="decode", unit="chunk", disable=n_chunks < 2):
        state, wav = codec.decode_chunk(params, state, padded[..., i * chunk_frames: (i + 1) * chunk_frames])
        wav = np.asarray(wav)
        if not np.isfinite(wav).all():
            start = i * chunk_frames / codec.cfg.frame_rate
            raise JobError(f"the decoder produced NaN/inf samples at {start:.2f}-"
                           f"{start + chunk_frames / codec.cfg.frame_rate:.2f} s (broken weights?); nothing written")
        out.append(wav)
    return np.concatenate(out, axis=-1)[0, 0, : F * codec.cfg.frame_size]


def _check_codes(codes, cfg) -> None:
    import numpy as np

    if not np.issubdtype(codes.dtype, np.integer):
        raise CLIError(f"codes must be integers, got dtype {codes.dtype}")
    if codes.ndim != 2:
        raise CLIError(f"codes must have shape [K, T], got {codes.shape}")
    K, T = codes.shape
    if not 1 <= K <= cfg.n_q:
        raise CLIError(f"codes have {K} codebooks; this Mimi supports 1..{cfg.n_q}")
    if T == 0:
        raise CLIError("codes have no frames")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= cfg.bins:
        raise CLIError(f"code values must be in [0, {cfg.bins - 1}], found range [{lo}, {hi}]")


def cmd_codec(args: argparse.Namespace) -> None:
    import numpy as np

    from moshi_jax.audio import AudioError, save_audio
    from moshi_jax.io_atomic import atomic_path

    # every argument, path and input is checked before the codec is built
    _input_file("--weights", args.weights)
    cfg = _mimi_config(args.preset, args.weights)
    _output_file(args.output)
    _at_least("--chunk-frames", args.chunk_frames, 1)
    k = cfg.num_codebooks if getattr(args, "num_codebooks", None) is None else args.num_codebooks
    if not 1 <= k <= cfg.n_q:
        raise CLIError(f"--num-codebooks must be in 1..{cfg.n_q}, got {k}")
    wav = None
    if args.codec_cmd in ("encode", "roundtrip"):
        wav = _read_audio(args.input, cfg.sample_rate)
    if args.codec_cmd == "decode":
        try:
            codes = np.load(args.input, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CLIError(f"cannot read codes from {args.input}: {e}") from e
        _check_codes(codes, cfg)
    cfg, codec, params = _load_codec(args.weights, args.seed, args.preset)
    if args.codec_cmd in ("encode", "roundtrip"):
        log.info("encoding %.2f s of audio with %d codebooks", wav.shape[-1] / cfg.sample_rate, k)
        codes = _encode(codec, params, wav, k, args.chunk_frames)
        log.info("codes: %s (%d frames at %.1f Hz)", codes.shape, codes.shape[-1], cfg.frame_rate)
        if args.codec_cmd == "encode":
            with atomic_path(args.output) as tmp, open(tmp, "wb") as f:  # exactly -o (np.save(path) adds .npy)
                np.save(f, codes.astype(np.int32))
            log.info("wrote %s", args.output)
            return
    out = _decode(codec, params, codes, args.chunk_frames)
    if args.codec_cmd == "roundtrip":
        out = out[: wav.shape[-1]]  # drop the zero padding of the last frame
    try:
        save_audio(args.output, out, cfg.sample_rate)
    except AudioError as e:
        raise JobError(str(e)) from e
    log.info("wrote %s (%.2f s at %d Hz)", args.output, out.shape[-1] / cfg.sample_rate, cfg.sample_rate)


def _add_codec(sub) -> None:
    p = sub.add_parser("codec", help="Mimi neural audio codec: encode / decode / roundtrip",
                       description="Mimi neural audio codec (24 kHz mono <-> 12.5 Hz codes).")
    csub = p.add_subparsers(dest="codec_cmd", required=True)

    def common(q):
        q.add_argument("--weights", help="reference Mimi safetensors (tokenizer-e351c8d8-checkpoint125.safetensors) "
                                         "or a codec trained by `moshi-jax train mimi*` (its mimi.json beside it "
                                         "gives the config), a local path or hf://ORG/NAME/FILE; without it (and "
                                         "--hf-repo) a seeded random model is used (with a warning)")
        _add_hub_args(q, "the Mimi weights (its config.json mimi_name)")
        q.add_argument("--seed", type=int, default=0, help="seed of the random model when --weights is absent")
        q.add_argument("--preset", choices=("released", "tiny"), default="released",
                       help="Mimi configuration (tiny: a small random codec for smoke tests)")
        q.add_argument("--chunk-frames", type=int, default=125,
                       help="80 ms frames per compiled streaming chunk (memory stays constant)")

    e = csub.add_parser("encode", help="audio file -> codes .npy [K, T]",
                        description="Encode any audio file (resampled to 24 kHz mono) into integer codes [K, T].")
    e.add_argument("input", help="audio file (any rate / channel count libsndfile reads)")
    e.add_argument("-o", "--output", required=True, help="output file, written as .npy (int32 [K, T]) under exactly "
                                                         "this name")
    e.add_argument("--num-codebooks", type=int, default=None, help="codebooks to keep (1..32, default 8)")
    common(e)
    d = csub.add_parser("decode", help="codes .npy [K, T] -> 24 kHz float WAV",
                        description="Decode integer codes [K, T] into 24 kHz mono float WAV.")
    d.add_argument("input", help="codes .npy (integer [K, T])")
    d.add_argument("-o", "--output", required=True, help="output .wav")
    common(d)
    r = csub.add_parser("roundtrip", help="audio -> codes -> audio",
                        description="Encode then decode. Without INPUT, uses a built-in speech sample.")
    r.add_argument("input", nargs="?", default=None, help="audio file (default: built-in eSpeak NG sample)")
    r.add_argument("-o", "--output", required=True, help="output .wav")
    r.add_argument("--num-codebooks", type=int, default=None, help="codebooks to use (1..32, default 8)")
    common(r)
    p.set_defaults(func=cmd_codec)


def _add_train(sub) -> None:
    """`moshi-jax train [CONFIG] [key=value ...]`; the job itself is moshi_jax.training.train_lm."""

    def cmd_train(args: argparse.Namespace) -> None:
        from moshi_jax.training import config as config_lib
        from moshi_jax.training import train_lm, train_mimi
        from moshi_jax.training.checkpointing import CheckpointCorruptError, CheckpointMismatchError
        from moshi_jax.training.loop import TrainingDivergedError

        if args.list_configs:
            for name in config_lib.available_configs():
                print(f"{name:8s} {config_lib.CONFIGS_DIR / (name + '.py')}")
            return
        overrides = list(args.overrides)
        name = args.config_path
        if args.config is not None and "=" in args.config:  # `moshi-jax train steps=10`: no config name given
            overrides.insert(0, args.config)
        elif args.config is not None:
            if name is not None:
                raise CLIError(f"config given twice: {args.config!r} and --config {name!r}")
            name = args.config
        from moshi_jax.finite import NonFiniteError

        user_errors: tuple[type[Exception], ...] = (config_lib.ConfigError, CheckpointMismatchError,
                                                    NonFiniteError)  # NaN in init_from's weights
        try:  # unusable data sources are user errors too
            from moshi_jax.data.codec_audio import CodecDataError
            from moshi_jax.data.pipeline import DataConfigError
            from moshi_jax.data.records import RecordError

            user_errors += (DataConfigError, RecordError, CodecDataError)
        except ImportError:
            pass
        if args.hf_repo is not None:  # the repository's LM weights (its config.json moshi_name) as init_from
            overrides.insert(0, f"init_from=hf://{args.hf_repo}" + (f"@{args.revision}" if args.revision else ""))
        elif args.revision is not None:
            raise CLIError("--revision applies to --hf-repo; for init_from use hf://ORG/NAME/FILE@REV")
        try:
            cfg = config_lib.load_config(name or "tiny", overrides)
            _check_hub_sources(cfg)
            if args.print_config:
                print(config_lib.to_json(cfg))
                return
            train_lm.setup_logging(logging.DEBUG if args.verbose else logging.INFO)
            from moshi_jax.training import distributed

            distributed.join(cfg)  # multi-process runs (TPU pod, SLURM, explicit): before any JAX backend use
            (train_mimi.run if cfg.program == "mimi" else train_lm.run)(cfg)  # dispatch on the program kind
        except user_errors as e:
            raise CLIError(str(e)) from e
        except (TrainingDivergedError, CheckpointCorruptError) as e:
            raise JobError(str(e)) from e

    p = sub.add_parser(
        "train", help="train / fine-tune the Moshi LM (default: tiny model on a built-in speech dataset)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train or fine-tune the Moshi LM on a device mesh, with checkpoints (resumed automatically), "
                    "TensorBoard metrics, a progress bar and a final report.\n\n"
                    "Without data.sources it builds a small built-in dataset (synthetic two-voice eSpeak NG "
                    "dialogues with word timestamps, tokenized with Mimi) into <run_dir>/data and trains on it.",
        epilog="examples:\n"
               "  moshi-jax train                                   # tiny config, built-in data, CPU, minutes\n"
               "  moshi-jax train tiny steps=500 optimizer.lr=1e-3 run_dir=runs/t2\n"
               "  moshi-jax train --config configs/7b.py init_from=model.safetensors data.sources=/data/a:1.0\n"
               "  moshi-jax train 100m --print-config               # the resolved config as JSON\n"
               "  moshi-jax train mimi_tiny                         # train the Mimi codec (program=mimi)\n"
               "several hosts (TPU pod slice, SLURM, MOSHI_JAX_COORDINATOR/_NUM_PROCESSES/_PROCESS_ID): run the same "
               "command on every host (README: Several hosts)\n"
               "keys: any field of moshi_jax.training.config.TrainConfig as section.field=value "
               "(model.<field> overrides the LM config)")
    p.add_argument("config", nargs="?", default=None,
                   help="preset name in configs/ (tiny, 100m, 2b, 7b) or a path to a .py config (default tiny)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=200 mesh.fsdp=4")
    p.add_argument("--config", dest="config_path", default=None, help="same as the positional CONFIG")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--list-configs", action="store_true", help="list the presets in configs/ and exit")
    _add_hub_args(p, "the initial LM weights (init_from=hf://ORG/NAME[/FILE][@REV] does the same)")
    p.set_defaults(func=cmd_train)


def _check_hub_sources(cfg) -> None:
    """Fetch (or find in the HF cache) the hf:// weights a training config names, before any data is prepared,
    so that a missing repository or file fails at once with its one-line error."""
    from moshi_jax import hub

    for key, spec, name in (("init_from", cfg.init_from, "moshi_name"),
                            ("init_lora_from", cfg.init_lora_from, "lora_name")):
        if hub.is_hub_path(spec):
            try:
                log.info("%s %s -> %s", key, spec, hub.resolve_weights(spec, name))
            except hub.HubError as e:
                raise CLIError(f"{key}: {e}") from e


def _add_export(sub) -> None:
    """`moshi-jax export RUN_DIR [--step N | --best] -o OUT`; the job is moshi_jax.training.export."""

    def cmd_export(args: argparse.Namespace) -> None:
        from moshi_jax import hub
        from moshi_jax.training import export
        from moshi_jax.training.checkpointing import CheckpointMismatchError
        from moshi_jax.training.config import ConfigError
        from moshi_jax.training.lora_adapter import AdapterError

        req = export.ExportRequest(Path(args.run_dir), Path(args.output), step=args.step, best=args.best,
                                   dtype=args.dtype, lora_only=args.lora_only, progress=not args.no_progress)
        try:
            result = export.export_run(req)
        except (export.ExportError, CheckpointMismatchError, ConfigError, AdapterError, hub.HubError,
                FileNotFoundError) as e:
            raise CLIError(str(e)) from e
        for line in result.summary().splitlines():
            log.info("%s", line)

    p = sub.add_parser(
        "export", help="export a training run's checkpoint: merged reference weights or a LoRA adapter",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write one step of a training run (its Orbax checkpoints) in the reference layout: merged "
                    "weights (model.safetensors + config.json, read by the reference loaders and by moshi-jax "
                    "--weights-dir / init_from), or with --lora-only the LoRA adapter as moshi-finetune writes it "
                    "(lora.safetensors + config.json with lora, lora_rank, lora_scaling) for "
                    "`python -m moshi.server --lora-weight lora.safetensors --config-path config.json`.",
        epilog="examples:\n"
               "  moshi-jax export runs/tiny -o out/                  # latest checkpoint, merged, float32\n"
               "  moshi-jax export runs/ft --step 5000 --dtype bfloat16 -o out/\n"
               "  moshi-jax export runs/ft --best --lora-only -o adapter/\n"
               "--best: of the checkpoints still on disk, the step with the lowest eval loss in "
               "RUN_DIR/metrics.jsonl (evals every eval_every steps and at the end).")
    p.add_argument("run_dir", help="the run directory (holds config.json, checkpoints/, metrics.jsonl)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="the checkpoint step to export (default: the latest)")
    which.add_argument("--best", action="store_true", help="the kept checkpoint with the lowest eval loss")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32", help="tensor dtype (default float32)")
    p.add_argument("--lora-only", action="store_true",
                   help="write only the LoRA adapter (+ config.json switching LoRA on) instead of merged weights")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_export)


def _add_data(sub) -> None:
    """`moshi-jax data tokenize | tokenize-text | builtin | inspect`; the jobs live in moshi_jax.data.tokenize."""

    def cmd_data(args: argparse.Namespace) -> None:
        import json

        from moshi_jax.data import tokenize
        from moshi_jax.data.records import RecordError, TokenizedDataset

        if args.data_cmd != "inspect":
            _output_dir(args.output)
        if args.data_cmd == "builtin":
            _at_least("--num-dialogues", args.num_dialogues, 1)
            if args.seconds is not None and not args.seconds > 0:
                raise CLIError(f"--seconds must be > 0, got {args.seconds}")
        try:
            if args.data_cmd == "tokenize":
                speakers = tuple(s for s in args.speakers.split(",") if s) if args.speakers else None
                opts = tokenize.TokenizeOptions(
                    num_codebooks=args.num_codebooks, batch_size=args.batch_size, chunk_frames=args.chunk_frames,
                    on_error=args.on_error, allow_mono=args.allow_mono, resample=not args.no_resample,
                    main_speaker=args.main_speaker, speakers=speakers, records_per_shard=args.records_per_shard,
                    epad_every_word=args.epad_every_word, progress=not args.no_progress)
                index = tokenize.tokenize_dataset(args.manifest, args.output, mimi_weights=args.mimi_weights,
                                                  mimi_preset=args.mimi_preset, mimi_seed=args.seed,
                                                  tokenizer=args.tokenizer, options=opts)
                log.info("wrote %s", index)
            elif args.data_cmd == "tokenize-text":
                log.info("wrote %s", tokenize.tokenize_text(args.inputs, args.output, args.tokenizer,
                                                            add_bos_eos=not args.no_bos_eos))
            elif args.data_cmd == "synth":
                from moshi_jax.data import speech_corpus

                _at_least("--sentences", args.sentences, 1)
                _at_least("--heldout-sentences", args.heldout_sentences, 1)
                _at_least("--per-sentence", args.per_sentence, 1)
                try:
                    path = speech_corpus.build_corpus(
                        args.output, num_sentences=args.sentences, num_heldout=args.heldout_sentences,
                        seed=args.seed, per_sentence=args.per_sentence, tokenize=not args.no_tokenize,
                        mimi_preset=args.mimi_preset, mimi_weights=args.mimi_weights,
                        num_codebooks=args.num_codebooks, trailing_silence=args.trailing_silence,
                        progress=not args.no_progress)
                except ValueError as e:
                    raise CLIError(str(e)) from e
                log.info("corpus: %s", path)
            elif args.data_cmd == "builtin":
                sizes = {k: v for k, v in (("num_dialogues", args.num_dialogues), ("seconds", args.seconds))
                         if v is not None}
                path = tokenize.prepare_builtin_dataset(
                    args.output, seed=args.seed, mimi_preset=args.mimi_preset, mimi_weights=args.mimi_weights,
                    progress=not args.no_progress, **sizes)
                log.info("built-in dataset: %s (use it as data.sources=%s)", path, path)
            else:
                ds = TokenizedDataset.open(args.dataset)
                summary = {"kind": ds.kind, "counts": ds.index["counts"], "config": ds.index["config"],
                           "skipped": ds.index["skipped"]}
                print(json.dumps(summary, indent=2))
        except tokenize.NothingProducedError as e:
            raise JobError(str(e)) from e
        except (tokenize.TokenizeError, RecordError) as e:
            raise CLIError(str(e)) from e

    p = sub.add_parser("data", help="datasets: tokenize audio / text for training, build the built-in dataset",
                       description="Prepare training data: Mimi codes + aligned text in ArrayRecord shards.")
    dsub = p.add_subparsers(dest="data_cmd", required=True)

    def mimi_args(q):
        q.add_argument("--mimi-weights", default=None,
                       help="reference Mimi safetensors (tokenizer-e351c8d8-checkpoint125.safetensors); without it "
                            "a seeded RANDOM Mimi is used (loud warning; smoke tests only)")
        q.add_argument("--mimi-preset", choices=("released", "tiny"), default="released",
                       help="Mimi configuration (tiny: small random codec for smoke tests)")
        q.add_argument("--seed", type=int, default=0, help="seed of the random Mimi (and of the built-in data)")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")

    t = dsub.add_parser(
        "tokenize", help="moshi-finetune manifest -> Mimi codes + Inner Monologue text (ArrayRecord shards)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tokenize a moshi-finetune dataset: a .jsonl manifest of {\"path\", \"duration\"}, stereo "
                    "audio (channel 0 = the model's voice, channel 1 = the user) and a sibling .json of word "
                    "alignments {\"alignments\": [[word, [start, end], speaker], ...]} per file.\n"
                    "Writes OUT_DIR/shard-*.array_record (one record per file: int [1 + 2K, frames], text first) "
                    "and OUT_DIR/index.json (config used, counts, skipped files with reasons).\n"
                    "Files without alignment .json get a text stream of -1 (no text loss), as moshi-finetune.",
        epilog="example:\n  moshi-jax data tokenize data/train.jsonl -o data/train_tok "
               "--mimi-weights tokenizer-e351c8d8-checkpoint125.safetensors --tokenizer tokenizer_spm_32k_3.model")
    t.add_argument("manifest", help="moshi-finetune .jsonl manifest (paths relative to its directory)")
    t.add_argument("-o", "--output", required=True, help="output directory (a tokenized dataset)")
    t.add_argument("--tokenizer", default=None,
                   help="the LM's SentencePiece model (e.g. tokenizer_spm_32k_3.model); without it every text "
                        "stream is -1")
    t.add_argument("--num-codebooks", type=int, default=8, help="Mimi codebooks per channel (default 8)")
    t.add_argument("--batch-size", type=int, default=8, help="channels encoded in parallel (default 8)")
    t.add_argument("--chunk-frames", type=int, default=25, help="80 ms frames per jitted Mimi call (default 25)")
    t.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="bad files: skip them (listed in index.json) or stop with an error (default skip)")
    t.add_argument("--allow-mono", action="store_true",
                   help="accept mono files (only the model's streams; the user's stay -1) instead of rejecting them")
    t.add_argument("--no-resample", action="store_true",
                   help="reject files whose sample rate is not 24 kHz instead of resampling them")
    t.add_argument("--main-speaker", default="SPEAKER_MAIN",
                   help="speaker label of the model's words (default SPEAKER_MAIN)")
    t.add_argument("--speakers", default=None,
                   help="comma list of accepted speaker labels (default: only the main speaker); words of other "
                        "accepted speakers are dropped, unknown labels make the file bad data")
    t.add_argument("--epad-every-word", action="store_true",
                   help="open every word of the text stream with EPAD, after the previous word's last token (the "
                        "layout the TTS engine feeds; for TTS training). Default: moshi-finetune's stream")
    t.add_argument("--records-per-shard", type=int, default=1024, help="records per ArrayRecord shard")
    mimi_args(t)

    x = dsub.add_parser("tokenize-text", help="text documents -> a text-only source (mixed into audio training)",
                        description="Tokenize text documents (.jsonl with {\"text\": ...} per line, or plain text "
                                    "with one document per line) into a text-only dataset.")
    x.add_argument("inputs", nargs="+", help=".jsonl or text files")
    x.add_argument("-o", "--output", required=True, help="output directory")
    x.add_argument("--tokenizer", required=True, help="the LM's SentencePiece model")
    x.add_argument("--no-bos-eos", action="store_true", help="do not put BOS/EOS around each document")

    b = dsub.add_parser("builtin", help="build the built-in dataset (synthetic eSpeak NG dialogues, tokenized)",
                        description="Synthesize two-voice dialogues with word timestamps (eSpeak NG, offline), "
                                    "train a small SentencePiece model on their sentences and tokenize them. "
                                    "Reused when already built with the same settings.")
    b.add_argument("-o", "--output", required=True, help="output directory")
    b.add_argument("--num-dialogues", type=int, default=None, help="number of dialogues (default 10)")
    b.add_argument("--seconds", type=float, default=None, help="length of each dialogue (default 15)")
    mimi_args(b)

    y = dsub.add_parser(
        "synth", help="speech corpus for ASR/TTS learning: generated sentences x eSpeak NG voices, held-out splits",
        description="Synthesize generated sentences with many eSpeak NG voices (rate and pitch varied), exact word "
                    "timings, splits train / heldout_sentences (seen voices) / heldout_voices (unseen voices), each "
                    "its own manifest; then a SentencePiece model, the codec (random Mimi: codebooks fitted to the "
                    "train audio, saved as mimi.safetensors) and the tokenized splits under OUT/tokens/.")
    y.add_argument("output", help="output directory")
    y.add_argument("--sentences", type=int, default=4000, help="train sentences (default 4000)")
    y.add_argument("--heldout-sentences", type=int, default=200, help="held-out sentences (default 200)")
    y.add_argument("--per-sentence", type=int, default=1, help="train utterances per sentence (default 1)")
    y.add_argument("--num-codebooks", type=int, default=16, help="Mimi codebooks tokenized (default 16)")
    y.add_argument("--trailing-silence", type=float, default=1.0,
                   help="seconds of silence after each recording, where a delayed text stream ends (default 1.0)")
    y.add_argument("--no-tokenize", action="store_true", help="only synthesize (manifests + audio + alignments)")
    mimi_args(y)
    y.set_defaults(mimi_preset="tiny")

    i = dsub.add_parser("inspect", help="summary of a tokenized dataset (counts, config, skipped files)")
    i.add_argument("dataset", help="tokenized dataset directory")
    p.set_defaults(func=cmd_data)


def _add_serve(sub) -> None:
    """`moshi-jax serve`: the reference server's websocket protocol on /api/chat (moshi_jax.engine.server)."""

    def cmd_serve(args: argparse.Namespace) -> None:
        from moshi_jax.engine.engine import PRESETS, Engine, EngineConfig
        from moshi_jax.engine.server import bind_socket, serve

        if args.max_sessions < 1:
            raise CLIError(f"--max-sessions must be >= 1, got {args.max_sessions}")
        if not 0 <= args.port <= 65535:
            raise CLIError(f"--port must be in 0..65535, got {args.port}")
        if args.preset not in PRESETS:
            raise CLIError(f"--preset must be one of {PRESETS}, got {args.preset!r}")
        if args.max_queue < 0:
            raise CLIError(f"--max-queue must be >= 0, got {args.max_queue}")
        for flag, v in (("--idle-timeout", args.idle_timeout), ("--heartbeat", args.heartbeat)):
            if not v >= 0:
                raise CLIError(f"{flag} must be >= 0 seconds (0: off), got {v}")
        if args.static is not None and not (Path(args.static) / "index.html").is_file():
            raise CLIError(f"--static {args.static} is not a folder with an index.html (a built web client)")
        if args.weights_dir is not None and not Path(args.weights_dir).is_dir():
            raise CLIError(f"--weights-dir {args.weights_dir} is not a directory (a downloaded Kyutai repository)")
        try:  # the port first: a port in use fails now, not after the model is built and compiled
            sock = bind_socket(args.host, args.port)
        except OSError as e:
            raise CLIError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
        try:
            engine, params = Engine.load(args.weights_dir, preset=args.preset, seed=args.seed, dtype=args.dtype,
                                         cfg=EngineConfig(pad_bias=args.pad_bias, item_sampling=True,
                                                          **_int8_options(args.int8)))
        except (FileNotFoundError, ValueError, KeyError, OSError) as e:
            sock.close()
            raise CLIError(f"cannot load the model: {e}") from e
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("listening on %s: the server has no authentication; anyone who can reach it can talk to "
                        "the model", args.host)
        model = str(args.weights_dir) if args.weights_dir else f"random {args.preset} model (seed {args.seed})"
        serve(engine, engine.prepare_params(params, consume=True), host=args.host, port=args.port,
              max_sessions=args.max_sessions, sock=sock, max_queue=args.max_queue,
              idle_timeout_s=args.idle_timeout or None, heartbeat_s=args.heartbeat or None,
              static_dir=args.static, model_name=model)

    p = sub.add_parser(
        "serve", help="websocket server speaking the reference Moshi protocol (several clients batched)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Full-duplex Moshi over websockets at ws://HOST:PORT/api/chat, with the reference server's "
                    "protocol (binary messages: 0x00 handshake, 0x01 Ogg/Opus 24 kHz mono audio, 0x02 UTF-8 "
                    "text, 0x04 metadata), so the reference clients (python -m moshi.client, the web UI) can "
                    "connect; open http://HOST:PORT in a browser for the built-in web page. Up to "
                    "--max-sessions clients are served at once, batched into one engine step every 80 ms; more "
                    "wait in a queue (told their position) and get in when a slot frees up. Per-session "
                    "sampling settings come from the URL's query (text_temperature, text_topk, "
                    "audio_temperature, audio_topk, pad_mult, text_seed, audio_seed, repetition_penalty, "
                    "repetition_penalty_context).",
        epilog="examples:\n"
               "  moshi-jax serve --weights-dir ~/models/moshiko-pytorch-bf16 --dtype bfloat16\n"
               "  moshi-jax serve --preset tiny --max-sessions 2     # random tiny model (smoke test)\n"
               "  then open http://localhost:8998 in a browser\n"
               "  python -m moshi.client --host 127.0.0.1 --port 8998  # the reference client")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    p.add_argument("--port", type=int, default=8998, help="TCP port (default 8998, as the reference)")
    p.add_argument("--max-sessions", type=int, default=4,
                   help="concurrent conversations = the engine's batch size (default 4); more clients wait "
                        "(see --max-queue)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="clients that may wait for a slot (default 16); past it they are turned away with 1013")
    p.add_argument("--idle-timeout", type=float, default=30.0,
                   help="close a client that sent no audio for this many seconds, freeing its slot (default 30; "
                        "0: never)")
    p.add_argument("--heartbeat", type=float, default=10.0,
                   help="websocket ping interval in seconds; a peer that does not answer is dropped (default 10; "
                        "0: off)")
    p.add_argument("--static", default=None,
                   help="serve this folder at / instead of the built-in page (e.g. the reference client's dist/)")
    p.add_argument("--weights-dir", default=None,
                   help="a downloaded Kyutai Moshi repository (config.json, LM + Mimi safetensors, tokenizer), or "
                        "hf://ORG/NAME; without it (and --hf-repo) a seeded RANDOM model of --preset is used")
    _add_hub_args(p, "the model (as --weights-dir)")
    p.add_argument("--preset", default="tiny", help="random model size without --weights-dir: tiny (default), "
                                                    "bench_111m, moshi_7b")
    p.add_argument("--seed", type=int, default=0, help="seed of the random model")
    p.add_argument("--dtype", default=None, help="LM dtype, e.g. bfloat16 (default: the checkpoint's / float32)")
    p.add_argument("--pad-bias", type=float, default=0.0,
                   help="added to the text PAD log-prob (> 0: Moshi waits longer before speaking)")
    p.add_argument("--int8", choices=("kv", "weights", "both"), default=None,
                   help="int8 serving options: the KV cache (half the state per session), the transformer "
                        "weights, or both (quality cost: python -m benchmarks.int8_quality)")
    p.set_defaults(func=cmd_serve)


def _int8_options(which: str | None) -> dict:
    """`--int8 kv|weights|both` -> the EngineConfig fields (moshi_jax.nn.quant)."""
    return {"kv_cache_dtype": "int8" if which in ("kv", "both") else None,
            "weight_dtype": "int8" if which in ("weights", "both") else None}


def _add_engine(sub) -> None:
    """`moshi-jax chat / asr / tts`: the streaming engine over files, frame by frame (moshi_jax.engine)."""

    def load(args: argparse.Namespace, mode: str, delay: int = 0):
        import dataclasses

        from moshi_jax.engine.engine import PRESETS, Engine, EngineConfig
        from moshi_jax.nn.sampling import SamplingConfig

        if args.preset not in PRESETS:
            raise CLIError(f"--preset must be one of {PRESETS}, got {args.preset!r}")
        if args.weights_dir is not None and not Path(args.weights_dir).is_dir():
            raise CLIError(f"--weights-dir {args.weights_dir} is not a directory (a downloaded Kyutai repository)")
        try:
            # the reference TTSModel samples text and audio at 0.6; the others use the LMGen defaults
            base = SamplingConfig(temp=0.6, temp_text=0.6) if mode == "tts" else SamplingConfig()
            base = SamplingConfig.greedy() if args.greedy else base
            over = {k: v for k, v in (("temp", args.temp), ("temp_text", args.temp_text), ("top_k", args.top_k),
                                      ("top_k_text", args.top_k_text)) if v is not None}
            sampling = dataclasses.replace(base, **over)
            extra = {"tts_max_padding": args.max_padding} if mode == "tts" and args.max_padding is not None else {}
            if mode == "asr":
                extra["asr_zero_text_prefix"] = not args.free_text_prefix
            cfg = EngineConfig(mode=mode, sampling=sampling, pad_bias=args.pad_bias, text_delay_frames=delay,
                               seed=args.seed, **extra, **_int8_options(args.int8))
            engine, params = Engine.load(args.weights_dir, preset=args.preset, cfg=cfg, seed=args.seed,
                                         dtype=args.dtype, tokenizer=args.tokenizer,
                                         apply_repo_sampling=not (over or args.greedy or mode == "tts"))
        except (FileNotFoundError, ValueError, KeyError, OSError, TypeError) as e:
            raise CLIError(f"cannot set up the model: {e}") from e
        return engine, engine.prepare_params(params, consume=True)

    def repo_setting(args, section: str, key: str):
        """A value from the repository's config.json (e.g. stt_config / tts_config), or None."""
        import json

        if args.weights_dir is None:
            return None
        cfg_path = Path(args.weights_dir) / "config.json"
        if not cfg_path.is_file():
            return None
        return (json.loads(cfg_path.read_text()).get(section) or {}).get(key)

    def printer(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    def report(result, what: str) -> None:
        from moshi_jax.engine.runner import format_latency

        sys.stdout.write("\n")
        log.info("%s: %d frames; step compiled in %.1f s before the run", what, result.frames, result.compile_s)
        for line in format_latency(result.latencies_ms).splitlines():
            log.info("%s", line)

    def save(path: str, pcm, sample_rate: int) -> None:
        from moshi_jax.audio import AudioError, save_audio

        try:
            save_audio(path, pcm, sample_rate)
        except AudioError as e:
            raise JobError(str(e)) from e
        log.info("wrote %s (%.2f s)", path, len(pcm) / sample_rate)

    def cmd_chat(args: argparse.Namespace) -> None:
        from moshi_jax.engine.runner import chat_file
        from moshi_jax.mimi.config import MimiConfig

        _output_file(args.output)
        if args.max_seconds is not None and not args.max_seconds > 0:
            raise CLIError(f"--max-seconds must be > 0, got {args.max_seconds}")
        wav = _read_audio(args.input, MimiConfig().sample_rate)[0]  # read first: bad input fails fast
        engine, params = load(args, "dialogue")
        if engine.sample_rate != MimiConfig().sample_rate:
            wav = _read_audio(args.input, engine.sample_rate)[0]
        if args.max_seconds is not None:
            wav = wav[: int(args.max_seconds * engine.sample_rate)]
        result = chat_file(engine, params, wav, printer, realtime=args.realtime)
        report(result, "chat")
        save(args.output, result.pcm, engine.sample_rate)

    def cmd_asr(args: argparse.Namespace) -> None:
        from moshi_jax.engine.runner import transcribe_file

        delay = args.delay_frames
        if delay is None:  # the reference STT repositories give the delay in seconds
            delay = int(round(float(repo_setting(args, "stt_config", "audio_delay_seconds") or 0.0) * 12.5))
        if delay < 0:
            raise CLIError(f"--delay-frames must be >= 0 for ASR (text after audio), got {delay}")
        prefix = int(round(float(repo_setting(args, "stt_config", "audio_silence_prefix_seconds") or 0.0) * 12.5))
        from moshi_jax.mimi.config import MimiConfig

        if args.output:
            _output_file(args.output)
        wav = _read_audio(args.input, MimiConfig().sample_rate)[0]  # read first: bad input fails fast
        engine, params = load(args, "asr", delay)
        if engine.sample_rate != MimiConfig().sample_rate:
            wav = _read_audio(args.input, engine.sample_rate)[0]
        result = transcribe_file(engine, params, wav, printer, realtime=args.realtime, prefix_frames=prefix)
        report(result, "asr")
        if args.output:
            lines = [f"{t:8.2f}\t{w}" for w, t in result.words]
            from moshi_jax.io_atomic import atomic_write_text

            atomic_write_text(args.output, "\n".join(lines) + ("\n" if lines else ""))
            log.info("wrote %d timed pieces to %s", len(lines), args.output)

    def cmd_tts(args: argparse.Namespace) -> None:
        from moshi_jax.engine.runner import synthesize

        delay = args.delay_frames
        if delay is None:
            seconds = repo_setting(args, "tts_config", "audio_delay")
            delay = 2 if seconds is None else int(float(seconds) * 12.5)
        if delay < 0:
            raise CLIError(f"--delay-frames must be >= 0 for TTS (audio after text), got {delay}")
        if args.max_frames < 1:
            raise CLIError(f"--max-frames must be >= 1, got {args.max_frames}")
        _at_least("--max-padding", args.max_padding, 0)
        _at_least("--padding-between", args.padding_between, 0)
        _output_file(args.output)
        engine, params = load(args, "tts", -delay)
        try:
            result = synthesize(engine, params, args.text, printer, max_frames=args.max_frames,
                                padding_between=args.padding_between, realtime=args.realtime)
        except ValueError as e:
            raise CLIError(str(e)) from e
        report(result, "tts")
        if result.pcm.size == 0:
            raise CLIError(f"no audio was produced in {result.frames} frames (raise --max-frames)")
        save(args.output, result.pcm, engine.sample_rate)

    def common(q) -> None:
        q.add_argument("--weights-dir", default=None,
                       help="a downloaded Kyutai repository (config.json, LM + Mimi safetensors, tokenizer .model), "
                            "or hf://ORG/NAME; without it (and --hf-repo) a seeded RANDOM model of --preset is used "
                            "(loud warning, meaningless output)")
        _add_hub_args(q, "the model (as --weights-dir)")
        q.add_argument("--preset", default="tiny", help="random model without --weights-dir: tiny (default), "
                                                        "bench_111m, moshi_7b")
        q.add_argument("--seed", type=int, default=42424242,
                       help="sampling seed, also the random model's seed (default 42424242, the reference server's)")
        q.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: the repository's; a small "
                                                         "built-in one for random models)")
        q.add_argument("--dtype", default=None, help="LM dtype, e.g. bfloat16 (default float32)")
        q.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
        q.add_argument("--temp", type=float, default=None, help="audio temperature (default 0.8; tts 0.6)")
        q.add_argument("--temp-text", type=float, default=None, help="text temperature (default 0.7; tts 0.6)")
        q.add_argument("--top-k", type=int, default=None, help="audio top-k (default 250)")
        q.add_argument("--top-k-text", type=int, default=None, help="text top-k (default 25)")
        q.add_argument("--pad-bias", type=float, default=0.0,
                       help="added to the text PAD log-prob (> 0: later replies / slower speech)")
        q.add_argument("--int8", choices=("kv", "weights", "both"), default=None,
                       help="int8 serving options: the KV cache, the transformer weights, or both")
        q.add_argument("--realtime", action="store_true",
                       help="pace the frames at real time (80 ms each) as a live microphone would")

    fmt = argparse.RawDescriptionHelpFormatter
    c = sub.add_parser(
        "chat", help="full-duplex conversation over a file, frame by frame as if live", formatter_class=fmt,
        description="Feeds the user's audio to Moshi 80 ms at a time (as the reference server does), prints "
                    "Moshi's text as it comes, writes Moshi's audio (same length as the input), and reports the "
                    "per-frame latency (percentiles and histogram).",
        epilog="examples:\n  moshi-jax chat --input user.wav --output moshi.wav --weights-dir ~/models/moshiko\n"
               "  moshi-jax chat --output out.wav --preset tiny    # built-in sample, random tiny model")
    common(c)
    c.add_argument("--input", "-i", default=None, help="the user's audio (any format/rate; default: the built-in "
                                                       "synthesised speech sample)")
    c.add_argument("--output", "-o", required=True, help="where to write Moshi's audio (float WAV, 24 kHz)")
    c.add_argument("--max-seconds", type=float, default=None, help="only use the first seconds of the input")
    c.set_defaults(func=cmd_chat)

    a = sub.add_parser(
        "asr", help="streaming speech recognition of a file (text delayed against audio)", formatter_class=fmt,
        description="Streaming ASR: the audio is fed frame by frame; text comes out --delay-frames frames "
                    "(80 ms each) after the audio it transcribes; silence is appended so the last words come "
                    "out. Prints the text as it comes and the per-frame latency.",
        epilog="examples:\n  moshi-jax asr speech.wav --weights-dir ~/models/stt-1b-en_fr\n"
               "  moshi-jax asr --preset tiny --delay-frames 6    # built-in sample, random model")
    common(a)
    a.add_argument("input", nargs="?", default=None, help="audio file (default: the built-in speech sample)")
    a.add_argument("--delay-frames", type=int, default=None,
                   help="text delay in frames (default: the repository's stt_config audio_delay_seconds, else 0)")
    a.add_argument("--free-text-prefix", action="store_true",
                   help="keep the model's own text in the first --delay-frames frames (the reference STT "
                        "inference) instead of the zero token (moshi-jax's training data layout)")
    a.add_argument("--output", "-o", default=None, help="also write 'seconds<TAB>piece' lines to this file")
    a.set_defaults(func=cmd_asr)

    t = sub.add_parser(
        "tts", help="streaming text-to-speech (text fed word by word ahead of the audio)", formatter_class=fmt,
        description="Streaming TTS with the reference's word-feeding rules: PADs before the first word, EPAD "
                    "before each word, words fed when the model asks for them (at most --max-padding PADs in a "
                    "row); the audio lags the text by --delay-frames frames.",
        epilog='examples:\n  moshi-jax tts "Hello there, how are you?" -o hello.wav --weights-dir ~/models/tts\n'
               '  moshi-jax tts "hello world" -o out.wav --preset tiny   # random tiny model')
    common(t)
    t.add_argument("text", help="the text to say (SSML-style <break time=\"0.5s\"/> pauses are honoured)")
    t.add_argument("--output", "-o", required=True, help="where to write the audio (float WAV, 24 kHz)")
    t.add_argument("--delay-frames", type=int, default=None,
                   help="audio delay after the text in frames (default: the repository's tts_config audio_delay, "
                        "else 2)")
    t.add_argument("--max-frames", type=int, default=375, help="stop after this many frames (default 375 = 30 s)")
    t.add_argument("--max-padding", type=int, default=None,
                   help="most PADs in a row before a word is forced (default 6, the reference StateMachine's; "
                        "its TTSModel loader uses 8)")
    t.add_argument("--padding-between", type=int, default=1,
                   help="PADs forced after each word (+ its extra tokens), as the reference simple_generate (1)")
    t.set_defaults(func=cmd_tts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moshi-jax",
        description="moshi-jax: JAX/Flax Moshi (Mimi codec + multi-stream speech-text LM).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (errors are otherwise one log line)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_codec(sub)
    _add_train(sub)
    _add_export(sub)
    _add_data(sub)
    _add_serve(sub)
    _add_engine(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose or args.debug)
    try:
        _resolve_hub(args)
        args.func(args)
    except CLIError as e:  # user mistakes (2) and jobs that could not give a correct result (1): one line
        log.error("%s", e, exc_info=args.debug)
        return e.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - anything else: one line, the traceback behind --debug
        if args.debug:
            raise
        log.error("%s: %s (run with --debug for the traceback)", type(e).__name__, e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
