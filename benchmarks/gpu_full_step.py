"""Full-size TinyGPT-V on a GPU with random weights: peak memory and speed of a training step per
stage, and of fp16 inference, next to what `tinygptv_lib.memory_plan` planned for them. Needs a
CUDA GPU (or `--smoke`, which runs the same code on the CPU with the nano model); prints one line
per measurement.

    python benchmarks/gpu_full_step.py                 # each stage, fp16 + checkpointing, at the batch
                                                       # the plan gives a 16 GB T4, reference lengths
    python benchmarks/gpu_full_step.py --rows readme   # the rows of the README's earlier table
    python benchmarks/gpu_full_step.py --rows all --steps 3

Sequences are synthetic with the plan's lengths (tokens per row and answer tokens per row, e.g.
stage 4: 1 + 32 image + 64 prompt + 1024 answer tokens): the memory and speed hold, the losses mean
nothing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinygptv_lib import memory_plan as MP  # noqa: E402
from tinygptv_lib.model.sequence import IGNORE, IMAGE_SLOT, TextBatch, build_prompt_batch  # noqa: E402
from tinygptv_lib.model.tinygptv import build_model  # noqa: E402
from tinygptv_lib.tokenizer import load_tokenizer  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def synthetic_batch(batch: int, tokens: int, targets: int, queries: int = 32, seed: int = 0) -> TextBatch:
    """[BOS][32 image slots][prompt][answer]: `tokens` per row, the last `targets` are answers."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50000, (batch, tokens), generator=g)
    ids[:, 0] = 50256
    ids[:, 1:1 + queries] = IMAGE_SLOT
    tgt = torch.full_like(ids, IGNORE)
    tgt[:, tokens - targets:] = ids[:, tokens - targets:]
    return TextBatch(ids, torch.ones_like(ids), tgt, torch.ones(batch, dtype=torch.bool))


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def step_stats(stage: int, batch: int, img: int, ckpt: bool, precision: str, steps: int, device,
               preset: str = "full", tokens: int | None = None, targets: int | None = None) -> str:
    ref_img, _, ref_tokens, ref_targets = MP.REFERENCE[stage]
    tokens, targets = tokens or ref_tokens, targets or ref_targets
    dtype = DTYPES[precision]
    _reset_peak(device)
    torch.manual_seed(0)
    model = build_model(preset, stage=stage, device=device)
    if preset != "full":
        img = model.cfg.vision.img_size
    if img != model.cfg.vision.img_size:
        model.vision.set_image_size(img)
    if device.type == "cuda":
        model.cast_frozen(dtype)
    _reset_peak(device)  # measure the step, not the fp32 build before the cast
    if ckpt:
        model.enable_gradient_checkpointing()
    model.train()
    b = synthetic_batch(batch, tokens, targets, model.cfg.qformer.num_query_tokens).to(device)
    px = torch.randn(batch, 3, img, img, device=device)
    opt = torch.optim.AdamW(model.trainable_parameters().values(), lr=1e-5)
    amp = device.type == "cuda" and dtype != torch.float32
    scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)
    times = []
    for _ in range(steps + 1):  # the first step (allocator warm-up, AdamW state) is not timed
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = model(b, px)["loss"]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    rest = sorted(times[1:])
    t = rest[len(rest) // 2]
    peak = _peak_gib(device)
    del model, opt
    line = (f"train stage {stage} img {img} batch {batch} x {tokens} tokens ({targets} answer) {precision} "
            f"ckpt={ckpt}: loss {loss.item():.3f}, step {t * 1000:.0f} ms, {batch / t:.1f} samples/s")
    if preset == "full":
        plan = MP.plan_step(stage, precision, ckpt, img=img, batch=batch, tokens=tokens, targets=targets)
        measured = f"peak {peak:.2f} GiB" if peak is not None else "peak n/a"
        line += f"; {measured}, planned {plan.peak_gib:.2f} GiB ({plan.phase})"
    return line


def inference_stats(tok, device, new_tokens: int = 20, preset: str = "full") -> str:
    _reset_peak(device)
    model = build_model(preset, stage=4, device=device)
    if device.type == "cuda":
        model = model.cast_frozen(torch.float16).half()
    model.eval()
    img = 448 if preset == "full" else model.cfg.vision.img_size
    model.vision.set_image_size(img)
    _reset_peak(device)
    b = build_prompt_batch(tok, ["[INST] <Img><ImageHere></Img> [vqa] What is in the picture? [/INST]"],
                           num_query_tokens=model.cfg.qformer.num_query_tokens).to(device)
    px = torch.randn(1, 3, img, img, device=device, dtype=next(model.vision.parameters()).dtype)
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        emb = model.embed(b, px)
        out = model.phi(inputs_embeds=emb, attention_mask=b.attention_mask, use_cache=True, logits_to_keep=1)
        mask = b.attention_mask
        for _ in range(new_tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = model.phi(input_ids=nxt, attention_mask=mask, cache=out.cache, use_cache=True, logits_to_keep=1)
        _sync(device)
        dt = time.perf_counter() - t0
    peak = _peak_gib(device)
    precision = "fp16" if device.type == "cuda" else "fp32"
    line = f"{precision} inference {img} px, {new_tokens} new tokens: {dt / new_tokens * 1000:.1f} ms/token"
    if preset == "full":
        plan = sum(MP.plan_inference(img=img, prompt_tokens=int(mask.shape[1]) - new_tokens,
                                     new_tokens=new_tokens).values()) / 2**30
        line += f", peak {peak:.2f} GiB, planned {plan:.2f} GiB" if peak is not None else f", planned {plan:.2f} GiB"
    return line


def rows_for(which: str) -> list[tuple]:
    """(stage, batch, img, checkpointing, precision, tokens, targets); None lengths = the plan's."""
    plan = []
    for stage in (1, 2, 3, 4):  # fp16 + checkpointing at the largest batch the plan fits on a T4
        img = MP.REFERENCE[stage][0]
        plan.append((stage, max(1, MP.max_batch(stage, "fp16", True, img=img)), img, True, "fp16", None, None))
    readme = [(1, 16, 224, True, "fp16", 42, 9), (2, 16, 224, True, "bf16", 42, 9), (2, 16, 224, False, "bf16", 42, 9),
              (3, 6, 224, True, "fp16", 72, 11), (4, 2, 448, True, "fp16", 72, 11), (4, 4, 448, True, "bf16", 72, 11)]
    return {"plan": plan, "readme": readme, "all": plan + readme}[which]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", choices=("plan", "readme", "all"), default="plan")
    ap.add_argument("--smoke", action="store_true", help="nano model on the CPU, 1 step, tiny batches")
    args = ap.parse_args(argv)
    tok = load_tokenizer()
    if args.smoke:
        device, preset = torch.device("cpu"), "nano"
        torch.set_num_threads(1)
        print(inference_stats(tok, device, new_tokens=2, preset=preset), flush=True)
        for stage in (1, 4):
            print(step_stats(stage, 2, 0, stage == 4, "fp32", 1, device, preset=preset, tokens=40, targets=4),
                  flush=True)
        return 0
    assert torch.cuda.is_available(), "this script needs a CUDA GPU (or --smoke)"
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    print(inference_stats(tok, device), flush=True)
    for stage, batch, img, ckpt, precision, tokens, targets in rows_for(args.rows):
        print(step_stats(stage, batch, img, ckpt, precision, args.steps, device, tokens=tokens, targets=targets),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
