"""Does the 7B train step fit a TPU slice? Compile it ahead of time for a TPU topology on this (CPU) machine and
print XLA's per-device memory analysis (libtpu compile-only, in the separate `.venv-tpu`; see train/tpu_aot.py).

    python -m train.tpu_aot setup                               # once: the libtpu-only venv
    python -m benchmarks.aot_7b                                 # 7B LoRA (configs/7b.py) on v5p:2x2x2
    python -m benchmarks.aot_7b --topology v5e:4x4 --mesh 1,16,1 -- lora.enabled=false   # full fine-tuning
    python -m benchmarks.aot_7b --extrapolate-layers 1,2      # roofline: unrolled 1- and 2-layer compiles -> 32

Nothing is allocated: the params, optimizer state and batch are abstract shapes with their shardings.
"""

from __future__ import annotations

import argparse
import sys

from train import tpu_aot


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="7b", help="configs/ preset (default 7b: moshi-finetune's LoRA recipe)")
    p.add_argument("--topology", default="v5p:2x2x2", help="TPU topology (v5p:2x2x2 = 8 chips, v5e:4x4 = 16)")
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor (default: all chips on fsdp)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: the config's, 16)")
    p.add_argument("--extrapolate-layers", default=None, metavar="L1,L2[,L3]",
                   help="XLA's full-step FLOPs and bytes from unrolled compiles at these depths, extrapolated to 32 "
                        "(a scanned compile counts one layer); see train/tpu_aot.py")
    p.add_argument("--json", default=None, help="write the result JSON here")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (after --)")
    args = p.parse_args(argv)
    cmd = ["compile", args.config, *args.overrides, "--topology", args.topology]
    if args.mesh:
        cmd += ["--mesh", args.mesh]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.extrapolate_layers:
        cmd += ["--extrapolate-layers", args.extrapolate_layers]
    if args.json:
        cmd += ["--json", args.json]
    return tpu_aot.main(cmd)


if __name__ == "__main__":
    sys.exit(main())
