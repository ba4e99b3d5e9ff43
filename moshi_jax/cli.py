"""The `moshi-jax` command. Thin: parses arguments and dispatches to the library."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("moshi_jax")


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


# ---------------------------------------------------------------------------------------------- codec


def _mimi_config(preset: str):
    from moshi_jax.mimi.config import MimiConfig

    return MimiConfig() if preset == "released" else MimiConfig.tiny()


def _load_codec(weights: str | None, seed: int, preset: str = "released"):
    import jax

    from moshi_jax.mimi import checkpoint as mimi_ckpt
    from moshi_jax.mimi.model import MimiCodec

    cfg = _mimi_config(preset)
    codec = MimiCodec(cfg)
    if weights is None:
        log.warning("=" * 78)
        log.warning("NO --weights GIVEN: using a RANDOMLY INITIALISED Mimi (seed %d).", seed)
        log.warning("The codes and audio are meaningless; pass --weights tokenizer-e351c8d8-checkpoint125.safetensors")
        log.warning("=" * 78)
        params = codec.init(jax.random.PRNGKey(seed))
    else:
        path = Path(weights)
        if not path.is_file():
            raise CLIError(f"weights file not found: {path}")
        log.info("loading Mimi weights from %s", path)
        try:
            params = mimi_ckpt.load_reference(str(path), cfg)
        except (ValueError, KeyError, OSError) as e:
            raise CLIError(f"cannot load Mimi weights from {path}: {e}") from e
    return cfg, codec, params


def _read_audio(path: str | None, sample_rate: int):
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
        out.append(np.asarray(wav))
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

    from moshi_jax.audio import save_audio
    wav = None
    if args.codec_cmd in ("encode", "roundtrip"):
        wav = _read_audio(args.input, _mimi_config(args.preset).sample_rate)  # read first: bad input fails fast
    cfg, codec, params = _load_codec(args.weights, args.seed, args.preset)
    if args.codec_cmd == "decode":
        try:
            codes = np.load(args.input, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CLIError(f"cannot read codes from {args.input}: {e}") from e
        _check_codes(codes, cfg)
    if args.codec_cmd in ("encode", "roundtrip"):
        k = args.num_codebooks or cfg.num_codebooks
        if not 1 <= k <= cfg.n_q:
            raise CLIError(f"--num-codebooks must be in 1..{cfg.n_q}, got {k}")
        log.info("encoding %.2f s of audio with %d codebooks", wav.shape[-1] / cfg.sample_rate, k)
        codes = _encode(codec, params, wav, k, args.chunk_frames)
        log.info("codes: %s (%d frames at %.1f Hz)", codes.shape, codes.shape[-1], cfg.frame_rate)
        if args.codec_cmd == "encode":
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            np.save(args.output, codes.astype(np.int32))
            log.info("wrote %s", args.output)
            return
    out = _decode(codec, params, codes, args.chunk_frames)
    if args.codec_cmd == "roundtrip":
        out = out[: wav.shape[-1]]  # drop the zero padding of the last frame
    save_audio(args.output, out, cfg.sample_rate)
    log.info("wrote %s (%.2f s at %d Hz)", args.output, out.shape[-1] / cfg.sample_rate, cfg.sample_rate)


def _add_codec(sub) -> None:
    p = sub.add_parser("codec", help="Mimi neural audio codec: encode / decode / roundtrip",
                       description="Mimi neural audio codec (24 kHz mono <-> 12.5 Hz codes).")
    csub = p.add_subparsers(dest="codec_cmd", required=True)

    def common(q):
        q.add_argument("--weights", help="reference Mimi safetensors (tokenizer-e351c8d8-checkpoint125.safetensors); "
                                         "without it a seeded random model is used (with a warning)")
        q.add_argument("--seed", type=int, default=0, help="seed of the random model when --weights is absent")
        q.add_argument("--preset", choices=("released", "tiny"), default="released",
                       help="Mimi configuration (tiny: a small random codec for smoke tests)")
        q.add_argument("--chunk-frames", type=int, default=125,
                       help="80 ms frames per compiled streaming chunk (memory stays constant)")

    e = csub.add_parser("encode", help="audio file -> codes .npy [K, T]",
                        description="Encode any audio file (resampled to 24 kHz mono) into integer codes [K, T].")
    e.add_argument("input", help="audio file (any rate / channel count libsndfile reads)")
    e.add_argument("-o", "--output", required=True, help="output .npy (int32 [K, T])")
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
        from moshi_jax.training import train_lm
        from moshi_jax.training.checkpointing import CheckpointMismatchError

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
        user_errors: tuple[type[Exception], ...] = (config_lib.ConfigError, CheckpointMismatchError)
        try:  # unusable data sources are user errors too
            from moshi_jax.data.pipeline import DataConfigError
            from moshi_jax.data.records import RecordError

            user_errors += (DataConfigError, RecordError)
        except ImportError:
            pass
        try:
            cfg = config_lib.load_config(name or "tiny", overrides)
            if args.print_config:
                print(config_lib.to_json(cfg))
                return
            train_lm.setup_logging(logging.DEBUG if args.verbose else logging.INFO)
            train_lm.run(cfg)
        except user_errors as e:
            raise CLIError(str(e)) from e

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
               "keys: any field of moshi_jax.training.config.TrainConfig as section.field=value "
               "(model.<field> overrides the LM config)")
    p.add_argument("config", nargs="?", default=None,
                   help="preset name in configs/ (tiny, 100m, 2b, 7b) or a path to a .py config (default tiny)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=200 mesh.fsdp=4")
    p.add_argument("--config", dest="config_path", default=None, help="same as the positional CONFIG")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--list-configs", action="store_true", help="list the presets in configs/ and exit")
    p.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moshi-jax",
        description="moshi-jax: JAX/Flax Moshi (Mimi codec + multi-stream speech-text LM).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_codec(sub)
    _add_train(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        args.func(args)
    except CLIError as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
