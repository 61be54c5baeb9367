"""What the KV cache buys: tokens/s and time to first token with the cache and without it (every
step recomputing the whole sequence), for the nano model, batch 1 and 8.

    python benchmarks/generation_kv.py                   # CPU, 1 thread, 64 new tokens, median of 5
    python benchmarks/generation_kv.py --checkpoint runs/course --threads 2 --runs 7

Exactly `--new-tokens` tokens per row (stop strings and EOS ignored), so both ways do the same
work. Runs alternate between the two ways (cache first on even runs, last on odd ones) after one
warm-up each, so a machine that slows down or speeds up over time biases neither. Time to first
token includes encoding the image (ViT, Q-Former, projections) and the prompt pass, which are
the same either way; the cache pays off from the second token on.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinygptv_lib.data import world as W  # noqa: E402
from tinygptv_lib.data.images import preprocess  # noqa: E402
from tinygptv_lib.infer.generate import build_prompt, generate  # noqa: E402
from tinygptv_lib.tokenizer import load_tokenizer  # noqa: E402

QUESTIONS = [("Describe this image in detail.", None), ("What colour is the largest shape?", "vqa"),
             ("How many shapes are there?", "vqa"), ("the red circle", "refer"),
             ("Briefly describe this image.", "caption"), ("Is there a star in the picture?", "vqa"),
             ("Describe this image in detail.", "grounding"), ("circle", "detection")]


def build(checkpoint, device):
    if checkpoint:
        from tinygptv_lib.infer.chat import load_chat_model

        return load_chat_model(checkpoint, device=device)[0]
    from tinygptv_lib.cli import _stage_model

    torch.manual_seed(0)
    return _stage_model("nano", 4).to(device).eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="final.pt / stage folder / course folder (default: untrained projections)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = build(args.checkpoint, args.device), load_tokenizer()
    size = model.cfg.vision.img_size
    n = max(args.batches)
    scenes = [W.make_scene(W.derive_seed(0, "bench/kv", i), 224) for i in range(n)]
    prompts = [build_prompt(q, "stage3" if t is None else "stage4", t) for q, t in
               (QUESTIONS[i % len(QUESTIONS)] for i in range(n))]
    px = torch.stack([preprocess(s.image, size) for s in scenes]).to(args.device)
    print(f"nano TinyGPT-V, {args.device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"{args.new_tokens} new tokens per row, median of {args.runs} runs")
    print(f"{'batch':>5} {'KV cache':>8} {'prompt tok':>10} {'first token ms':>14} {'total s':>8} "
          f"{'tokens/s':>9} {'decode tok/s':>12}")
    summary = {}
    for b in args.batches:
        kw = {"pixels": px[:b], "max_new_tokens": args.new_tokens, "stop": (), "eos_id": None}
        runs = {True: [], False: []}
        for cache in (True, False):  # warm-up
            generate(model, tok, prompts[:b], use_cache=cache, **kw)
        for r in range(args.runs):
            for cache in ((True, False) if r % 2 == 0 else (False, True)):
                t0 = time.perf_counter()
                out = generate(model, tok, prompts[:b], use_cache=cache, **kw)
                wall = time.perf_counter() - t0
                assert all(len(t) == args.new_tokens for t in out.tokens), "every row must get exactly N tokens"
                runs[cache].append((out.time_to_first_token, wall))
        for cache in (True, False):
            first = statistics.median(f for f, _ in runs[cache])
            wall = statistics.median(w for _, w in runs[cache])
            decode = statistics.median(b * (args.new_tokens - 1) / (w - f) for f, w in runs[cache])
            tps = b * args.new_tokens / wall
            summary[b, cache] = (first, tps, decode)
            print(f"{b:>5} {'yes' if cache else 'no':>8} {max(out.prompt_tokens):>10} {first * 1000:>14.1f} "
                  f"{wall:>8.3f} {tps:>9.1f} {decode:>12.1f}")
    for b in args.batches:
        (f1, t1, d1), (f0, t0_, d0) = summary[b, True], summary[b, False]
        print(f"batch {b}: KV cache / recompute = {t1 / t0_:.2f}x tokens/s ({d1 / d0:.2f}x after the first token); "
              f"first token {f1 * 1000:.0f} vs {f0 * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
