"""The whole nano course in one call: data, stages 1-4, evaluation after each stage, a demo answer.

    tinygptv course --preset nano --out runs/course

Writes OUT/data (a larger shapes world than data_samples), OUT/stageN/ (metrics.jsonl, loss.png,
last.pt, final.pt), OUT/report.json and OUT/report.md (the per-stage table).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

STAGE_ROLE = {
    1: "warm-up: the projections learn to speak Phi's embedding language (captions)",
    2: "pre-training: LoRA joins; captions again",
    3: "instruction learning: detailed descriptions in the ###Human/###Assistant template",
    4: "multi-task: VQA, referring boxes, identification, chat at twice the resolution",
}


def course_data(out: str | Path = "runs/course", *, seed: int = 0, quick: bool = False,
                n_train: int = 2000, n_instruct: int = 600) -> Path:
    """OUT/data: the course's shapes world (generated once; the same seed gives the same files)."""
    from .data.generate import generate_all

    data = Path(out) / "data"
    if quick:
        n_train, n_instruct = 200, 40
    if not (data / "manifest.json").exists():
        generate_all(data, seed=seed, n_train=n_train, n_eval=20, n_instruct=n_instruct)
    return data


# Held-out scenes asked after every stage, one question of each kind a scene. 200 keeps a score's
# 95 % interval within about +-0.07; with 60 it was +-0.13 (shape after stage 4: 0.90 on 60 scenes,
# 0.77 on 200).
EVAL_SCENES = 200


def interval95(n: int) -> float:
    """Half-width of the widest 95 % interval of an accuracy over n questions (at 0.5, normal approximation)."""
    return 1.96 * (0.25 / n) ** 0.5


def ensure_stage(stage: int, out: str | Path = "runs/course", *, preset: str = "nano", seed: int = 0,
                 quick: bool = False, eval_scenes: int = EVAL_SCENES, log=print) -> dict:
    """Train stage `stage` (and, first, any earlier stage not finished) and evaluate it; returns the
    stage's report entry. A finished stage (OUT/stageN/report.json) is read back, not retrained, and
    an interrupted one resumes from its last checkpoint, so `tinygptv course`, `tinygptv train` and
    the stage notebooks share one folder and always reach the same numbers.
    """
    from .cli import _stage_model
    from .eval.shapes import evaluate_shapes
    from .train.config import load_stage_config
    from .train.trainer import FINAL, Trainer, seed_everything

    if eval_scenes < 1:
        raise ValueError(f"eval_scenes must be at least 1, got {eval_scenes}")
    out = Path(out)
    folder = out / f"stage{stage}"
    done = folder / "report.json"
    if done.exists():
        return json.loads(done.read_text())
    prev = None
    if stage > 1:
        ensure_stage(stage - 1, out, preset=preset, seed=seed, quick=quick, eval_scenes=eval_scenes, log=log)
        prev = out / f"stage{stage - 1}" / FINAL
    data = course_data(out, seed=seed, quick=quick)
    if quick:
        eval_scenes = 10
    overrides = {"iters_per_epoch": 5, "checkpoint_every": 5} if quick else {}
    cfg = load_stage_config(stage, preset, overrides=overrides)
    torch.manual_seed(seed)
    seed_everything(cfg.seed)
    model = _stage_model(preset, stage, init_from=prev)
    ts = time.time()
    result = Trainer(cfg, folder, model, data_root=data).run(resume=True)
    train_s = time.time() - ts
    te = time.time()
    metrics = evaluate_shapes(model, n_scenes=eval_scenes, seed=seed)
    entry = {
        "role": STAGE_ROLE[stage],
        "steps": result["steps"],
        "first_loss": round(result.get("first_loss", float("nan")), 4),
        "final_loss": round(result.get("final_loss", float("nan")), 4),
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(time.time() - te, 1),
        "eval_scenes": eval_scenes,
        **{k: round(v, 4) for k, v in metrics.items()},
    }
    log(f"stage {stage}: loss {entry['first_loss']:.3f} -> {entry['final_loss']:.3f}; "
        + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry, indent=1, sort_keys=True) + "\n")
    tmp.replace(done)
    return entry


def run_course(preset: str = "nano", out: str | Path = "runs/course", *, seed: int = 0, quick: bool = False,
               eval_scenes: int = EVAL_SCENES) -> dict:
    from .cli import _stage_model
    from .eval.shapes import CHANCE
    from .train.trainer import FINAL

    out = Path(out)
    t0 = time.time()
    course_data(out, seed=seed, quick=quick)
    report = {"preset": preset, "data_seconds": round(time.time() - t0, 1), "stages": {}}
    for stage in (1, 2, 3, 4):
        report["stages"][str(stage)] = ensure_stage(stage, out, preset=preset, seed=seed, quick=quick,
                                                    eval_scenes=eval_scenes)
    model = _stage_model(preset, 4, init_from=out / "stage4" / FINAL)
    report["chance"] = {k: v for k, v in CHANCE.items() if v is not None}
    report["demo"] = demo_answer(model, out / "data")
    report["total_seconds"] = round(time.time() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    (out / "report.md").write_text(report_table(report))
    print(report_table(report))
    return report


def demo_questions(scene) -> list[tuple[str, str]]:
    """The demo's questions about a shapes-world scene: its first colour, shape and counting question
    in the world's own order (the kinds the course evaluates), each with the true answer."""
    from .data import world as W

    picked: dict[str, tuple[str, str]] = {}
    for qa in W.vqa_items(scene):
        if qa.qtype in ("colour", "shape", "count") and qa.qtype not in picked:
            picked[qa.qtype] = (f"[vqa] {qa.question}", qa.answer)
    return [picked[k] for k in ("colour", "shape", "count") if k in picked]


def demo_answer(model, data: Path) -> dict:
    """Answers about a held-out shapes-world image (with the truth) and one about a shipped photograph."""
    from .data import world as W
    from .data.images import load_image, preprocess
    from .eval.shapes import PROMPT
    from .infer.generate import greedy_generate
    from .tokenizer import load_tokenizer

    tok = load_tokenizer()
    size = model.cfg.vision.img_size
    dtype = next(model.vision.parameters()).dtype
    scene = W.make_scene(W.derive_seed(0, "eval/demo", 0), 224)
    scene_px, caption = preprocess(W.render(scene), size), W.short_caption(scene)
    asks = [(f"shapes-world scene {k + 1}", scene_px, q, {"truth": truth, "scene": caption})
            for k, (q, truth) in enumerate(demo_questions(scene))]
    photo = Path(__file__).resolve().parents[1] / "data_samples" / "photos" / "coffee.jpg"
    if photo.exists():  # a real photograph: nothing like the training pictures
        asks.append((f"photo {photo.name}", preprocess(load_image(photo), size), "[vqa] What colour is the background?",
                     {}))
    pixels = torch.stack([px for _, px, _, _ in asks]).to(dtype=dtype)
    answers = greedy_generate(model, tok, [PROMPT.format(q) for _, _, q, _ in asks], pixels=pixels)
    return {name: {"question": q, "answer": answer, **known} for (name, _, q, known), answer in zip(asks, answers)}


def report_table(report: dict) -> str:
    stages = report["stages"]
    keys = sorted({k for s in stages.values() for k in s} - {"role", "steps", "first_loss", "final_loss",
                                                              "train_seconds", "eval_seconds", "eval_scenes"})
    head = "| stage | what it adds | steps | loss first -> last | " + " | ".join(keys) + " | train s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for st, s in stages.items():
        vals = " | ".join(f"{s.get(k, float('nan')):.2f}" for k in keys)
        lines.append(f"| {st} | {s['role']} | {s['steps']} | {s['first_loss']:.2f} -> {s['final_loss']:.2f} | "
                     f"{vals} | {s['train_seconds']:.0f} |")
    chance = report.get("chance", {})
    lines.append("")
    lines.append("chance: " + ", ".join(f"{k} {v:.2f}" for k, v in chance.items()) + "; refer_iou50 is the share "
                 "of [refer] answers whose box overlaps the truth with IoU > 0.5")
    scenes = sorted({s["eval_scenes"] for s in stages.values() if "eval_scenes" in s})
    if scenes:
        lines.append(f"held-out: {' / '.join(map(str, scenes))} scenes a stage, one question of each kind a scene "
                     f"(a score's 95 % interval: about +-{interval95(min(scenes)):.2f})")
    for name, d in report.get("demo", {}).items():
        truth = f" (truth {d['truth']!r})" if "truth" in d else ""
        lines.append(f"demo ({name}): {d['question']} -> {d['answer']!r}{truth}")
    lines.append(f"total time {report.get('total_seconds', 0):.0f} s")
    return "\n".join(lines) + "\n"
