"""Training step, ours against transformers' BLIP-2 (+ peft), in one process, and CPU efficiency.

    python benchmarks/compare_train.py                      # nano and larger, 7 alternating runs each
    python benchmarks/compare_train.py --sizes nano --repeats 9 --threads 1
    python benchmarks/compare_train.py --smoke              # tiny sizes, 1 run: proves the script runs

Both models get identical work: the same towers (ViT, Q-Former run every step, no cached features),
batch, sequence (32 image + 16 prompt + 32 answer tokens), LoRA rank and trainable norms; forward,
backward and an AdamW step. Runs alternate between the two (and a torch.mm probe) after one warm-up
step each, so a neighbour's load falls on all of them alike; medians and minima are printed.

CPU efficiency: useful FLOPs of a step (counted by torch's FLOP counter on our step, which does no
work at positions without a target; the peer's count minus its logits at such positions) divided
by the step time, against the rate of a 2048 x 2048 fp32 torch.mm measured in the same alternation.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import _common as C


def measure(size: C.Size, batch: int, repeats: int, mm_n: int) -> dict:
    b = C.make_step_batch(size, batch)
    ours, peer = C.build_ours(size, stage=2), C.build_peer(size)
    C.set_train(ours, peer=False)
    C.set_train(peer, peer=True)
    opt_o = torch.optim.AdamW(C.trainable(ours), lr=1e-4)
    opt_p = torch.optim.AdamW(C.trainable(peer), lr=1e-4)
    step_o = lambda: C.train_step(ours, C.ours_loss, b, opt_o)  # noqa: E731
    step_p = lambda: C.train_step(peer, C.peer_loss, b, opt_p)  # noqa: E731
    step_o(), step_p()  # optimizer state exists from here on

    flops_o, flops_p = C.count_flops(step_o), C.count_flops(step_p)
    T = b.peer_ids.shape[1]
    untargeted = batch * T - b.num_targets  # positions whose logits the peer computes for nothing
    waste_p = 2 * 2 * untargeted * size.phi_width * size.vocab  # head forward + its input gradient
    mem = {}
    for name, model, step, opt in (("ours", ours, step_o, opt_o), ("peer", peer, step_p, opt_p)):
        resident = C.param_bytes(model) + sum(t.numel() * t.element_size() for s in opt.state.values()
                                              for t in s.values() if torch.is_tensor(t))
        mem[name] = {"resident_bytes": resident, "step_peak_bytes": C.peak_tensor_bytes(step)}

    mm, mm_flops = C.mm_rate_fn(mm_n)
    times = C.alternate({"ours": step_o, "peer": step_p, "mm": mm}, repeats)
    return {
        "size": size.name, "describe": size.describe(), "batch": batch, "seq": T, "targets": b.num_targets,
        "trainable": {"ours": sum(p.numel() for p in C.trainable(ours)),
                      "peer": sum(p.numel() for p in C.trainable(peer))},
        "flops": {"ours": flops_o, "peer": flops_p, "peer_untargeted_logits": waste_p,
                  "peer_useful": flops_p - waste_p},
        "times": times, "mm_flops": mm_flops, "memory": mem,
    }


def report(r: dict) -> list[str]:
    t, f = r["times"], r["flops"]
    mo, mp, mm = (C.med(t[k]) for k in ("ours", "peer", "mm"))
    mm_rate, mm_best = r["mm_flops"] / mm, r["mm_flops"] / min(t["mm"])
    lines = [f"== {r['describe']}",
             f"batch {r['batch']}, {r['seq']} tokens per row (32 image + 16 prompt + 32 answer), "
             f"{r['targets']} targets; trainable params ours {r['trainable']['ours']:,}, "
             f"peer {r['trainable']['peer']:,}"]
    for k, name in (("ours", "ours"), ("peer", "peer (transformers Blip2ForConditionalGeneration + peft)")):
        m = r["memory"][k]
        lines.append(f"  {name}: step median {C.med(t[k]) * 1e3:.0f} ms, min {min(t[k]) * 1e3:.0f} ms "
                     f"(runs: {' '.join(f'{x * 1e3:.0f}' for x in t[k])}); "
                     f"peak memory {(m['resident_bytes'] + m['step_peak_bytes']) / 2**20:.0f} MiB "
                     f"(weights + AdamW state {m['resident_bytes'] / 2**20:.0f} MiB, "
                     f"step {m['step_peak_bytes'] / 2**20:.0f} MiB)")
    paired = [p / o for p, o in zip(t["peer"], t["ours"])]  # the two ran back to back in each round
    lines.append(f"  speed-up (peer / ours): median {mp / mo:.2f}x, min {min(t['peer']) / min(t['ours']):.2f}x, "
                 f"median of the rounds' ratios {C.med(paired):.2f}x")
    lines.append(f"  FLOPs per step: ours {f['ours'] / 1e9:.1f} G, peer {f['peer'] / 1e9:.1f} G "
                 f"(of which logits at positions without a target {f['peer_untargeted_logits'] / 1e9:.1f} G, "
                 f"{f['peer_untargeted_logits'] / f['peer']:.0%})")
    lines.append(f"  torch.mm fp32: median {mm_rate / 1e9:.0f} GFLOP/s, best {mm_best / 1e9:.0f} GFLOP/s")
    for k, useful in (("ours", f["ours"]), ("peer", f["peer_useful"])):
        rate = useful / C.med(t[k])
        lines.append(f"  CPU efficiency {k}: useful {useful / 1e9:.1f} GFLOP / median step = {rate / 1e9:.0f} GFLOP/s "
                     f"= {rate / mm_rate:.0%} of median torch.mm (all executed FLOPs: {f[k] / C.med(t[k]) / 1e9:.0f} "
                     f"GFLOP/s); at min step {useful / min(t[k]) / mm_best:.0%} of best torch.mm")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["nano", "larger"], choices=sorted(C.SIZES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--mm-n", type=int, default=2048, help="torch.mm probe size (n x n)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--smoke", action="store_true", help="tiny size, batch 2, 1 run: only proves it runs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sizes, args.batch, args.repeats, args.mm_n = ["smoke"], 2, 1, 256
    C.set_threads(args.threads)
    print(C.machine_line(), flush=True)
    results = []
    for name in args.sizes:
        r = measure(C.SIZES[name], args.batch, args.repeats, args.mm_n)
        results.append(r)
        print("\n".join(report(r)), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
