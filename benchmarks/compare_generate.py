"""Generation speed: ours with the KV cache, ours without it, and transformers' BLIP-2 `generate`.

    python benchmarks/compare_generate.py                   # nano, batch 1 and 8, 64 new tokens, 5 runs
    python benchmarks/compare_generate.py --threads 1 --repeats 7
    python benchmarks/compare_generate.py --smoke           # tiny size, 4 tokens, 1 run

Same prompt and images for all three, exactly `--new-tokens` tokens per row (no stop string, no EOS
stop; the peer gets min_new_tokens = max_new_tokens), greedy. tokens/s = rows x new tokens / the
whole call (image encoding and prompt pass included); time to first token = a call for one token.
Runs alternate between the ways after one warm-up each. The peer is `Blip2ForConditionalGeneration`
+ peft LoRA with the same dimensions as ours (see _common.py); its `generate` always uses its
cache when given embeddings, so only ours is timed without one.

The script also measures the machine's memory read bandwidth and the vocabulary head alone, as
`nn.Linear` runs it and as our decoding loop does: every step reads the whole fp32 head (51,200 x
width x 4 bytes), a floor no decoding loop goes under.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import _common as C
from tinygptv_lib.model.sequence import IMAGE_SLOT, build_prompt_batch
from tinygptv_lib.tokenizer import load_tokenizer

PROMPT = "[INST] <Img><ImageHere></Img> [vqa] What colour is the largest shape? [/INST]"


def our_generate(model, tok, prompts, pixels, new_tokens: int, use_cache: bool):
    from tinygptv_lib.infer.generate import generate

    return generate(model, tok, prompts, pixels=pixels, max_new_tokens=new_tokens, stop=(), eos_id=None,
                    use_cache=use_cache)


def read_bandwidth(mb: int = 256) -> float:
    """Bytes per second read by a sum over a large tensor (best of 5)."""
    src = torch.randn(mb * 2**20 // 4)
    src.sum()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t0)
    return src.numel() * 4 / best


def head_time(model, batch: int, runs: int = 15) -> dict[str, list[float]]:
    """Seconds of the vocabulary head alone for one decoding step (batch rows, one position): as
    `nn.Linear` computes it (what the peer runs) and as our decoding loop does (`_DecodeHead`)."""
    from tinygptv_lib.infer.generate import _DecodeHead

    head = model.phi.lm_head
    ways = {"linear": head, "ours": _DecodeHead(head, head.out_features)}
    h = torch.randn(batch, head.in_features)
    times = {}
    with torch.no_grad():
        for name, fn in ways.items():
            fn(h)
            times[name] = []
            for _ in range(runs):
                t0 = time.perf_counter()
                fn(h)
                times[name].append(time.perf_counter() - t0)
    return times


def measure(size: C.Size, batch: int, new_tokens: int, repeats: int, tok) -> dict:
    ours = C.build_ours(size, stage=4).eval()
    peer = C.build_peer(size).eval()
    peer.generation_config.pad_token_id = C.BOS
    prompts = [PROMPT] * batch
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, size.img, size.img, generator=g)
    pb = build_prompt_batch(tok, prompts, num_query_tokens=size.queries)
    peer_ids = pb.input_ids.masked_fill(pb.input_ids == IMAGE_SLOT, C.image_token(size))

    def peer_gen(n: int):
        with torch.no_grad():
            out = peer.generate(pixel_values=pixels, input_ids=peer_ids, attention_mask=pb.attention_mask,
                                max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out

    got = our_generate(ours, tok, prompts, pixels, new_tokens, True)
    assert all(len(t) == new_tokens for t in got.tokens), "ours stopped early"
    nocache = our_generate(ours, tok, prompts, pixels, new_tokens, False)
    assert nocache.tokens == got.tokens, "the KV cache changed the greedy tokens"
    out = peer_gen(new_tokens)
    assert out.shape[1] - peer_ids.shape[1] == new_tokens, f"peer made {out.shape[1] - peer_ids.shape[1]} tokens"

    full = C.alternate({
        "ours_cache": lambda: our_generate(ours, tok, prompts, pixels, new_tokens, True),
        "ours_nocache": lambda: our_generate(ours, tok, prompts, pixels, new_tokens, False),
        "peer": lambda: peer_gen(new_tokens),
    }, repeats)
    first = C.alternate({
        "ours_cache": lambda: our_generate(ours, tok, prompts, pixels, 1, True),
        "peer": lambda: peer_gen(1),
    }, repeats)
    return {"batch": batch, "new_tokens": new_tokens, "prompt_tokens": int(pb.attention_mask[0].sum()),
            "full": full, "first": first, "head": head_time(ours, batch)}


def report(r: dict) -> list[str]:
    n = r["batch"] * r["new_tokens"]
    lines = [f"-- batch {r['batch']}, {r['prompt_tokens']} prompt tokens (32 image), {r['new_tokens']} new tokens per row"]
    rate = {}
    for k, name in (("ours_cache", "ours, KV cache"), ("ours_nocache", "ours, no cache"),
                    ("peer", "peer generate (KV cache)")):
        t = r["full"][k]
        rate[k] = n / C.med(t)
        first = r["first"].get(k)
        ttft = (f"; time to first token median {C.med(first) * 1e3:.0f} ms, min {min(first) * 1e3:.0f} ms"
                if first else "")
        lines.append(f"  {name}: {rate[k]:.0f} tokens/s (median {C.med(t) * 1e3:.0f} ms, min {min(t) * 1e3:.0f} ms "
                     f"per call; {C.med(t) / r['new_tokens'] * 1e3:.1f} ms per step){ttft}")
    step = C.med(r["full"]["ours_cache"]) / r["new_tokens"]
    lin, own = r["head"]["linear"], r["head"]["ours"]
    lines.append(f"  the vocabulary head alone: nn.Linear median {C.med(lin) * 1e3:.1f} ms (min {min(lin) * 1e3:.1f}); "
                 f"ours median {C.med(own) * 1e3:.1f} ms (min {min(own) * 1e3:.1f}), "
                 f"{C.med(own) / step:.0%} of ours' median step with the cache")
    best = {k: n / min(r["full"][k]) for k in rate}
    lines.append(f"  ours (cache) / peer: {rate['ours_cache'] / rate['peer']:.2f}x tokens/s at the median, "
                 f"{best['ours_cache'] / best['peer']:.2f}x at the min")
    lines.append(f"  KV cache / no cache: {rate['ours_cache'] / rate['ours_nocache']:.2f}x at the median, "
                 f"{best['ours_cache'] / best['ours_nocache']:.2f}x at the min")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="nano", choices=sorted(C.SIZES))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--smoke", action="store_true", help="tiny size, batch 1 and 2, 4 tokens, 1 run")
    args = ap.parse_args(argv)
    if args.smoke:
        args.size, args.batches, args.new_tokens, args.repeats = "smoke", [1, 2], 4, 1
    C.set_threads(args.threads)
    size = C.SIZES[args.size]
    print(C.machine_line(), flush=True)
    print(f"== {size.describe()}", flush=True)
    bw = read_bandwidth(16 if args.smoke else 256)
    head = size.vocab * size.phi_width * 4
    print(f"memory read bandwidth (sum over a large tensor, best of 5): {bw / 1e9:.1f} GB/s; the fp32 vocabulary "
          f"head ({head / 1e6:.0f} MB) read once per step costs >= {head / bw * 1e3:.1f} ms "
          f"(<= {bw / head:.0f} steps/s at any batch)", flush=True)
    tok = load_tokenizer()
    results = []
    for batch in args.batches:
        r = measure(size, batch, args.new_tokens, args.repeats, tok)
        results.append(r)
        print("\n".join(report(r)), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": size.name, "bandwidth": bw, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
