"""How good are the pretrained backbones? Numbers measured on held-out scenes only.

- `retrieval`: image -> text top-1 among N held-out captions (chance 1/N), and text -> image.
  A retrieved caption counts as right when its words equal the true caption's (two scenes can
  share a short caption).
- `sheet_probe`: the caption decoder writes each held-out scene sheet with the true text so far
  given (teacher forcing); we score the tokens that carry colour, shape, size and count, and the
  four numbers of every box (mean error on 0..100, and how often the box overlaps the truth with
  IoU > 0.5). A direct look at what the 32 frozen queries know.
- `slot_probe`: what the linear slot head reads off the frozen queries, object by object.
- `perplexity`: exp(mean next-token loss) of a Phi on held-out documents (facts in the image slot not predicted).
- `sheet_reading`: the course's held-out questions put to Phi alone, with the true scene sheet as
  text where the image will stand: what Phi could answer if the image tokens said everything.
  The course's scores after the stages sit under this ceiling.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..data import world as W
from . import heads as H
from . import texts as T
from .language_stage import pad_documents


@torch.no_grad()
def retrieval(queries_fn: Callable, contrastive, tokenizer, vocab: H.CompactVocab, scenes: list[W.Scene],
              pixels: torch.Tensor, max_len: int = 160, batch: int = 50) -> dict:
    """Top-1 retrieval accuracy both ways over the given held-out scenes."""
    texts = [T.contrastive_text(s) for s in scenes]
    ids = H.pad_rows([vocab.encode(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts], max_len)
    img = torch.cat([contrastive.image_feats(queries_fn(pixels[i:i + batch])) for i in range(0, len(scenes), batch)])
    txt = torch.cat([contrastive.text_feats(ids[i:i + batch]) for i in range(0, len(scenes), batch)])
    sims = H.itc_logits(img, txt, torch.tensor(1.0))  # (images, texts)
    i2t = sum(texts[j] == texts[i] for i, j in enumerate(sims.argmax(1).tolist()))
    t2i = sum(texts[j] == texts[i] for i, j in enumerate(sims.argmax(0).tolist()))
    n = len(scenes)
    return {"image_to_text_top1": i2t / n, "text_to_image_top1": t2i / n, "n": n, "chance": 1 / n}


def _token_classes(tokenizer, vocab: H.CompactVocab) -> dict[str, set[int]]:
    """Compact rows of the words that name a colour, a shape, a size, a count, and of box numbers."""
    def first_rows(words) -> set[int]:
        out = set()
        for w in words:
            for text in (f" {w}", w):
                out.add(vocab.row.get(tokenizer(text, add_special_tokens=False)["input_ids"][0], H.UNK))
        return out - {H.UNK}

    digits = {vocab.row[t]: int(tokenizer.decode([t])) for t in vocab.token_ids
              if tokenizer.decode([t]).isdigit() and int(tokenizer.decode([t])) <= 100}
    return {"colour": first_rows(W.COLOURS), "shape": first_rows(W.SHAPES), "size": first_rows(W.SIZES),
            "count": first_rows(W.NUMBER_WORDS[1:]), "number": set(digits), "_values": digits}


@torch.no_grad()
def sheet_probe(queries_fn: Callable, decoder, tokenizer, vocab: H.CompactVocab, scenes: list[W.Scene],
                pixels: torch.Tensor, max_len: int = 160, batch: int = 50) -> dict:
    """Teacher-forced accuracy of the caption decoder on held-out scene sheets, by kind of token."""
    classes = _token_classes(tokenizer, vocab)
    values = classes.pop("_values")
    number_rows = torch.tensor(sorted(values))
    number_vals = torch.tensor([values[r] for r in sorted(values)])
    hits = {k: [0, 0] for k in classes}
    errors, ious = [], []
    for start in range(0, len(scenes), batch):
        chunk = scenes[start:start + batch]
        rows = [[H.SHEET] + vocab.encode(tokenizer(T.scene_sheet(s), add_special_tokens=False)["input_ids"])
                + [H.END] for s in chunk]
        ids = H.pad_rows(rows, max_len + 1)
        logits = decoder(queries_fn(pixels[start:start + batch]), ids)
        ids = ids[:, 1:]  # the targets: logits[:, t] predicts ids[:, t + 1]
        pred = logits.argmax(-1)
        best_number = number_vals[logits[..., number_rows].argmax(-1)]  # the likeliest of 0..100
        for b in range(len(chunk)):
            coords = []
            for t in range(len(rows[b]) - 1):
                target = ids[b, t].item()
                for name, members in classes.items():
                    if target in members:
                        hits[name][0] += int(pred[b, t].item() == target)
                        hits[name][1] += 1
                if target in values:
                    coords.append((best_number[b, t].item(), values[target]))
            for k in range(0, len(coords) - 3, 4):
                guess, truth = zip(*coords[k:k + 4])
                errors += [abs(g - t) for g, t in zip(guess, truth)]
                ious.append(W.iou(guess, truth))
    out = {f"{name}_accuracy": round(h / max(1, n), 4) for name, (h, n) in hits.items()}
    out["box_number_mean_error"] = round(sum(errors) / max(1, len(errors)), 3)
    out["box_iou_over_0.5"] = round(sum(i > 0.5 for i in ious) / max(1, len(ious)), 4)
    return out


@torch.no_grad()
def perplexity(phi, documents: list[tuple[list[int], list[bool]]], batch: int = 16) -> float:
    """exp(mean loss per target token) over the documents ((ids, targets) as `language_stage.document`
    makes them: the facts in the image slot are read, not predicted)."""
    total, count = 0.0, 0
    for start in range(0, len(documents), batch):
        ids, mask, target = pad_documents(documents[start:start + batch])
        hidden = phi.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        where = target[:, 1:]
        logits = phi.lm_head(hidden[:, :-1][where])
        total += F.cross_entropy(logits.float(), ids[:, 1:][where], reduction="sum").item()
        count += int(where.sum())
    return float(torch.tensor(total / count).exp())


@torch.no_grad()
def slot_probe(queries_fn: Callable, slot_head, scenes: list[W.Scene], pixels: torch.Tensor, batch: int = 50) -> dict:
    """What a linear read-out of the frozen queries gets right: for every true object, the query
    that claims it best (greedy matching on the boxes) -> colour, shape, size, box IoU; and the
    expected number of objects (the sum of the queries' object probabilities, rounded) against
    the true count."""
    from .vision_stage import object_targets

    hits = {"colour": 0, "shape": 0, "size": 0}
    ious, counts_right, n_objects = [], 0, 0
    for start in range(0, len(scenes), batch):
        pred = slot_head(queries_fn(pixels[start:start + batch]))
        for b, scene in enumerate(scenes[start:start + batch]):
            t = object_targets(scene)
            counts_right += int(round(pred["object"][b].sigmoid().sum().item()) == len(scene.objects))
            cost = torch.cdist(pred["box"][b], t["box"], p=1) - 10 * (pred["object"][b] > 0).float()[:, None]
            for q, o in H.match_greedy(cost):
                n_objects += 1
                for k in hits:
                    hits[k] += int(pred[k][b, q].argmax().item() == t[k][o].item())
                ious.append(W.iou(pred["box"][b, q].tolist(), t["box"][o].tolist()))
    out = {f"slot_{k}_accuracy": round(v / max(1, n_objects), 4) for k, v in hits.items()}
    out["slot_count_accuracy"] = round(counts_right / max(1, len(scenes)), 4)
    out["slot_box_iou_over_0.5"] = round(sum(i > 0.5 for i in ious) / max(1, len(ious)), 4)
    return out


@torch.no_grad()
def sheet_reading(phi, tokenizer, n_scenes: int = 40, max_new_tokens: int = 16) -> dict:
    """Accuracy of greedy answers to the course's held-out items (`eval/shapes.py`, same scenes and
    scoring) when the image slot holds the scene sheet as text."""
    from ..eval.shapes import eval_items, normalise

    scores: dict[str, list[float]] = {}
    for it in eval_items(n_scenes):
        pieces = T._fill(T.STAGE4.format(f"{T.IMAGE} {it['question']}"), T.scene_sheet(it["scene"]))
        ids = torch.tensor([T.tokenize_pieces(tokenizer, pieces)])
        out, cache = [], None
        step_ids = ids
        for _ in range(max_new_tokens):
            res = phi(input_ids=step_ids, cache=cache, use_cache=True)  # transformers 5's name for the KV cache
            cache = res.cache if hasattr(res, "cache") else res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            out.append(nxt)
            if "###" in tokenizer.decode(out):
                break
            step_ids = torch.tensor([[nxt]])
        answer = tokenizer.decode(out).split("###")[0].strip()
        if it["kind"] == "refer_iou50":
            try:
                ok = W.iou(W.box_from_text(answer, it["scene"].width, it["scene"].height), it["box"]) > 0.5
            except ValueError:
                ok = False
        else:
            ok = normalise(answer) == normalise(it["answer"])
        scores.setdefault(it["kind"], []).append(float(ok))
    return {k: round(sum(v) / len(v), 4) for k, v in scores.items()}
