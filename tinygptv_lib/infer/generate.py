"""Greedy decoding with the KV cache from a multimodal prompt (batched, left-padded).

The prompt (with its image embeddings spliced in) runs once; each new token then reuses the cached
keys and values. Stops at EOS (50256) or at a stop string such as '###'.
"""
from __future__ import annotations

import torch

from ..model.sequence import build_prompt_batch


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], *, pixels: torch.Tensor | None = None,
                    queries: torch.Tensor | None = None, max_new_tokens: int = 20,
                    stop: tuple[str, ...] = ("###",), eos_id: int = 50256) -> list[str]:
    was_training = model.training
    model.eval()
    device = next(model.phi.parameters()).device
    batch = build_prompt_batch(tokenizer, prompts, num_query_tokens=model.cfg.qformer.num_query_tokens).to(device)
    embeds = model.embed(batch, pixels=pixels, queries=queries)
    mask = batch.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model.phi(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    nxt = out.logits[:, -1].argmax(-1)
    generated = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    texts = [""] * len(prompts)
    for _ in range(max_new_tokens):
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if t == eos_id:
                done[i] = True
                continue
            generated[i].append(t)
            texts[i] = tokenizer.decode(generated[i])
            if any(s in texts[i] for s in stop):
                done[i] = True
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = positions[:, -1:] + 1
        positions = torch.cat([positions, pos], dim=1)
        out = model.phi(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1)
    model.train(was_training)
    answers = []
    for t in texts:
        for s in stop:
            t = t.split(s)[0]
        answers.append(t.strip())
    return answers
