"""Held-out shapes-world checks used after each course stage: colour, shape and counting questions,
and referring boxes. Scenes come from the world's evaluation seed stream, never seen in training.
"""
from __future__ import annotations

from collections import Counter

import torch

from ..data import world as W
from ..data.images import preprocess
from ..infer.generate import greedy_generate
from .metrics import normalize_answer
from ..tokenizer import load_tokenizer

PROMPT = "[INST] <Img><ImageHere></Img> {} [/INST]"
CHANCE = {"colour": 1 / len(W.COLOURS), "shape": 1 / len(W.SHAPES), "count": 1 / 5, "refer_iou50": None}


def eval_items(n_scenes: int, seed: int = 0, size: int = 224) -> list[dict]:
    items = []
    for i in range(n_scenes):
        scene = W.make_scene(W.derive_seed(seed, "eval/course", i), size)
        qas = W.vqa_items(scene)
        for qtype in ("colour", "shape", "count"):
            pick = [q for q in qas if q.qtype == qtype]
            if pick:
                q = pick[i % len(pick)]
                items.append({"scene": scene, "kind": qtype, "question": f"[vqa] {q.question}", "answer": q.answer})
        refs = W.referring_expressions(scene)
        if refs:
            r = refs[i % len(refs)]
            items.append({"scene": scene, "kind": "refer_iou50", "question": f"[refer] {r.sentences[0]}",
                          "box": r.bbox})
    return items


def normalise(text: str) -> str:
    """VQA's answer normalisation (lower case, punctuation, number words -> digits, no articles), so
    "Two." matches "2" and "a star" matches "star", as the VQA benchmarks score them."""
    return normalize_answer(text)


REFER_OUTCOMES = ("right", "imprecise", "wrong object", "no box")


def refer_outcome(answer: str, scene, box) -> str:
    """Why a [refer] answer scores or not: 'right' (IoU > 0.5 with the true box), 'imprecise' (the
    answer's box overlaps the true one, and no other object's more, but IoU <= 0.5), 'wrong object'
    (it lies on another object, or on nothing), or 'no box' (none, or a malformed one, in the answer).
    Splits a low refer score into finding the object and writing its box precisely."""
    try:
        got = W.box_from_text(answer, scene.width, scene.height)
    except ValueError:
        return "no box"
    truth = W.iou(got, box)
    if truth > 0.5:
        return "right"
    others = [W.iou(got, o.bbox) for o in scene.objects if tuple(o.bbox) != tuple(box)]
    return "imprecise" if truth > 0 and truth >= max(others, default=0.0) else "wrong object"


@torch.no_grad()
def evaluate_shapes(model, n_scenes: int = 60, seed: int = 0, batch_size: int = 32,
                    refer_outcomes: Counter | None = None) -> dict:
    """Accuracy per question kind (exact match after VQA's normalisation) and the share of boxes with IoU > 0.5.
    `refer_outcomes`, if given, counts each [refer] answer's `refer_outcome`."""
    tok = load_tokenizer()
    items = eval_items(n_scenes, seed)
    size = model.cfg.vision.img_size
    device = next(model.phi.parameters()).device
    dtype = next(model.vision.parameters()).dtype
    scores: dict[str, list[float]] = {}
    for k in range(0, len(items), batch_size):
        chunk = items[k:k + batch_size]
        pixels = torch.stack([preprocess(W.render(it["scene"]), size) for it in chunk]).to(device, dtype=dtype)
        answers = greedy_generate(model, tok, [PROMPT.format(it["question"]) for it in chunk], pixels=pixels,
                                  max_new_tokens=24)
        for it, ans in zip(chunk, answers):
            if it["kind"] == "refer_iou50":
                outcome = refer_outcome(ans, it["scene"], it["box"])
                ok = outcome == "right"
                if refer_outcomes is not None:
                    refer_outcomes[outcome] += 1
            else:
                ok = normalise(ans) == normalise(it["answer"])
            scores.setdefault(it["kind"], []).append(float(ok))
    return {k: sum(v) / len(v) for k, v in scores.items()}

