"""Mimi speed: moshi-jax vs the reference PyTorch Mimi, same weights, same run.

Measures (released config, float32): batch encode and decode of N seconds of audio, and streaming
encode+decode of one 80 ms frame (median after warm-up). JAX compile time is reported apart.

    python -m benchmarks.bench_mimi              # full table (needs the reference `moshi` package)
    python -m benchmarks.bench_mimi --no-reference --seconds 5
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="audio length for batch encode/decode")
    p.add_argument("--stream-frames", type=int, default=50, help="timed streaming frames (after warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the reference")
    p.add_argument("--batch-iters", type=int, default=5, help="timed repetitions of batch encode/decode")
    p.add_argument("--no-reference", action="store_true", help="time moshi-jax only")
    p.add_argument("--json", default=None, help="write results as JSON here")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from benchmarks.common import Row, block, print_table, time_fn, write_results
    from moshi_jax.mimi import checkpoint as mimi_ckpt
    from moshi_jax.mimi.config import MimiConfig
    from moshi_jax.mimi.model import MimiCodec

    cfg = MimiConfig()
    codec = MimiCodec(cfg)
    rng = np.random.default_rng(0)
    n = int(args.seconds * cfg.sample_rate) // cfg.frame_size * cfg.frame_size
    wav = (0.1 * rng.standard_normal((1, 1, n))).astype(np.float32)
    frame = wav[..., : cfg.frame_size]

    ref = None
    if not args.no_reference:
        import torch
        from moshi.models import loaders

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        ref = loaders.get_mimi(None, device="cpu")
        ref.eval()
        with torch.no_grad():  # random codebooks, so that codes are not all zero
            for name, buf in ref.named_buffers():
                if name.endswith("embedding_sum"):
                    buf.copy_(torch.randn_like(buf) * 0.5)
                elif name.endswith("cluster_usage"):
                    buf.copy_(torch.rand_like(buf) + 0.5)
        sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
        params = mimi_ckpt.load_reference(sd, cfg)
    else:
        params = codec.init(jax.random.PRNGKey(0))

    rows: list[Row] = []
    K = cfg.num_codebooks

    # ---- batch
    first, enc_s, _ = time_fn(lambda: codec.encode(params, wav), warmup=1, iters=args.batch_iters)
    codes = np.asarray(block(codec.encode(params, wav)))
    first_d, dec_s, _ = time_fn(lambda: codec.decode(params, codes), warmup=1, iters=args.batch_iters)
    ref_enc = ref_dec = None
    if ref is not None:
        import torch

        twav = torch.from_numpy(wav)
        tcodes = torch.from_numpy(codes.astype(np.int64))
        with torch.no_grad():
            _, ref_enc, _ = time_fn(lambda: ref.encode(twav), warmup=1, iters=args.batch_iters)
            _, ref_dec, _ = time_fn(lambda: ref.decode(tcodes), warmup=1, iters=args.batch_iters)
    rows.append(Row(f"batch encode {args.seconds:g} s", enc_s, ref_enc, first - enc_s))
    rows.append(Row(f"batch decode {args.seconds:g} s", dec_s, ref_dec, first_d - dec_s))

    # ---- streaming: one 80 ms frame in, codes out, decoded back to one 80 ms frame
    state = codec.init_state(1, num_codebooks=K)

    def one_frame():  # encode_step + decode_step: one jitted call each; the state is donated and replaced
        nonlocal state
        state, c = codec.encode_step(params, state, frame)
        state, out = codec.decode_step(params, state, c)
        return out

    first_s, stream_s, _ = time_fn(one_frame, warmup=5, iters=args.stream_frames)
    ref_stream = None
    if ref is not None:
        import torch

        tframe = torch.from_numpy(frame)
        with torch.no_grad(), ref.streaming(1):
            def ref_frame():
                return ref.decode(ref.encode(tframe))

            _, ref_stream, _ = time_fn(ref_frame, warmup=5, iters=args.stream_frames)
    rows.append(Row("streaming encode+decode / 80 ms frame", stream_s, ref_stream, first_s - stream_s,
                    note=f"real-time factor {stream_s / 0.08:.2f}"))

    title = f"Mimi (released config, float32, CPU x{os.cpu_count()}, batch 1)"
    print_table(title, rows)
    write_results(args.json, title, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
