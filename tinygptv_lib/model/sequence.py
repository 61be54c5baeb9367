"""How an image and text become one training sequence (MiniGPT-v2 / TinyGPT-V layout).

    [BOS] [prompt tokens, with 32 image slots where `<ImageHere>` stood] [answer + end_sym] [PAD...]
    targets: -100 everywhere except the answer tokens and the end symbol.

The image slots carry the id IMAGE_SLOT (-200) in `input_ids`; the model swaps them for the 32
projected Q-Former outputs. Padding is on the right for training, on the left for generation.

Bad prompts are refused here with a message that says what is wrong, before any model runs:
text that is not valid UTF-8, an empty prompt, more than one `<ImageHere>`, a placeholder in a
later turn, and (where the caller says which samples carry an image) a placeholder without an
image or an image without a placeholder. Near misses that are probably mistakes but may be meant
(an unknown stage-4 task identifier such as `[foo]`, a mis-spelt marker such as `<imagehere>` or
LLaVA's `<image>`) give a warning and are read as plain text.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

IMAGE_SLOT = -200
IGNORE = -100
PLACEHOLDER = "<ImageHere>"

# MiniGPT-v2's stage-4 task identifiers (TINYGPTV_REFERENCE.md 2). A prompt may carry one right after
# the image (`<Img><ImageHere></Img> [vqa] ...`) or, without an image, at its start.
TASK_IDS = ("vqa", "caption", "refer", "identify", "grounding", "detection")
_TASK_AT = re.compile(r"(?:^|(?<=</Img>)|(?<=\[INST\]))\s*\[([A-Za-z][\w-]*)\]")
_TEMPLATE_WORDS = {"INST"}
_NEAR_MARKER = re.compile(r"<\s*image\s*(?:here)?\s*>", re.IGNORECASE)


class UnknownTaskWarning(UserWarning):
    """A prompt names a task identifier TinyGPT-V was not trained with."""


class PromptWarning(UserWarning):
    """A prompt holds something that looks like a mistake (e.g. a mis-spelt image marker)."""


def as_text(value, what: str = "prompt") -> str:
    """A prompt or answer as a str that is valid Unicode, or a clear error.

    bytes are decoded as UTF-8 (strictly); a str may not hold lone surrogates (what decoding with
    errors='surrogateescape' leaves for bytes that are not UTF-8), which the tokenizer cannot take.
    """
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what} is not valid UTF-8: byte {bytes(value)[e.start:e.start + 1]!r} at "
                             f"position {e.start} ({e.reason})") from None
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} holds {value[e.start]!r} at position {e.start}, which is not valid Unicode "
                         "text (a byte that was not UTF-8, kept by errors='surrogateescape'?); decode the "
                         "source as UTF-8 first") from None
    return value


def _warn_near_misses(prompt: str) -> None:
    for m in _TASK_AT.finditer(prompt):
        task = m.group(1)
        if task not in TASK_IDS and task not in _TEMPLATE_WORDS:
            warnings.warn(f"prompt names the task identifier [{task}], which TinyGPT-V was not trained with; "
                          f"known identifiers: {', '.join(f'[{t}]' for t in TASK_IDS)}", UnknownTaskWarning,
                          stacklevel=3)
    for m in _NEAR_MARKER.finditer(prompt.replace(PLACEHOLDER, "")):
        warnings.warn(f"prompt holds {m.group(0)!r}, which is not the image marker '{PLACEHOLDER}' (spelling and "
                      "case matter); it is read as plain text", PromptWarning, stacklevel=3)


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

    At most one placeholder; the prompt may not be empty (only whitespace). A prompt over
    `max_prompt_len` tokens loses text from its start (with a warning), never image slots.
    """
    prompt = as_text(prompt, "prompt")
    if max_prompt_len is not None and max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be at least 1, got {max_prompt_len}")
    n = prompt.count(PLACEHOLDER)
    if n > 1:
        raise ValueError(f"prompt has {n} '{PLACEHOLDER}' markers; TinyGPT-V takes one image per sample: {prompt[:80]!r}")
    if n == 0 and not prompt.strip():
        raise ValueError("empty prompt: it has neither text nor an image placeholder")
    _warn_near_misses(prompt)
    before, _, after = prompt.partition(PLACEHOLDER)
    ids_before = tokenizer(before, add_special_tokens=False)["input_ids"] if before else []
    ids_after = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    slots = [IMAGE_SLOT] * num_query_tokens if n else []
    ids = ids_before + slots + ids_after
    if max_prompt_len is not None and len(ids) > max_prompt_len:
        if len(slots) > max_prompt_len:
            raise ValueError(f"max_prompt_len {max_prompt_len} cannot hold the {len(slots)} image slots")
        warnings.warn(f"prompt of {len(ids)} tokens truncated to {max_prompt_len} (text cut from the start; "
                      "the image is kept whole)", PromptWarning, stacklevel=2)
        text_budget = max_prompt_len - len(slots)
        keep_after = min(len(ids_after), text_budget)
        keep_before = text_budget - keep_after
        ids = (ids_before[len(ids_before) - keep_before:] if keep_before else []) + slots + (
            ids_after[len(ids_after) - keep_after:] if keep_after else [])
    return ids


def _check_images(has_image: Sequence[bool] | None, rows_with_slots: list[bool]) -> None:
    """Where the caller says which samples come with an image, placeholders must agree."""
    if has_image is None:
        return
    if len(has_image) != len(rows_with_slots):
        raise ValueError(f"has_image lists {len(has_image)} samples for a batch of {len(rows_with_slots)}")
    for i, (given, slot) in enumerate(zip(has_image, rows_with_slots)):
        if given and not slot:
            raise ValueError(f"sample {i}: an image was given but the prompt has no '{PLACEHOLDER}' "
                             "(write <Img><ImageHere></Img> where the image belongs)")
        if slot and not given:
            raise ValueError(f"sample {i}: the prompt has '{PLACEHOLDER}' but no image was given")


def build_batch(tokenizer, prompts: list[str], answers: list[str], **kwargs) -> TextBatch:
    """Training batch of single-turn samples (see `build_conversation_batch`)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    return build_conversation_batch(tokenizer, [[(p, a)] for p, a in zip(prompts, answers)], **kwargs)


def build_conversation_batch(tokenizer, conversations: list[list[tuple[str, str]]], *, num_query_tokens: int,
                             end_sym: str = "\n", max_txt_len: int = 32, bos_id: int = 50256,
                             pad_id: int = 50256, max_prompt_len: int | None = None,
                             has_image: Sequence[bool] | None = None) -> TextBatch:
    """Training batch, right-padded: [BOS] q1 a1+end q2 a2+end ... with targets on the answers only.

    Only the first question may hold the image. Later questions are prefixed with the BOS token, as
    in MiniGPT-v2's multi-turn data. Everything after the first question (answers and later turns)
    is cut to `max_txt_len` tokens, so the image and the first prompt are never cut by it.
    `has_image` (optional, one bool per conversation): which samples come with an image; a
    placeholder without an image, or an image without a placeholder, is then an error.
    """
    if not conversations:
        raise ValueError("no conversations given")
    rows, tgts, slots_seen = [], [], []
    for c, turns in enumerate(conversations):
        if not turns:
            raise ValueError(f"conversation {c}: needs at least one (question, answer) turn")
        for k, turn in enumerate(turns):
            if not isinstance(turn, (tuple, list)) or len(turn) != 2:
                raise ValueError(f"conversation {c}, turn {k}: expected a (question, answer) pair, got {turn!r:.80}")
        first = tokenize_prompt(tokenizer, turns[0][0], num_query_tokens, max_prompt_len)
        ids, tgt = [bos_id] + first, [IGNORE] * (1 + len(first))
        rest_ids: list[int] = []
        rest_tgt: list[int] = []
        for k, (question, answer) in enumerate(turns):
            answer = as_text(answer, f"conversation {c}, turn {k}: answer")
            if k > 0:
                question = as_text(question, f"conversation {c}, turn {k}: question")
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
        slots_seen.append(IMAGE_SLOT in first)
    _check_images(has_image, slots_seen)
    T = max(len(r) for r in rows)
    ids_t = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, tgts)):
        ids_t[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        targets[i, : len(t)] = torch.tensor(t)
    return TextBatch(ids_t, mask, targets, torch.tensor(slots_seen, dtype=torch.bool))


def build_prompt_batch(tokenizer, prompts: list[str], *, num_query_tokens: int, bos_id: int = 50256,
                       pad_id: int = 50256, max_prompt_len: int | None = None,
                       has_image: Sequence[bool] | None = None) -> TextBatch:
    """Generation batch: [BOS] + prompt, left-padded so every row ends where generation begins.

    `has_image` as in `build_conversation_batch`."""
    if not prompts:
        raise ValueError("no prompts given")
    rows = [[bos_id] + tokenize_prompt(tokenizer, p, num_query_tokens, max_prompt_len) for p in prompts]
    _check_images(has_image, [IMAGE_SLOT in r for r in rows])
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    targets = torch.full_like(ids, IGNORE)
    return TextBatch(ids, mask, targets, torch.tensor([IMAGE_SLOT in r for r in rows], dtype=torch.bool))
