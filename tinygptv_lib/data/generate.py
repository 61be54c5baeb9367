"""Write the shapes world to disk in every format the course reads.

    python -m tinygptv_lib.data.generate --out data_samples --seed 0 --n-train 200 --n-eval 50

Output tree (docs/DATA_FORMATS.md describes each file):

    stage1_2/shards/000000.tar ...        image-caption pairs (stages 1-2, like LAION/CC/SBU)
    cc_sbu_align/filter_cap.json, image/  detailed descriptions (stage 3)
    llava/{conversation,detail,multitask}.json, images/   chats (stage 4)
    vqa/questions.json, annotations.json, images/         VQAv2-style (stage 4)
    gqa/train_balanced_questions.json, images/            GQA-style (stage 4)
    refcoco/refs.json, images/                            referring expressions (stage 4)
    eval/{gqa,vsr,iconqa,vizwiz,hm}/                      the five benchmarks (held-out scenes)
    manifest.json                                          parameters, sizes and sha256 of every file

Train and eval scenes come from different seed streams ("train/...", "eval/..."), so no
evaluation picture is ever a training picture. Output is byte-identical for the same arguments.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Callable, Optional

from . import world as W
from .formats import (AlignRecord, ConversationRecord, GQARecord, IconQARecord, MemeRecord, RefRecord,
                      ShardSample, VizWizRecord, VQARecord, VSRRecord, encode_image, save_image,
                      write_cc_sbu_align, write_gqa, write_hateful_memes, write_iconqa, write_llava,
                      write_refcoco, write_shard, write_vizwiz, write_vqav2, write_vsr)
from .formats._common import write_json

GENERATOR = "tinygptv_lib.data.generate"
FORMAT_VERSION = 1
OWNED = ("stage1_2", "cc_sbu_align", "llava", "vqa", "gqa", "refcoco", "eval")
MANIFEST = "manifest.json"

DETAIL_PROMPTS = (
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
)


def _scene(seed: int, stream: str, index: int, size: int,
           build: Optional[Callable] = None, meme: bool = False):
    """Scene number ``index`` of a stream, re-drawn (attempt 1, 2, ...) until ``build`` finds an item.

    Why re-draw: a benchmark item may need, say, two clearly separated shapes; skipping such
    scenes deterministically keeps exactly n items per benchmark.
    """
    for attempt in range(100):
        scene_seed = W.derive_seed(seed, stream, index, attempt)
        scene = W.make_meme_scene(scene_seed, size) if meme else W.make_scene(scene_seed, size)
        item = build(scene) if build is not None else True
        if item is not None:
            return scene, item
    raise RuntimeError(f"no usable scene for {stream} #{index} after 100 attempts")


# --------------------------------------------------------------------------- training data


def write_pairs(out: Path, seed: int, n: int, size: int, shard_size: int) -> int:
    """Stage 1-2 image-caption pairs as webdataset shards, keys numbered like img2dataset's."""
    folder = out / "stage1_2" / "shards"
    for shard, start in enumerate(range(0, n, shard_size)):
        samples = []
        for i in range(start, min(n, start + shard_size)):
            scene, _ = _scene(seed, "train/pairs", i, size)
            key = f"{shard:06d}{i - start:04d}"
            caption = W.short_caption(scene)
            meta = {"key": key, "caption": caption, "status": "success", "width": size, "height": size,
                    "scene": scene.ground_truth()}
            samples.append(ShardSample(key, encode_image(scene.image, "jpg"), caption, meta))
        write_shard(folder / f"{shard:06d}.tar", samples)
    return n


def write_align(out: Path, seed: int, n: int, size: int) -> int:
    """Stage 3: detailed descriptions in MiniGPT-4's cc_sbu_align layout."""
    root = out / "cc_sbu_align"
    records = []
    for i in range(n):
        scene, _ = _scene(seed, "train/cc_sbu_align", i, size)
        save_image(scene.image, root / "image" / f"{i}.jpg")
        records.append(AlignRecord(str(i), W.detailed_description(scene)))
    write_cc_sbu_align(root, records)
    return n


def write_chats(out: Path, seed: int, n: int, size: int) -> int:
    """LLaVA-style JSON: multi-turn conversations, detailed descriptions, multi-task chats."""
    root = out / "llava"
    conversations, details, tasks = [], [], []
    for i in range(n):
        scene, _ = _scene(seed, "train/llava", i, size)
        ident, image = f"{i:012d}", f"{i:012d}.jpg"
        save_image(scene.image, root / "images" / image)
        conversations.append(ConversationRecord(ident, image, W.conversation(scene)))
        prompt = random.Random(W.derive_seed(scene.seed, "detail-prompt")).choice(DETAIL_PROMPTS)
        details.append(ConversationRecord(ident, image, [
            {"from": "human", "value": f"<image>\n{prompt}"},
            {"from": "gpt", "value": W.detailed_description(scene)}]))
        turns = []
        for k, (instruction, answer) in enumerate(W.task_samples(scene)):
            turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + instruction})
            turns.append({"from": "gpt", "value": answer})
        tasks.append(ConversationRecord(ident, image, turns))
    write_llava(root / "conversation.json", conversations)
    write_llava(root / "detail.json", details)
    write_llava(root / "multitask.json", tasks)
    return n


def write_vqa(out: Path, seed: int, n: int, size: int, per_image: int = 3) -> int:
    """VQAv2-style questions and annotations, ten simulated human answers each."""
    root = out / "vqa"
    records = []
    for i in range(n):
        scene, _ = _scene(seed, "train/vqa", i, size)
        image_id = i + 1
        save_image(scene.image, root / "images" / f"{image_id:012d}.jpg")
        rng = random.Random(W.derive_seed(scene.seed, "vqa-answers"))
        for k, qa in enumerate(W.pick_questions(scene, per_image, "vqa-train")):
            answers = [a for a, _ in W.human_answers(rng, qa, agree=0.85)]
            records.append(VQARecord(image_id * 1000 + k, image_id, qa.question, answers, qa.answer,
                                     qa.answer_type))
    write_vqav2(root / "questions.json", root / "annotations.json", records)
    return len(records)


def write_gqa_train(out: Path, seed: int, n: int, size: int, per_image: int = 3) -> int:
    """GQA-style train-balanced questions (stage 4 uses GQA's train split)."""
    root = out / "gqa"
    records = []
    types = ("colour", "shape", "position", "relation", "yesno", "reading")
    for i in range(n):
        scene, _ = _scene(seed, "train/gqa", i, size)
        image_id = f"s{i:06d}"
        save_image(scene.image, root / "images" / f"{image_id}.jpg")
        for k, qa in enumerate(W.pick_questions(scene, per_image, "gqa-train", types)):
            records.append(GQARecord(f"{i:07d}{k}", image_id, qa.question, qa.answer, qa.full_answer))
    write_gqa(root / "train_balanced_questions.json", records)
    return len(records)


def write_refs(out: Path, seed: int, n: int, size: int) -> int:
    """RefCOCO-style referring expressions, one record per nameable object."""
    root = out / "refcoco"
    records = []
    for i in range(n):
        scene, _ = _scene(seed, "train/refcoco", i, size)
        image = f"{i:012d}.jpg"
        save_image(scene.image, root / "images" / image)
        for ref in W.referring_expressions(scene):
            x1, y1, x2, y2 = ref.bbox
            records.append(RefRecord(len(records), image, list(ref.sentences), [x1, y1, x2 - x1, y2 - y1],
                                     scene.width, scene.height))
    write_refcoco(root / "refs.json", records)
    return len(records)


# --------------------------------------------------------------------------- benchmarks


def write_eval_gqa(out: Path, seed: int, n: int, size: int) -> int:
    root = out / "eval" / "gqa"
    records = []
    for i in range(n):
        scene, qa = _scene(seed, "eval/gqa", i, size, W.gqa_item)
        image_id = f"e{i:06d}"
        save_image(scene.image, root / "images" / f"{image_id}.jpg")
        records.append(GQARecord(f"{i:08d}", image_id, qa.question, qa.answer, qa.full_answer))
    write_gqa(root / "testdev_balanced_questions.json", records)
    return n


def write_eval_vsr(out: Path, seed: int, n: int, size: int) -> int:
    root = out / "eval" / "vsr"
    records = []
    for i in range(n):
        scene, item = _scene(seed, "eval/vsr", i, size, W.vsr_item)
        image = f"{i:012d}.jpg"
        save_image(scene.image, root / "images" / image)
        records.append(VSRRecord(image, item.caption, item.label, item.relation))
    write_vsr(root / "test.jsonl", records)
    return n


def write_eval_iconqa(out: Path, seed: int, n: int, size: int) -> int:
    root = out / "eval" / "iconqa" / "val" / "choose_txt"
    records = []
    for i in range(n):
        scene, item = _scene(seed, "eval/iconqa", i, size, W.iconqa_item)
        pid = str(i + 1)
        save_image(scene.image, root / pid / "image.png")
        records.append(IconQARecord(pid, item.question, list(item.choices), item.answer))
    write_iconqa(root, records)
    return n


def write_eval_vizwiz(out: Path, seed: int, n: int, size: int) -> int:
    root = out / "eval" / "vizwiz"
    records = []
    for i in range(n):
        scene, item = _scene(seed, "eval/vizwiz", i, size, W.vizwiz_item)
        image = f"VizWiz_val_{i:08d}.jpg"
        save_image(scene.image, root / "val" / image)
        answers = [{"answer": a, "answer_confidence": c} for a, c in item.answers]
        records.append(VizWizRecord(image, item.question, answers, item.answerable, item.answer_type))
    write_vizwiz(root / "val.json", records)
    return n


def write_eval_memes(out: Path, seed: int, n: int, size: int) -> int:
    root = out / "eval" / "hm"
    records = []
    for i in range(n):
        scene, label = _scene(seed, "eval/hm", i, size, W.meme_label, meme=True)
        ident = i + 1
        img = f"img/{ident:05d}.png"
        save_image(scene.image, root / img)
        records.append(MemeRecord(ident, img, label, scene.text.text))
    write_hateful_memes(root / "dev.jsonl", records)
    return n


# --------------------------------------------------------------------------- the whole tree


def _clear_previous(out: Path) -> None:
    """Remove folders a previous run of this generator wrote, and nothing else.

    Why careful: ``--out`` may point at a folder holding other files (data_samples/ keeps its
    photos and README); we only delete our own folders, and only if our manifest is there.
    """
    present = [name for name in OWNED if (out / name).exists()]
    if not present:
        return
    manifest = out / MANIFEST
    try:
        ours = json.loads(manifest.read_text(encoding="utf-8")).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise FileExistsError(f"{out} already holds {present} but no manifest from this generator; "
                              "choose an empty folder")
    for name in present:
        shutil.rmtree(out / name)


def _file_table(out: Path) -> dict:
    """Relative path -> size and sha256 of every generated file, in sorted order."""
    table = {}
    for name in OWNED:
        for path in sorted((out / name).rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                table[path.relative_to(out).as_posix()] = {
                    "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return table


def generate_all(out_dir, seed: int = 0, n_train: int = 200, n_eval: int = 50, image_size: int = 224,
                 n_instruct: Optional[int] = None, shard_size: int = 100) -> dict:
    """Write every format under out_dir and return the manifest (also saved as manifest.json).

    n_train: image-caption pairs for stages 1-2. n_instruct: scenes for each stage 3-4 dataset
    (default n_train // 5). n_eval: items in each of the five benchmarks.
    """
    if n_instruct is None:
        n_instruct = max(1, n_train // 5)
    for name, value in (("n_train", n_train), ("n_eval", n_eval), ("n_instruct", n_instruct),
                        ("shard_size", shard_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous(out)
    counts = {
        "pairs": write_pairs(out, seed, n_train, image_size, shard_size),
        "cc_sbu_align": write_align(out, seed, n_instruct, image_size),
        "llava": write_chats(out, seed, n_instruct, image_size),
        "vqa_questions": write_vqa(out, seed, n_instruct, image_size),
        "gqa_questions": write_gqa_train(out, seed, n_instruct, image_size),
        "refcoco_refs": write_refs(out, seed, n_instruct, image_size),
        "eval_gqa": write_eval_gqa(out, seed, n_eval, image_size),
        "eval_vsr": write_eval_vsr(out, seed, n_eval, image_size),
        "eval_iconqa": write_eval_iconqa(out, seed, n_eval, image_size),
        "eval_vizwiz": write_eval_vizwiz(out, seed, n_eval, image_size),
        "eval_hm": write_eval_memes(out, seed, n_eval, image_size),
    }
    manifest = {
        "generator": GENERATOR,
        "format_version": FORMAT_VERSION,
        "parameters": {"seed": seed, "n_train": n_train, "n_eval": n_eval, "n_instruct": n_instruct,
                       "image_size": image_size, "shard_size": shard_size},
        "counts": counts,
        "files": _file_table(out),
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=200, help="image-caption pairs (stages 1-2)")
    parser.add_argument("--n-eval", type=int, default=50, help="items per benchmark")
    parser.add_argument("--n-instruct", type=int, default=None, help="scenes per stage 3-4 dataset")
    parser.add_argument("--shard-size", type=int, default=100, help="pairs per .tar shard")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")


def run(args) -> int:
    manifest = generate_all(args.out, seed=args.seed, n_train=args.n_train, n_eval=args.n_eval,
                            image_size=args.size, n_instruct=args.n_instruct, shard_size=args.shard_size)
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"wrote {len(manifest['files'])} files ({total / 1e6:.1f} MB) to {args.out}")
    for name, count in manifest["counts"].items():
        print(f"  {name}: {count}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinygptv_lib.data.generate",
                                     description="Write the procedural shapes world in every data format.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
