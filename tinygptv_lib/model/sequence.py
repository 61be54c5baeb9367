"""How an image and text become one training sequence (MiniGPT-v2 / TinyGPT-V layout).

    [BOS] [prompt tokens, with 32 image slots where `<ImageHere>` stood] [answer + end_sym] [PAD...]
    targets: -100 everywhere except the answer tokens and the end symbol.

The image slots carry the id IMAGE_SLOT (-200) in `input_ids`; the model swaps them for the 32
projected Q-Former outputs. Padding is on the right for training, on the left for generation.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

IMAGE_SLOT = -200
IGNORE = -100
PLACEHOLDER = "<ImageHere>"


@dataclass
class TextBatch:
    input_ids: torch.Tensor  # (B, T) token ids, IMAGE_SLOT at image positions, pad elsewhere unused
    attention_mask: torch.Tensor  # (B, T) 1 for real tokens and image slots
    targets: torch.Tensor  # (B, T) answer ids, IGNORE elsewhere
    has_image: torch.Tensor  # (B,) bool: which samples carry an image (text-only instructions exist)

    def to(self, device) -> "TextBatch":
        return TextBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.targets, self.has_image)))


def tokenize_prompt(tokenizer, prompt: str, num_query_tokens: int, max_prompt_len: int | None = None) -> list[int]:
    """Prompt text -> ids with `num_query_tokens` IMAGE_SLOT ids where the placeholder stands.

    At most one placeholder. A prompt over `max_prompt_len` tokens loses text from its start (with a
    warning), never image slots.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    n = prompt.count(PLACEHOLDER)
    if n > 1:
        raise ValueError(f"prompt has {n} '{PLACEHOLDER}' markers; TinyGPT-V takes one image per sample: {prompt[:80]!r}")
    before, _, after = prompt.partition(PLACEHOLDER)
    ids_before = tokenizer(before, add_special_tokens=False)["input_ids"] if before else []
    ids_after = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    slots = [IMAGE_SLOT] * num_query_tokens if n else []
    ids = ids_before + slots + ids_after
    if max_prompt_len is not None and len(ids) > max_prompt_len:
        if len(slots) > max_prompt_len:
            raise ValueError(f"max_prompt_len {max_prompt_len} cannot hold the {len(slots)} image slots")
        warnings.warn(f"prompt of {len(ids)} tokens truncated to {max_prompt_len} (text cut from the start; "
                      "the image is kept)", stacklevel=2)
        text_budget = max_prompt_len - len(slots)
        keep_after = min(len(ids_after), text_budget)
        keep_before = text_budget - keep_after
        ids = (ids_before[len(ids_before) - keep_before:] if keep_before else []) + slots + (
            ids_after[len(ids_after) - keep_after:] if keep_after else [])
    return ids


def build_batch(tokenizer, prompts: list[str], answers: list[str], **kwargs) -> TextBatch:
    """Training batch of single-turn samples (see `build_conversation_batch`)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    return build_conversation_batch(tokenizer, [[(p, a)] for p, a in zip(prompts, answers)], **kwargs)


def build_conversation_batch(tokenizer, conversations: list[list[tuple[str, str]]], *, num_query_tokens: int,
                             end_sym: str = "\n", max_txt_len: int = 32, bos_id: int = 50256,
                             pad_id: int = 50256, max_prompt_len: int | None = None) -> TextBatch:
    """Training batch, right-padded: [BOS] q1 a1+end q2 a2+end ... with targets on the answers only.

    Only the first question may hold the image. Later questions are prefixed with the BOS token, as
    in MiniGPT-v2's multi-turn data. Everything after the first question (answers and later turns)
    is cut to `max_txt_len` tokens, so the image and the first prompt are never cut by it.
    """
    rows, tgts, has_image = [], [], []
    for turns in conversations:
        if not turns:
            raise ValueError("a conversation needs at least one (question, answer) turn")
        first = tokenize_prompt(tokenizer, turns[0][0], num_query_tokens, max_prompt_len)
        ids, tgt = [bos_id] + first, [IGNORE] * (1 + len(first))
        rest_ids: list[int] = []
        rest_tgt: list[int] = []
        for k, (question, answer) in enumerate(turns):
            if k > 0:
                if PLACEHOLDER in question:
                    raise ValueError(f"'{PLACEHOLDER}' may only appear in the first question, found in turn {k}")
                q = [bos_id] + tokenizer(question, add_special_tokens=False)["input_ids"]
                rest_ids += q
                rest_tgt += [IGNORE] * len(q)
            a = tokenizer(answer + end_sym, add_special_tokens=False)["input_ids"]
            rest_ids += a
            rest_tgt += a
        rows.append(ids + rest_ids[:max_txt_len])
        tgts.append(tgt + rest_tgt[:max_txt_len])
        has_image.append(IMAGE_SLOT in first)
    T = max(len(r) for r in rows)
    ids_t = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, tgts)):
        ids_t[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        targets[i, : len(t)] = torch.tensor(t)
    return TextBatch(ids_t, mask, targets, torch.tensor(has_image))


def build_prompt_batch(tokenizer, prompts: list[str], *, num_query_tokens: int, bos_id: int = 50256,
                       pad_id: int = 50256, max_prompt_len: int | None = None) -> TextBatch:
    """Generation batch: [BOS] + prompt, left-padded so every row ends where generation begins."""
    rows = [[bos_id] + tokenize_prompt(tokenizer, p, num_query_tokens, max_prompt_len) for p in prompts]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    targets = torch.full_like(ids, IGNORE)
    return TextBatch(ids, mask, targets, torch.tensor([IMAGE_SLOT in r for r in rows]))
