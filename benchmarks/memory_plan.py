"""Print the full-size memory plan (tinygptv_lib/memory_plan.py): every stage x image size x
precision x gradient checkpointing at the reference batch, whether it fits a 16 GB card, the
largest batch that does, and fp16 inference. No GPU needed.

    python benchmarks/memory_plan.py                 # a 16 GB T4 (15 GiB usable)
    python benchmarks/memory_plan.py --budget 22.5 --stage 4   # e.g. a 24 GB RTX 3090
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinygptv_lib import memory_plan as MP  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=MP.T4_GIB, help="GiB the card shows (default: a T4's 15)")
    ap.add_argument("--stage", type=int, nargs="+", default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    args = ap.parse_args(argv)
    print(MP.plan_table(args.budget, tuple(args.stage)))
    print("\nOne Phi-2 layer keeps per token (fp16/bf16 autocast, LoRA on):")
    for name, b in MP.phi_layer_saved(MP.Dims.full(), "fp16", lora=True):
        print(f"  {name}: {b / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
