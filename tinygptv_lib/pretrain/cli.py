"""Command line for the backbone pretraining: `python -m tinygptv_lib.pretrain` or `tinygptv pretrain`."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", default="tinygptv_lib/assets/nano_backbones",
                   help="folder for the backbones, config.json, quality.json (default: the shipped folder)")
    p.add_argument("--seed", type=int, default=0, help="seeds torch, random, numpy and every scene drawn")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: OMP_NUM_THREADS, else 2); part of what reproduces a run")
    p.add_argument("--part", choices=("all", "vision", "language", "reading", "seeing"), default="all",
                   help="retrain one part and keep the rest as written in --out (same seed and settings); "
                        "language = both Phi phases, reading = Phi's second phase only, seeing = Phi's third "
                        "phase, on the towers in --out (all stops before it)")
    p.add_argument("--dense-steps", type=int, default=None,
                   help="override the ViT-alone dense-label steps that come first (0 skips them)")
    p.add_argument("--vision-steps", type=int, default=None, help="override the ViT + Q-Former steps")
    p.add_argument("--language-steps", type=int, default=None, help="override the steps of Phi's first phase")
    p.add_argument("--reading-steps", type=int, default=None,
                   help="override the steps of Phi's second phase, the reading drills (0 skips it)")
    p.add_argument("--seeing-steps", type=int, default=None,
                   help="override the steps of the seeing phase's first part (every layout)")
    p.add_argument("--seeing-drill-steps", type=int, default=None,
                   help="override the steps of the seeing phase's second part (drills)")
    p.add_argument("--seeing-focus-steps", type=int, default=None,
                   help="override the steps of the seeing phase's third part (drills asking mostly colours and boxes)")
    p.add_argument("--dense-box-weight", type=float, default=None,
                   help="weight of the dense phase's per-patch box loss (default 0: off, as shipped; tried at 5)")
    p.add_argument("--slot-anchors", action="store_true",
                   help="tie each query to a fixed place in the slot loss instead of matching on the predictions")
    p.set_defaults(func=run)
    return p


# Command-line options that override one field of the default settings: (option dest, phase, field).
OVERRIDES = (("dense_steps", "dense", "steps"), ("vision_steps", "vision", "steps"),
             ("language_steps", "language", "steps"), ("reading_steps", "reading", "steps"),
             ("seeing_steps", "seeing", "steps"), ("seeing_drill_steps", "seeing", "drill_steps"),
             ("seeing_focus_steps", "seeing", "focus_steps"),
             ("dense_box_weight", "dense", "box_weight"))


def settings_from(args: argparse.Namespace):
    """The default PretrainSettings with the command line's overrides."""
    from .run import PretrainSettings

    settings = PretrainSettings()
    for dest, phase, name in OVERRIDES:
        if getattr(args, dest) is not None:
            setattr(getattr(settings, phase), name, getattr(args, dest))
    settings.vision.slot_anchors = args.slot_anchors
    return settings


def recipe_flags(args: argparse.Namespace) -> str:
    """The command line's options that change what is trained (for `made_by`), in a fixed order:
    the shipped recipe gives ''."""
    flags = []
    for dest in ("threads", *(d for d, _, _ in OVERRIDES)):
        value = getattr(args, dest)
        if value is not None:
            flags.append(f"--{dest.replace('_', '-')} {value:g}" if isinstance(value, float) else
                         f"--{dest.replace('_', '-')} {value}")
    if args.slot_anchors:
        flags.append("--slot-anchors")
    return " ".join(flags)


def run(args: argparse.Namespace) -> int:
    from .run import pretrain

    quality = pretrain(args.out, seed=args.seed, settings=settings_from(args), threads=args.threads, part=args.part,
                       flags=recipe_flags(args))
    r, p = quality["retrieval"], quality["perplexity"]
    print(f"image -> text retrieval top-1: {r['image_to_text_top1']:.3f} among {r['n']} held-out captions "
          f"(chance {r['chance']:.3f}); text -> image: {r['text_to_image_top1']:.3f}")
    print(f"Phi held-out perplexity: {p['heldout']:.3f} (a random Phi: {p['random_phi']:.1f})")
    print(f"probes: {json.dumps(quality['probes'])}")
    print(f"seconds: {json.dumps(quality['seconds'])}; wrote {args.out}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `pretrain` subcommand to an argparse subparsers object (the `tinygptv` CLI)."""
    p = subparsers.add_parser("pretrain", help="pretrain the nano backbones (ViT + Q-Former, Phi) on the shapes world",
                              description=__doc__)
    return add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tinygptv_lib.pretrain", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    return args.func(args)
