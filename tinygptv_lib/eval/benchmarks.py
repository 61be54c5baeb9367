"""TinyGPT-V's five benchmarks (paper Table 2) under two protocols: the original lenient one and
the standard VQA one.

    tinygptv eval --benchmark all --data data_samples/eval --out runs/eval
    tinygptv eval --benchmark gqa --data /data/eval/gqa --checkpoint runs/nano/stage4/final.pt
    python -m tinygptv_lib.eval.benchmarks --benchmark vsr --data data_samples/eval/vsr --limit 20

Every item is asked with the original prompt inside the stage-4 chat template,
``[INST] <Img><ImageHere></Img> {prompt} [/INST]``, and answered greedily (at most 20 new tokens,
stop at "###"), as the original VQA evaluation does. IconQA is multiple choice: every candidate
answer is scored by the model's mean token loss as the answer to the prompt, and the lowest wins.
Both protocols score the same answers (`tinygptv_lib.eval.metrics` has the rules), so one run gives
both numbers.

Where the original differs from what we do: its IconQA script wraps the prompt in the stage-3
template (``###Human: ... ###Assistant: ``) while every other benchmark uses the stage-4 one; we use
the stage-4 template everywhere because that is the template the evaluated model was trained with.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..data.check import STAGES
from ..data.formats import read_gqa, read_hateful_memes, read_iconqa, read_vizwiz, read_vsr
from ..data.images import load_image, preprocess
from ..infer.generate import greedy_generate
from ..model.sequence import IGNORE, build_batch
from . import metrics as M

BENCHMARKS = ("gqa", "vsr", "iconqa", "vizwiz", "hm")
PROTOCOLS = ("original", "standard")
TITLES = {"gqa": "GQA", "vsr": "VSR", "iconqa": "IconQA", "vizwiz": "VizWiz", "hm": "Hateful Memes"}
PAPER = {"gqa": 38.9, "vsr": 54.7, "iconqa": 44.7, "vizwiz": 37.8, "hm": 54.0}  # TinyGPT-V (Phi-2), %
PAPER_AVG = 46.0

TEMPLATE = "[INST] <Img><ImageHere></Img> {} [/INST]"
END_SYM = "###"
MAX_NEW_TOKENS = 20
SHORT_ANSWER = "[vqa] Based on the image, respond to this question with a short answer: {question}"
PROMPTS = {  # the original evaluation's prompts, verbatim (the Hateful Memes typo included)
    "gqa": SHORT_ANSWER,
    "vsr": "[vqa] Based on the image, is this statement true or false? {caption}",
    "iconqa": SHORT_ANSWER,
    "vizwiz": ("[vqa] The question is '{question}' Based on the image, answer the question with a single word or "
               "phrase. and reply 'unanswerable' when the provided information is insufficient"),
    "hm": "This is an image writting '{text}'. Is this image hateful? Answer yes or no. Answer:",
}
RULES = {
    "gqa": {"original": "correct if the label is a substring of the answer",
            "standard": "exact match after VQA normalisation"},
    "vsr": {"original": "correct if 'true'/'false' (or 'yes'/'no') for the label is a substring of the answer",
            "standard": "first normalised word true/false (or yes/no) equals the label"},
    "iconqa": {"original": "top-1 of the candidates ranked by mean answer-token loss",
               "standard": "the same loss ranking (multiple choice has one protocol)"},
    "vizwiz": {"original": "min(#human answers matching / 3, 1), substring match either way",
               "standard": "VQA accuracy: leave-one-out min(1, matches / 3) over the 10 humans, normalised"},
    "hm": {"original": "'yes' in answer -> hateful, else 'no' in answer -> not; accuracy",
           "standard": "first normalised word yes/no; accuracy (anything else is wrong)"},
}
_SPEC_NAMES = {"gqa": "gqa_testdev", "vsr": "vsr", "iconqa": "iconqa", "vizwiz": "vizwiz", "hm": "hm"}


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Item:
    """One benchmark question: the full prompt, the image, and the label in its benchmark's form
    (gqa: answer text; vsr/hm: 0/1; vizwiz: the ten human answers; iconqa: the answer's index)."""

    key: str
    prompt: str
    image_path: Path
    label: object
    choices: tuple = field(default=())


def benchmark_layout(name: str) -> tuple[str, str, Optional[str]]:
    """(benchmark folder, annotation path, image folder) relative to the benchmark folder, taken from
    the data checker's table, e.g. ("eval/gqa", "testdev_balanced_questions.json", "images")."""
    _check_name(name)
    spec = next(s for s in STAGES["eval"] if s.name == _SPEC_NAMES[name])
    folder = "/".join(spec.annotation.split("/")[:2])
    rel = spec.annotation[len(folder) + 1:]
    images = spec.images[len(folder) + 1:] if spec.images else None
    return folder, rel, images


def resolve_benchmark_dir(name: str, data_path) -> Path:
    """The folder holding a benchmark's files. `data_path` may be that folder (data_samples/eval/gqa),
    the folder holding all five (data_samples/eval) or a data root (data_samples)."""
    folder, rel, _ = benchmark_layout(name)
    base = Path(data_path)
    tried = []
    for root in (base, base / folder.split("/")[-1], base / folder):
        tried.append(root / rel)
        if (root / rel).exists():
            return root
    raise FileNotFoundError(f"{TITLES[name]}: no {rel} under {base} (looked for " +
                            ", ".join(str(t) for t in tried) + "); see docs/DATA_GUIDE.md")


def load_items(name: str, data_path, limit: Optional[int] = None) -> list[Item]:
    """Read a benchmark with our readers and build each item's prompt (the first `limit` items)."""
    root = resolve_benchmark_dir(name, data_path)
    _, rel, images = benchmark_layout(name)
    ann = root / rel
    img_root = root / images if images else root
    wrap = TEMPLATE.format
    items: list[Item] = []
    if name == "gqa":
        for r in read_gqa(ann, img_root):
            items.append(Item(r.qid, wrap(PROMPTS[name].format(question=r.question)), r.image_path, r.answer))
    elif name == "vsr":
        for i, r in enumerate(read_vsr(ann, img_root)):
            items.append(Item(f"{i}:{r.image}", wrap(PROMPTS[name].format(caption=r.caption)), r.image_path, r.label))
    elif name == "iconqa":
        for r in read_iconqa(ann):
            items.append(Item(r.pid, wrap(PROMPTS[name].format(question=r.question)), r.image_path, r.answer,
                              tuple(r.choices)))
    elif name == "vizwiz":
        for r in read_vizwiz(ann, img_root):
            items.append(Item(r.image, wrap(PROMPTS[name].format(question=r.question)), r.image_path,
                              [a["answer"] for a in r.answers]))
    else:  # hm
        for r in read_hateful_memes(ann, root):
            items.append(Item(str(r.id), wrap(PROMPTS[name].format(text=r.text)), r.image_path, r.label))
    if limit is not None:
        items = items[: max(0, int(limit))]
    if not items:
        raise ValueError(f"{TITLES[name]}: no items to evaluate in {ann}")
    return items


# --------------------------------------------------------------------------- scoring


def score_answer(name: str, answer: str, label) -> dict:
    """{'original': s, 'standard': s} for a generated answer (gqa, vsr, vizwiz, hm), plus the 0/1
    readings for Hateful Memes ('pred_original', 'pred_standard')."""
    if name == "gqa":
        return {"original": M.gqa_lenient(answer, label), "standard": M.exact_match(answer, label)}
    if name == "vsr":
        return {"original": M.vsr_lenient(answer, label), "standard": M.vsr_standard(answer, label)}
    if name == "vizwiz":
        return {"original": M.vizwiz_lenient(answer, label), "standard": M.vqa_accuracy(answer, label)}
    if name == "hm":
        po, ps = M.hm_lenient_prediction(answer), M.hm_standard_prediction(answer)
        return {"original": M.binary_correct(po, label), "standard": M.binary_correct(ps, label),
                "pred_original": po, "pred_standard": ps}
    raise ValueError(f"score_answer scores generated answers; {name!r} is not one of gqa, vsr, vizwiz, hm")


# --------------------------------------------------------------------------- model calls


def _device_dtype(model):
    return next(model.phi.parameters()).device, next(model.vision.parameters()).dtype


def load_pixels(model, paths: Sequence[Path]) -> torch.Tensor:
    """Images -> (B, 3, S, S) at the model's image size, on its device and in its vision dtype."""
    device, dtype = _device_dtype(model)
    size = model.cfg.vision.img_size
    return torch.stack([preprocess(load_image(p), size) for p in paths]).to(device, dtype=dtype)


@torch.no_grad()
def candidate_losses(model, tokenizer, prompts: Sequence[str], answers: Sequence[str],
                     image_embeds: torch.Tensor, reduction: str = "mean") -> list[float]:
    """The loss of each row's answer (+ end symbol) given its prompt and image: the mean (or sum)
    of its token cross-entropies. The rows form one right-padded batch (`build_batch`); the
    vocabulary projection runs only at the answer positions."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    device, _ = _device_dtype(model)
    batch = build_batch(tokenizer, list(prompts), list(answers), num_query_tokens=model.cfg.qformer.num_query_tokens,
                        end_sym=END_SYM, max_txt_len=1024).to(device)
    embeds = model.embed(batch, image_embeds=image_embeds)
    hidden = model.hidden_states(embeds, batch.attention_mask)
    targets = batch.targets[:, 1:]
    where = targets != IGNORE  # position t predicts token t + 1
    logits = model.phi.lm_head(hidden[:, :-1][where]).float()
    token_loss = F.cross_entropy(logits, targets[where], reduction="none")
    rows = torch.arange(len(prompts), device=device)[:, None].expand_as(where)[where]
    sums = torch.zeros(len(prompts), device=device, dtype=torch.float32).index_add_(0, rows, token_loss)
    if reduction == "sum":
        return sums.tolist()
    return (sums / where.sum(1).clamp(min=1)).tolist()


def _chunks(items: list, size: int):
    for k in range(0, len(items), size):
        yield items[k:k + size]


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_benchmark(model, name: str, data_path, protocol: str = "original", batch_size: int = 8,
                       limit: Optional[int] = None, *, tokenizer=None, iconqa_reduction: str = "mean",
                       progress: bool = False) -> dict:
    """Evaluate `model` on one benchmark (gqa, vsr, iconqa, vizwiz, hm) read from `data_path`.

    Returns {'benchmark', 'title', 'protocol', 'score' (0..1 under `protocol`), 'scores' (both
    protocols: the same answers are scored both ways), 'n', 'paper' (%), 'rules', 'data',
    'seconds', 'predictions'} and, for Hateful Memes, 'auc' per protocol (from the yes/no answers).
    """
    _check_name(name)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if tokenizer is None:
        from ..tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
    t0 = time.perf_counter()
    items = load_items(name, data_path, limit)
    was_training = model.training
    model.eval()
    predictions = []
    try:
        for done, chunk in enumerate(_chunks(items, batch_size), start=1):
            pixels = load_pixels(model, [it.image_path for it in chunk])
            if name == "iconqa":
                image_embeds = model.encode_images(pixels)
                counts = [len(it.choices) for it in chunk]
                rows_embeds = image_embeds.repeat_interleave(torch.tensor(counts, device=image_embeds.device), dim=0)
                losses = candidate_losses(model, tokenizer, [it.prompt for it in chunk for _ in it.choices],
                                          [c for it in chunk for c in it.choices], rows_embeds, iconqa_reduction)
                at = 0
                for it, n in zip(chunk, counts):
                    mine = losses[at:at + n]
                    at += n
                    ok = M.iconqa_correct(mine, it.label)
                    predictions.append({"id": it.key, "choices": list(it.choices), "losses": mine,
                                        "prediction": M.rank_by_loss(mine)[0], "label": it.label,
                                        "original": ok, "standard": ok})
            else:
                answers = greedy_generate(model, tokenizer, [it.prompt for it in chunk], pixels=pixels,
                                          max_new_tokens=MAX_NEW_TOKENS, stop=(END_SYM,))
                for it, answer in zip(chunk, answers):
                    predictions.append({"id": it.key, "answer": answer, "label": it.label,
                                        **score_answer(name, answer, it.label)})
            if progress:
                print(f"  {TITLES[name]}: {min(done * batch_size, len(items))}/{len(items)}", file=sys.stderr)
    finally:
        model.train(was_training)
    scores = {p: M.mean([r[p] for r in predictions]) for p in PROTOCOLS}
    result = {
        "benchmark": name, "title": TITLES[name], "protocol": protocol, "score": scores[protocol],
        "scores": scores, "n": len(predictions), "paper": PAPER[name], "rules": RULES[name],
        "data": str(data_path), "seconds": round(time.perf_counter() - t0, 3), "predictions": predictions,
    }
    if name == "hm":
        labels = [r["label"] for r in predictions]
        result["auc"] = {p: M.roc_auc([M.prediction_score(r[f"pred_{p}"]) for r in predictions], labels)
                         for p in PROTOCOLS}
    return result


# --------------------------------------------------------------------------- the table


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def results_table(results: dict, protocols: Sequence[str] = PROTOCOLS) -> tuple[str, str]:
    """(markdown, csv) of our scores beside the paper's TinyGPT-V numbers (%).

    `results` maps a benchmark name to an `evaluate_benchmark` result; one column per protocol.
    The avg row averages the benchmarks present (the paper's average over all five is 46.0).
    """
    protocols = tuple(protocols)
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise ValueError(f"protocols must be some of {PROTOCOLS}, got {protocols}")
    names = [b for b in BENCHMARKS if b in results] + [b for b in results if b not in BENCHMARKS]
    header = ["benchmark", "n", "TinyGPT-V paper (%)"] + [f"ours, {p} (%)" for p in protocols]
    rows, paper_vals, ours_vals = [], [], {p: [] for p in protocols}
    for b in names:
        r = results[b]
        scores = r.get("scores") or {r["protocol"]: r["score"]}
        paper = PAPER.get(b)
        if paper is not None:
            paper_vals.append(paper)
        row = [r.get("title", b), str(r.get("n", "")), "-" if paper is None else f"{paper:.1f}"]
        for p in protocols:
            v = scores.get(p)
            if v is not None and not math.isnan(v):
                ours_vals[p].append(v)
            row.append(_pct(v))
        rows.append(row)
    if len(names) > 1:
        avg = ["avg", "", f"{sum(paper_vals) / len(paper_vals):.1f}" if paper_vals else "-"]
        avg += [_pct(sum(v) / len(v)) if len(v) == len(names) else "-" for v in ours_vals.values()]
        rows.append(avg)
    md = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    notes = []
    if "hm" in results and "auc" in results["hm"]:
        auc = results["hm"]["auc"]
        notes.append("Hateful Memes AUC from the yes/no answers: " +
                     ", ".join(f"{p} {_pct(auc.get(p))}" for p in protocols) + ".")
    notes.append("Paper: TinyGPT-V (Phi-2, 2.8B) on the real benchmarks, original lenient protocol. "
                 "Protocols: see tinygptv_lib/eval/benchmarks.py RULES.")
    data = sorted({str(results[b].get("data")) for b in names if results[b].get("data")})
    if data:
        notes.append("Our data: " + ", ".join(data) + ".")
    markdown = "\n".join(md) + "\n\n" + "\n".join(notes) + "\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return markdown, buf.getvalue()


# --------------------------------------------------------------------------- the command


def build_eval_model(checkpoint=None, preset: str = "nano", image_size: Optional[int] = None,
                     device: Optional[str] = None):
    """A stage-4 model to evaluate, built as `tinygptv train` builds one (seeded with the run's seed,
    the nano backbones, then the checkpoint's trained weights where given). The image size is the
    checkpoint's training size (else the stage-4 config's) unless `image_size` says otherwise.

    Without a checkpoint and without built nano backbones, the towers stay random (with a warning).
    """
    from ..cli import _stage_model
    from ..model.tinygptv import build_model
    from ..train.checkpoint import load_checkpoint
    from ..train.config import load_stage_config
    from ..train.trainer import seed_everything
    from ..weights.common import WeightLoadError

    stage_cfg = load_stage_config(4, preset)
    size, seed = image_size, stage_cfg.seed
    if checkpoint is not None:
        run_cfg = load_checkpoint(checkpoint, preset=preset).get("config") or {}
        size = size or run_cfg.get("image_size")
        seed = run_cfg.get("seed", seed)
    size = size or stage_cfg.image_size
    seed_everything(seed)  # random parts as the trainer drew them
    try:
        model = _stage_model(preset, 4, init_from=checkpoint)
    except WeightLoadError as e:
        if checkpoint is not None:
            raise
        print(f"warning: {e}\nwarning: evaluating a model with random towers", file=sys.stderr)
        seed_everything(seed)
        model = build_model(preset, stage=4)
    if size != model.cfg.vision.img_size:
        model.vision.set_image_size(int(size))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--benchmark", choices=BENCHMARKS + ("all",), default="all")
    p.add_argument("--data", default="data_samples/eval",
                   help="the benchmark's folder (e.g. data_samples/eval/gqa), or the folder holding all five")
    p.add_argument("--protocol", choices=PROTOCOLS + ("both",), default="both")
    p.add_argument("--checkpoint", help="a stage's final.pt from `tinygptv train` (default: untrained projections)")
    p.add_argument("--preset", choices=["nano"], default="nano")
    p.add_argument("--image-size", type=int, help="override the image size (default: the checkpoint's)")
    p.add_argument("--limit", type=int, help="evaluate only the first N items of each benchmark")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default="runs/eval", help="folder for results.md, results.csv, predictions.json")


def run(args) -> int:
    """Evaluate, print the table, write OUT/results.md, OUT/results.csv and OUT/predictions.json."""
    names = BENCHMARKS if args.benchmark == "all" else (args.benchmark,)
    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    model = build_eval_model(args.checkpoint, args.preset, args.image_size, args.device)
    results = {}
    for name in names:
        r = evaluate_benchmark(model, name, args.data, protocols[0], batch_size=args.batch_size, limit=args.limit,
                               progress=True)
        results[name] = r
        print(f"{r['title']}: " + ", ".join(f"{p} {100 * r['scores'][p]:.1f}%" for p in protocols) +
              f" (n={r['n']}, {r['seconds']:.1f} s)", file=sys.stderr)
    markdown, table_csv = results_table(results, protocols)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown, encoding="utf-8")
    (out / "results.csv").write_text(table_csv, encoding="utf-8")
    meta = {"checkpoint": args.checkpoint, "data": args.data, "limit": args.limit, "protocols": list(protocols)}
    (out / "predictions.json").write_text(json.dumps({"run": meta, "results": results}, indent=1, default=str),
                                          encoding="utf-8")
    print(markdown)
    print(f"wrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'predictions.json'}", file=sys.stderr)
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add `eval` to an argparse subparsers object (the `tinygptv` command's)."""
    p = subparsers.add_parser("eval", help="the paper's five benchmarks (GQA, VSR, IconQA, VizWiz, Hateful Memes)",
                              description="Evaluate on TinyGPT-V's five benchmarks under the original lenient "
                                          "protocol and the standard VQA one; writes a table beside the paper's.")
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinygptv_lib.eval.benchmarks",
                                     description="Evaluate on TinyGPT-V's five benchmarks.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _check_name(name: str) -> None:
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {name!r}")


if __name__ == "__main__":
    sys.exit(main())
