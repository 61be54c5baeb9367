"""Full-size TinyGPT-V on a GPU with random weights: peak memory and speed of a training step per
stage, and of fp16 inference. Needs a CUDA GPU; prints one line per measurement.

    python benchmarks/gpu_full_step.py [--steps 3]
"""
from __future__ import annotations

import argparse
import time

import torch

from tinygptv_lib.model.sequence import build_batch, build_prompt_batch
from tinygptv_lib.model.tinygptv import build_model
from tinygptv_lib.tokenizer import load_tokenizer


def step_stats(stage: int, batch: int, img: int, ckpt: bool, dtype: torch.dtype, steps: int, tok) -> str:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = build_model("full", stage=stage, device="cuda")
    if img != model.cfg.vision.img_size:
        model.vision.set_image_size(img)
    model.cast_frozen(dtype)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()  # measure the step, not the fp32 build before the cast
    if ckpt:
        model.enable_gradient_checkpointing()
    model.train()
    cfg = model.cfg
    if stage <= 2:
        prompts, answers, end, max_len = ["<ImageHere>"] * batch, ["a photo of a dog on a beach"] * batch, "\n", 32
    else:
        prompts = ["[INST] <Img><ImageHere></Img> [vqa] What is the man holding in his left hand? [/INST]"] * batch
        answers, end, max_len = ["He is holding a red umbrella over the child."] * batch, "###", 160
    b = build_batch(tok, prompts, answers, num_query_tokens=32, end_sym=end, max_txt_len=max_len).to("cuda")
    px = torch.randn(batch, 3, img, img, device="cuda")
    opt = torch.optim.AdamW(model.trainable_parameters().values(), lr=1e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    times = []
    for _ in range(steps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype):
            loss = model(b, px)["loss"]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t = sorted(times[1:])[len(times[1:]) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opt
    return (f"train stage {stage} img {img} batch {batch} {str(dtype)[6:]} ckpt={ckpt}: loss {loss.item():.3f} "
            f"peak {peak:.1f} GiB, step {t * 1000:.0f} ms, {batch / t:.1f} samples/s")


def inference_stats(tok, new_tokens: int = 20) -> str:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_model("full", stage=4, device="cuda").cast_frozen(torch.float16).half().eval()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    b = build_prompt_batch(tok, ["[INST] <Img><ImageHere></Img> [vqa] What is in the picture? [/INST]"],
                           num_query_tokens=32).to("cuda")
    px = torch.randn(1, 3, 448, 448, device="cuda", dtype=torch.float16)
    model.vision.set_image_size(448)
    with torch.no_grad():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        emb = model.embed(b, px)
        out = model.phi(inputs_embeds=emb, attention_mask=b.attention_mask, use_cache=True)
        mask = b.attention_mask
        for _ in range(new_tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = model.phi(input_ids=nxt, attention_mask=mask, cache=out.cache, use_cache=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30
    return f"fp16 inference 448 px, {new_tokens} new tokens: peak {peak:.1f} GiB, {dt / new_tokens * 1000:.1f} ms/token"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this script needs a CUDA GPU"
    tok = load_tokenizer()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    print(inference_stats(tok), flush=True)
    plans = [(1, 16, 224, True, torch.float16), (2, 16, 224, True, torch.bfloat16), (2, 16, 224, False, torch.bfloat16),
             (3, 6, 224, True, torch.float16), (4, 2, 448, True, torch.float16), (4, 4, 448, True, torch.bfloat16)]
    for stage, batch, img, ckpt, dtype in plans:
        print(step_stats(stage, batch, img, ckpt, dtype, args.steps, tok), flush=True)


if __name__ == "__main__":
    main()
