"""The `tinygptv` command line."""
from __future__ import annotations

import argparse
import sys
import time


def _cmd_params(args) -> int:
    from .model.summary import parameter_table
    from .model.tinygptv import build_model

    device = "meta" if args.preset == "full" else None  # full size: counted without memory
    model = build_model(args.preset, stage=args.stage, device=device)
    print(f"TinyGPT-V preset={args.preset} stage={args.stage}")
    print(parameter_table(model))
    return 0


def _cmd_step(args) -> int:
    """One real forward+backward step on random pixels and a fixed caption: a smoke test and timing."""
    import torch

    from .model.sequence import build_batch
    from .model.tinygptv import build_model
    from .tokenizer import load_tokenizer

    torch.manual_seed(args.seed)
    model = build_model(args.preset, stage=args.stage)
    model.train()
    cfg = model.cfg
    tok = load_tokenizer()
    prompts = ["<Img><ImageHere></Img> Describe this image in detail."] * args.batch
    answers = ["a small red circle to the left of a large blue square"] * args.batch
    batch = build_batch(tok, prompts, answers, num_query_tokens=cfg.qformer.num_query_tokens, end_sym="###")
    pixels = torch.randn(args.batch, 3, cfg.vision.img_size, cfg.vision.img_size)
    opt = torch.optim.AdamW(model.trainable_parameters().values(), lr=1e-4)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss = model(batch, pixels)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        print(f"step {i}: loss {loss.item():.4f}  {times[-1] * 1000:.0f} ms")
    if len(times) > 1:
        rest = sorted(times[1:])
        print(f"median step (after the first) {rest[len(rest) // 2] * 1000:.0f} ms at batch {args.batch}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinygptv", description="TinyGPT-V course tools")
    sub = p.add_subparsers(dest="command", required=True)

    pp = sub.add_parser("params", help="parameter table per component, frozen vs trainable")
    pp.add_argument("--preset", choices=["nano", "full"], default="nano")
    pp.add_argument("--stage", type=int, choices=[1, 2, 3, 4], default=1)
    pp.set_defaults(func=_cmd_params)

    ps = sub.add_parser("step", help="time forward+backward training steps on random data")
    ps.add_argument("--preset", choices=["nano", "full"], default="nano")
    ps.add_argument("--stage", type=int, choices=[1, 2, 3, 4], default=2)
    ps.add_argument("--batch", type=int, default=8)
    ps.add_argument("--steps", type=int, default=5)
    ps.add_argument("--seed", type=int, default=0)
    ps.set_defaults(func=_cmd_step)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
