"""Check a prepared data folder for one training stage before a long run starts.

    tinygptv data check --stage 4 --root /data/tinygptv
    python -m tinygptv_lib.data.check --stage 1 --root data_samples

Why: a missing image or a malformed record in hour 6 of a run costs the run. This check reads
every annotation record of a stage with our readers (tinygptv_lib.data.formats), checks that
every referenced image exists, opens images with PIL (``verify()`` on each, a full decode on a
sample, or on all of them when a dataset is small) and collects *all* problems, each naming the
file, the record and the field (or the image path), before it answers.

The folder layout under the data root is the table ``STAGES`` below; docs/DATA_GUIDE.md says how
to prepare each real dataset into it. A tree written by ``tinygptv_lib.data.generate`` (such as
the shipped ``data_samples/``) is recognised by its manifest.json: its shapes-world sets stand in
for the real ones, and the real datasets it does not imitate are listed as not covered.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional, Union

from PIL import Image, UnidentifiedImageError

from .formats import (DataFormatError, list_shards, open_image, read_cc_sbu_align, read_gqa, read_hateful_memes,
                      read_iconqa, read_llava, read_refcoco, read_shard, read_vizwiz, read_vqav2, read_vsr,
                      resolve_under)
from .formats._common import read_json, where
from .formats.shards import _finish as _finish_shard_sample
from .formats.shards import _split_name as _split_member_name
from .generate import GENERATOR, MANIFEST
from .images import ImageLoadError  # a generated tree's manifest.json names its generator
GUIDE = "docs/DATA_GUIDE.md"
DECODE_ALL_UP_TO = 500  # per dataset: decode every opened image up to this many, else an even sample of it
VQA_IMAGE_PATTERNS = ("{image_id:012d}.jpg", "COCO_train2014_{image_id:012d}.jpg")

# --------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a stage and where it lives under the data root.

    kind: which of our readers reads it (None: no reader yet, only its files' presence is checked).
    annotation: the annotation file (or folder) relative to the root; images: the image folder;
    extra: further required files. real / samples: expected in a real data root / written by the
    shapes-world generator. ratio: the sample ratio in its stage's mixture (TINYGPTV_REFERENCE.md 3).
    """

    name: str
    title: str
    kind: Optional[str]
    annotation: str
    images: Optional[str] = None
    extra: tuple = ()
    ratio: Optional[str] = None
    real: bool = True
    samples: bool = True
    hint: str = ""

    @property
    def paths(self) -> tuple:
        return (self.annotation,) + tuple(self.extra) + ((self.images,) if self.images else ())


_PAIRS = (
    DatasetSpec("laion", "LAION-115M subset, BLIP synthetic captions (img2dataset webdataset shards)", "shards",
                "stage1_2/laion", ratio="115", samples=False),
    DatasetSpec("cc_sbu", "Conceptual Captions 3M/12M + SBU, BLIP synthetic captions (webdataset shards)", "shards",
                "stage1_2/cc_sbu", ratio="14", samples=False),
    DatasetSpec("shapes_pairs", "shapes-world image-caption pairs (stand-in for LAION and CC/SBU)", "shards",
                "stage1_2/shards", real=False),
)

STAGES: dict = {
    1: _PAIRS,
    2: _PAIRS,
    3: (
        DatasetSpec("cc_sbu_align", "MiniGPT-4 cc_sbu_align: 3.5k detailed descriptions", "cc_sbu_align",
                    "cc_sbu_align/filter_cap.json", images="cc_sbu_align/image"),
    ),
    4: (
        DatasetSpec("multitask_conversation", "MiniGPT-v2 multi-task conversation (converted to LLaVA JSON)", "llava",
                    "multitask_conversation/conversation.json", images="multitask_conversation/images", ratio="50",
                    samples=False, hint="convert multitask_conversation.json as the guide shows"),
        DatasetSpec("llava_conversation", "LLaVA-Instruct conversation_58k", "llava", "llava/conversation.json",
                    images="llava/images", ratio="30"),
        DatasetSpec("llava_detail", "LLaVA-Instruct detail_23k", "llava", "llava/detail.json",
                    images="llava/images", ratio="20"),
        DatasetSpec("llava_reason", "LLaVA-Instruct complex_reasoning_77k", "llava", "llava/reason.json",
                    images="llava/images", ratio="80", samples=False),
        DatasetSpec("unnatural_instructions", "unnatural instructions, text only (converted to LLaVA JSON)", "llava",
                    "unnatural_instructions/conversation.json", ratio="10", samples=False,
                    hint="convert filtered_unnatural_instruction.json as the guide shows"),
        DatasetSpec("vg_refer", "Visual Genome region descriptions ([refer])", None,
                    "visual_genome/region_descriptions.json",
                    extra=("visual_genome/image_data.json", "visual_genome/VG_100K", "visual_genome/VG_100K_2"),
                    ratio="40", samples=False),
        DatasetSpec("flickr_grounded_caption", "Flickr30k grounded captions ([grounding])", None,
                    "flickr30k/groundedcaption.json", images="flickr30k/images", ratio="80", samples=False),
        DatasetSpec("flickr_caption_to_phrase", "Flickr30k caption to phrase ([detection])", None,
                    "flickr30k/captiontobbox.json", images="flickr30k/images", ratio="80", samples=False),
        DatasetSpec("flickr_object_to_phrase", "Flickr30k object to phrase ([detection])", None,
                    "flickr30k/phrasetobbox.json", images="flickr30k/images", ratio="80", samples=False),
        DatasetSpec("textcaps", "TextCaps train captions ([caption])", None, "textcaps/TextCaps_0.1_train.json",
                    images="textcaps/train_images", ratio="30", samples=False),
        DatasetSpec("refcoco", "RefCOCO (unc), [refer] and [identify]", "refcoco", "refcoco/refs.json",
                    images="refcoco/images", ratio="25 + 10"),
        DatasetSpec("refcoco+", "RefCOCO+ (unc), [refer] and [identify]", "refcoco", "refcoco+/refs.json",
                    images="refcoco+/images", ratio="25 + 10", samples=False),
        DatasetSpec("refcocog", "RefCOCOg (umd), [refer] and [identify]", "refcoco", "refcocog/refs.json",
                    images="refcocog/images", ratio="25 + 10", samples=False),
        DatasetSpec("coco_vqa", "COCO-VQA (VQAv2 train)", "vqav2", "vqa/questions.json",
                    images="vqa/images", extra=("vqa/annotations.json",), ratio="15"),
        DatasetSpec("okvqa", "OK-VQA train", "vqav2", "okvqa/questions.json", images="okvqa/images",
                    extra=("okvqa/annotations.json",), ratio="8", samples=False),
        DatasetSpec("aokvqa", "A-OKVQA train", None, "aokvqa/aokvqa_v1p0_train.json", images="aokvqa/images",
                    ratio="12", samples=False),
        DatasetSpec("gqa", "GQA train-balanced", "gqa", "gqa/train_balanced_questions.json", images="gqa/images",
                    ratio="50"),
        DatasetSpec("shapes_multitask", "shapes-world chats with the stage-4 task identifiers", "llava",
                    "llava/multitask.json", images="llava/images", real=False),
    ),
    "eval": (
        DatasetSpec("gqa_testdev", "GQA testdev-balanced", "gqa", "eval/gqa/testdev_balanced_questions.json",
                    images="eval/gqa/images"),
        DatasetSpec("vsr", "VSR zero-shot test split", "vsr", "eval/vsr/test.jsonl", images="eval/vsr/images"),
        DatasetSpec("iconqa", "IconQA choose_txt val", "iconqa", "eval/iconqa/val/choose_txt"),
        DatasetSpec("vizwiz", "VizWiz-VQA val", "vizwiz", "eval/vizwiz/val.json", images="eval/vizwiz/val"),
        DatasetSpec("hm", "Hateful Memes dev", "hm", "eval/hm/dev.jsonl", images="eval/hm/img"),
    ),
}


def detect_layout(root: Union[str, Path]) -> str:
    """'samples' for a tree written by our generator (its manifest.json says so), else 'real'."""
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "real"
    return "samples" if isinstance(manifest, dict) and manifest.get("generator") == GENERATOR else "real"


def stage_datasets(stage, layout: str) -> list:
    """The datasets a stage lists in a layout ('real' or 'samples'), in report order.

    A real root lists the real datasets only; a shapes-world tree lists them all (the real ones
    the generator does not imitate show as "not covered").
    """
    return [s for s in STAGES[stage] if layout == "samples" or s.real]


# --------------------------------------------------------------------------- the report


class Problem(NamedTuple):
    """One thing wrong. field holds the field name, or the image path for an image problem."""

    file: str
    record: Optional[str]
    field: Optional[str]
    reason: str
    dataset: str = ""
    kind: str = "schema"  # schema | image | missing

    def describe(self, root: Optional[Path] = None) -> str:
        parts = [_short(self.file, root)]
        if self.record is not None:
            parts.append(self.record)
        if self.field is not None:
            parts.append(f"image {_short(self.field, root)}" if self.kind == "image" else f"field {self.field!r}")
        return ": ".join(parts) + ": " + " ".join(self.reason.split())


@dataclass
class DatasetResult:
    """Counts for one dataset. status: ok, problems, missing, not covered, present (not read), skipped."""

    name: str
    title: str
    ratio: Optional[str]
    status: str = "ok"
    records: int = 0
    images: int = 0  # distinct images referenced (or shard samples)
    opened: int = 0  # images opened with PIL verify()
    decoded: int = 0  # images fully decoded
    problems: int = 0
    seconds: float = 0.0
    note: str = ""


@dataclass
class CheckReport:
    stage: object
    root: Path
    layout: str
    datasets: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def counts(self) -> dict:
        """Records read per dataset (shard samples for stages 1-2)."""
        return {d.name: d.records for d in self.datasets}

    def format(self, max_problems: Optional[int] = 50) -> str:
        """A readable report; at most max_problems problems listed per dataset (None: all)."""
        where_from = ("shapes-world tree written by our generator (manifest.json)" if self.layout == "samples"
                      else "real data layout (docs/DATA_GUIDE.md)")
        lines = [f"data check: stage {self.stage}, root {self.root}", f"layout: {where_from}", ""]
        header = (f"  {'dataset':<26}{'ratio':>8}{'records':>10}{'images':>9}{'opened':>8}{'decoded':>9}"
                  f"{'time':>8}  status")
        lines.append(header)
        for d in self.datasets:
            shown = d.status if d.status == "missing" or not d.problems else f"{d.problems} problem(s)"
            if d.note:
                shown += f" ({d.note})"
            counted = d.status not in ("missing", "not covered", "skipped", "present (not read)")
            numbers = (f"{d.records:>10}{d.images:>9}{d.opened:>8}{d.decoded:>9}" if counted
                       else f"{'-':>10}{'-':>9}{'-':>8}{'-':>9}")
            seconds = f"{d.seconds:>7.1f}s" if d.status not in ("not covered", "skipped") else f"{'':>8}"
            lines.append(f"  {d.name:<26}{(d.ratio or ''):>8}{numbers}{seconds}  {shown}")
        if self.problems:
            lines += ["", f"problems ({len(self.problems)}):"]
            by_dataset: dict = {}
            for p in self.problems:
                by_dataset.setdefault(p.dataset, []).append(p)
            for name, items in by_dataset.items():
                lines.append(f"  [{name}]")
                limit = len(items) if max_problems is None else max_problems
                lines += [f"    {p.describe(self.root)}" for p in items[:limit]]
                if len(items) > limit:
                    lines.append(f"    ... and {len(items) - limit} more (--show-all lists them)")
        if self.notes:
            lines += ["", "notes:"] + [f"  {n}" for n in self.notes]
        verdict = "clean" if self.ok else f"{len(self.problems)} problem(s) found"
        lines += ["", f"result: {verdict} in {self.seconds:.1f} s"]
        return "\n".join(lines)


def _short(path: str, root: Optional[Path]) -> str:
    """A path relative to the data root when it lies under it (reports stay readable)."""
    if root is None:
        return path
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        try:
            return Path(path).relative_to(root.resolve()).as_posix()
        except ValueError:
            return path


# --------------------------------------------------------------------------- reading every record


class _Ref(NamedTuple):
    """A record's reference to an image file."""

    file: str
    record: str
    field: str
    path: Path


_RECORD_ZERO = re.compile(r"^record 0\b")
_LINE_ONE = re.compile(r"^line 1\b")


def _problem(err: DataFormatError, dataset: str, file: Optional[Path] = None, index: Optional[int] = None,
             line: Optional[int] = None, scratch: Optional[tuple] = None) -> Problem:
    """A reader's error as a Problem; for a record read alone, put back its real file and position.

    scratch: (scratch folder, real folder) to put the real folder back into the message.
    """
    record = err.record
    if record is not None and index is not None:
        record = _RECORD_ZERO.sub(f"record {index}", record)
    if record is not None and line is not None:
        record = _LINE_ONE.sub(f"line {line}", record)
    reason = err.problem if err.problem is not None else str(err)
    if scratch is not None:
        reason = reason.replace(str(Path(scratch[0]).resolve()), str(Path(scratch[1]).resolve()))
    return Problem(str(file) if file is not None else err.file, record, err.field, reason, dataset)


class _Scratch:
    """Scratch files for reading one record at a time, rewritten in place.

    Why in place: on ext4, truncating or deleting a file just written forces it to disk
    (auto_da_alloc), about 3 ms each; rewriting an open file costs microseconds, which matters
    when a million-record file has to be read record by record.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict = {}

    def write(self, name: str, data: Union[str, bytes]) -> Path:
        path = self.folder / name
        handle = self.files.get(name)
        if handle is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = self.files[name] = open(path, "w+b")
        handle.seek(0)
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        handle.truncate()
        handle.flush()
        return path

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()
        self.files.clear()


def _read_isolated(path: Path, container: str, whole: Callable[[], list], one: Callable[[Path], list],
                   dataset: str, tmp: Path) -> tuple:
    """Read a file with our reader; if it stops at a bad record, read the records one by one.

    Returns ([(position, record)], [Problem]); position is the record index, or the 1-based line
    for JSON lines. Why the second pass: a reader raises at the first bad record, but before a
    long run we want every bad record at once. Each record is written alone to a scratch file of
    the same name and given to the same reader, so the rules stay the reader's.
    """
    try:
        records = whole()
        if container == "jsonl":
            return list(zip(_jsonl_lines(path), records)), []
        return list(enumerate(records)), []
    except DataFormatError as err:
        first = err
    except (OSError, ValueError) as err:  # e.g. not UTF-8
        return [], [Problem(str(path), None, None, f"cannot read: {type(err).__name__}: {err}", dataset)]
    writer = _Scratch(tmp)
    try:
        return _read_one_by_one(path, container, first, one, dataset, tmp, writer)
    finally:
        writer.close()


def _read_one_by_one(path: Path, container: str, first: DataFormatError, one: Callable[[Path], list],
                     dataset: str, tmp: Path, writer: "_Scratch") -> tuple:
    results, problems = [], []
    if container == "jsonl":
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    problems.append(Problem(str(path), f"line {number}", None,
                                            f"not UTF-8 text: byte {raw[err.start:err.start + 1]!r} at column "
                                            f"{err.start + 1}", dataset))
                    continue
                try:
                    json.loads(line)
                except ValueError as err:
                    problems.append(Problem(str(path), f"line {number}", None, f"invalid JSON: {err}", dataset))
                    continue
                scratch = writer.write(path.name, line)
                try:
                    results.append((number, one(scratch)[0]))
                except DataFormatError as err:
                    problems.append(_problem(err, dataset, path, line=number, scratch=(tmp, path.parent)))
                except Exception as err:  # a reader should not fail this way; report, do not crash
                    problems.append(Problem(str(path), f"line {number}", None, _unexpected(err), dataset))
        return results, problems
    try:
        data = read_json(path)
    except DataFormatError as err:  # not JSON at all (e.g. truncated): nothing more to read
        return [], [_problem(err, dataset)]
    except (OSError, ValueError) as err:
        return [], [Problem(str(path), None, None, f"cannot read: {type(err).__name__}: {err}", dataset)]
    if container == "list" and isinstance(data, list):
        items, wrap = list(enumerate(data)), (lambda item: [item])
    elif container == "annotations" and isinstance(data, dict) and isinstance(data.get("annotations"), list):
        items, wrap = list(enumerate(data["annotations"])), (lambda item: {"annotations": [item]})
    elif container == "keyed" and isinstance(data, dict):
        items, wrap = list(enumerate(data.items())), (lambda kv: {kv[0]: kv[1]})
    else:  # the top level itself is wrong: the reader's first complaint says it
        return [], [_problem(first, dataset)]
    for index, item in items:
        scratch = writer.write(path.name, json.dumps(wrap(item)))
        try:
            results.append((index, one(scratch)[0]))
        except DataFormatError as err:
            problems.append(_problem(err, dataset, path, index=index, scratch=(tmp, path.parent)))
        except Exception as err:  # a reader should not fail this way; report, do not crash
            problems.append(Problem(str(path), f"record {index}", None, _unexpected(err), dataset))
    return results, problems


def _unexpected(err: Exception) -> str:
    return f"unreadable record ({type(err).__name__}: {err})"


def _jsonl_lines(path: Path) -> list:
    """1-based numbers of the non-empty lines (the records) of a JSON-lines file."""
    with open(path, "rb") as f:
        return [n for n, line in enumerate(f, start=1) if line.strip()]


def _safe_image(root: Path, relative: str, file: Path, at: str, fld: str, dataset: str, problems: list):
    try:
        return resolve_under(root, relative, file=file, at=at, field=fld, must_exist=False)
    except DataFormatError as err:
        problems.append(_problem(err, dataset))
        return None


def _scan_file_dataset(spec: DatasetSpec, root: Path, tmp: Path) -> tuple:
    """(records read, image refs, problems, note) for every kind except shards."""
    kind, name = spec.kind, spec.name
    path = root / spec.annotation
    image_root = root / spec.images if spec.images else None
    problems: list = []
    note = ""
    if kind == "llava":
        pairs, problems = _read_isolated(path, "list", lambda: read_llava(path, image_root, check_images=False),
                                         lambda p: read_llava(p, image_root, check_images=False), name, tmp)
        refs = [_Ref(str(path), where(i, r.id), "image", r.image_path) for i, r in pairs if r.image_path is not None]
    elif kind == "refcoco":
        pairs, problems = _read_isolated(path, "list", lambda: read_refcoco(path, image_root, check_images=False),
                                         lambda p: read_refcoco(p, image_root, check_images=False), name, tmp)
        refs = [_Ref(str(path), where(i, r.ref_id, "ref_id"), "image", r.image_path) for i, r in pairs]
    elif kind == "gqa":
        pairs, problems = _read_isolated(path, "keyed", lambda: read_gqa(path, image_root, check_images=False),
                                         lambda p: read_gqa(p, image_root, check_images=False), name, tmp)
        refs = [_Ref(str(path), where(i, r.qid, "qid"), "imageId", r.image_path) for i, r in pairs]
    elif kind == "vizwiz":
        pairs, problems = _read_isolated(path, "list", lambda: read_vizwiz(path, image_root, check_images=False),
                                         lambda p: read_vizwiz(p, image_root, check_images=False), name, tmp)
        refs = [_Ref(str(path), where(i, r.image, "image"), "image", r.image_path) for i, r in pairs]
    elif kind == "vsr":
        pairs, problems = _read_isolated(path, "jsonl", lambda: read_vsr(path, image_root, check_images=False),
                                         lambda p: read_vsr(p, image_root, check_images=False), name, tmp)
        refs = [_Ref(str(path), f"line {n}", "image", r.image_path) for n, r in pairs]
    elif kind == "hm":
        folder = path.parent
        pairs, problems = _read_isolated(
            path, "jsonl", lambda: read_hateful_memes(path, folder, check_images=False),
            lambda p: read_hateful_memes(p, folder, check_images=False), name, tmp)
        refs = [_Ref(str(path), f"line {n} (id {r.id})", "img", r.image_path) for n, r in pairs]
    elif kind == "cc_sbu_align":
        folder = path.parent
        pairs, problems = _read_isolated(path, "annotations", lambda: read_cc_sbu_align(folder, check_images=False),
                                         lambda p: read_cc_sbu_align(p.parent, check_images=False), name, tmp)
        refs = []
        for i, r in pairs:  # resolve against the real folder (a record read alone was resolved in scratch)
            at = where(i, r.image_id, "image_id")
            image = _safe_image(folder, f"image/{r.image_id}.jpg", path, at, "image_id", name, problems)
            if image is not None:
                refs.append(_Ref(str(path), at, "image_id", image))
    elif kind == "iconqa":
        pairs, problems = _read_iconqa(path, name, tmp)
        refs = []
        for _, r in pairs:
            at = f"problem {r.pid!r}"
            data = path / r.pid / "data.json"
            image = _safe_image(path, f"{r.pid}/image.png", data, at, "image", name, problems)
            if image is not None:
                refs.append(_Ref(str(data), at, "image", image))
    elif kind == "vqav2":
        pairs, problems, note = _read_vqa(spec, root, name, tmp)
        refs = [_Ref(str(path), where(i, r.question_id, "question_id"), "image_id", r.image_path) for i, r in pairs]
    else:
        raise ValueError(f"no scanner for kind {kind!r}")
    return len(pairs), refs, problems, note


def _read_iconqa(folder: Path, dataset: str, tmp: Path) -> tuple:
    """IconQA: one data.json per problem folder; on a bad one, read each problem alone."""
    try:
        return list(enumerate(read_iconqa(folder, check_images=False))), []
    except DataFormatError:
        pass
    results, problems = [], []
    problem_dirs = sorted((p for p in folder.iterdir() if p.is_dir()),
                          key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))
    scratch_root = tmp / "iconqa"
    current, handle = None, None
    try:
        for index, sub in enumerate(problem_dirs):
            data = sub / "data.json"
            if not data.is_file():  # the reader's own words for it
                problems.append(Problem(str(data), f"problem {sub.name!r}", None, "data.json is missing", dataset))
                continue
            target = scratch_root / sub.name  # one scratch problem folder, renamed to each pid in turn
            if current is None:
                target.mkdir(parents=True)
                handle = open(target / "data.json", "w+b")
            elif current != target:
                current.rename(target)
            current = target
            handle.seek(0)
            handle.write(data.read_bytes())
            handle.truncate()
            handle.flush()
            try:
                results.append((index, read_iconqa(scratch_root, check_images=False)[0]))
            except DataFormatError as err:
                problems.append(_problem(err, dataset, data, scratch=(scratch_root, folder)))
    finally:
        if handle is not None:
            handle.close()
    return results, problems


def vqa_image_pattern(questions_file: Path, image_root: Path, probe: int = 50) -> str:
    """Which file-name pattern the images use: ours ({id:012d}.jpg) or COCO's (COCO_train2014_...).

    Probes the images of the first questions; the pattern that finds more files wins (ties: ours).
    """
    try:
        questions = read_json(questions_file).get("questions", [])[:probe]
        ids = [q["image_id"] for q in questions if isinstance(q, dict) and isinstance(q.get("image_id"), int)]
    except (OSError, DataFormatError, AttributeError, TypeError):
        return VQA_IMAGE_PATTERNS[0]
    hits = [sum((image_root / p.format(image_id=i)).is_file() for i in ids) for p in VQA_IMAGE_PATTERNS]
    return VQA_IMAGE_PATTERNS[max(range(len(hits)), key=lambda k: (hits[k], -k))]


def _read_vqa(spec: DatasetSpec, root: Path, dataset: str, tmp: Path) -> tuple:
    """VQAv2 layout: questions + annotations joined by question_id; on an error, one pair at a time."""
    qpath, apath, image_root = root / spec.annotation, root / spec.extra[0], root / spec.images
    pattern = vqa_image_pattern(qpath, image_root)
    note = "" if pattern == VQA_IMAGE_PATTERNS[0] else f"images named {pattern}"

    def read(questions: Path, annotations: Path) -> list:
        return read_vqav2(questions, annotations, image_root, image_pattern=pattern, check_images=False)

    try:
        return list(enumerate(read(qpath, apath))), [], note
    except DataFormatError:
        pass
    writer = _Scratch(tmp)
    try:
        return _read_vqa_one_by_one(qpath, apath, read, writer, dataset) + (note,)
    finally:
        writer.close()


def _read_vqa_one_by_one(qpath: Path, apath: Path, read: Callable, writer: _Scratch, dataset: str) -> tuple:
    problems: list = []
    tq, ta = writer.folder / "questions.json", writer.folder / "annotations.json"

    def write(questions: list, annotations: list) -> None:
        writer.write(tq.name, json.dumps({"questions": questions}))
        writer.write(ta.name, json.dumps({"annotations": annotations}))

    good: dict = {}
    bad: set = set()
    try:
        adata = read_json(apath)
    except DataFormatError as err:
        return [], [_problem(err, dataset)]
    if not (isinstance(adata, dict) and isinstance(adata.get("annotations"), list)):
        write([], [])
        try:  # no questions: only the annotations file's top level is judged
            read(tq, apath)
        except DataFormatError as err:
            problems.append(_problem(err, dataset))
        return [], problems
    for index, item in enumerate(adata["annotations"]):
        write([], [item])
        qid = item.get("question_id") if isinstance(item, dict) else None
        try:
            read(tq, ta)
        except DataFormatError as err:
            problems.append(_problem(err, dataset, apath, index=index))
            if isinstance(qid, (int, str)):
                bad.add(qid)
            continue
        good[qid] = item
    try:
        qdata = read_json(qpath)
    except DataFormatError as err:
        return [], problems + [_problem(err, dataset)]
    if not (isinstance(qdata, dict) and isinstance(qdata.get("questions"), list)):
        try:
            read(qpath, ta)
        except DataFormatError as err:
            problems.append(_problem(err, dataset))
        return [], problems
    results = []
    for index, item in enumerate(qdata["questions"]):
        qid = item.get("question_id") if isinstance(item, dict) else None
        known = isinstance(qid, (int, str))
        write([item], [good[qid]] if known and qid in good else [])
        try:
            results.append((index, read(tq, ta)[0]))
        except DataFormatError as err:
            if Path(err.file) == ta:  # a join problem: it belongs to the annotations file
                if known and qid in bad and err.problem == "no annotation for this question":
                    continue  # its annotation is already reported as malformed
                problems.append(_problem(err, dataset, apath))
            else:
                problems.append(_problem(err, dataset, qpath, index=index))
    return results, problems


# --------------------------------------------------------------------------- images


class _ImageResult(NamedTuple):
    exists: bool
    error: Optional[str]  # verify/decode failure
    opened: bool
    decoded: bool


def _verify_file(path: Path, decode: bool) -> _ImageResult:
    """verify() checks the file's structure without decoding; a real load catches truncated pixels.

    The load is the trainer's own (`open_image` is `data.images.load_image`), so an image this check
    passes is one training, chat and evaluation can read."""
    try:
        with Image.open(path) as image:
            image.verify()
        if decode:
            open_image(path)
    except FileNotFoundError:
        return _ImageResult(False, None, False, False)
    except Exception as err:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...)
        return _ImageResult(True, _image_error(err), True, False)
    return _ImageResult(True, None, True, decode)


def _verify_bytes(data: bytes, decode: bool) -> Optional[str]:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        if decode:
            open_image(data)
    except Exception as err:
        return _image_error(err)
    return None


def _image_error(err: Exception) -> str:
    if isinstance(err, UnidentifiedImageError):  # its message holds a path or a memory address
        return "not an image PIL can identify"
    if isinstance(err, ImageLoadError):  # "<file>: <reason>": the problem names the file already
        return str(err).split(": ", 1)[-1]
    return f"{type(err).__name__}: {err}"


def _evenly(items: list, n: Optional[int]) -> list:
    """n items spread evenly over the list (all when n is None or not smaller)."""
    if n is None or n >= len(items):
        return list(items)
    if n <= 0:
        return []
    step = len(items) / n
    return [items[int(k * step)] for k in range(n)]


def _check_images(refs: list, dataset: str, max_images: Optional[int], pool: ThreadPoolExecutor,
                  cache: dict) -> tuple:
    """(distinct images, opened, decoded, problems): every image's existence, PIL for a chosen set."""
    first_ref: dict = {}
    uses: dict = {}
    for ref in refs:
        key = str(ref.path)
        first_ref.setdefault(key, ref)
        uses[key] = uses.get(key, 0) + 1
    paths = list(first_ref)
    exists = dict(zip(paths, pool.map(os.path.isfile, paths)))
    present = [p for p in paths if exists[p]]
    to_open = _evenly(present, max_images)
    to_decode = set(_evenly(to_open, DECODE_ALL_UP_TO))
    jobs = [p for p in to_open if p not in cache
            or (p in to_decode and not cache[p].decoded and cache[p].error is None)]
    for p, result in zip(jobs, pool.map(lambda p: _verify_file(Path(p), p in to_decode), jobs)):
        cache[p] = result
    problems = []
    for p in paths:
        ref = first_ref[p]
        more = f" (and {uses[p] - 1} more record(s) use it)" if uses[p] > 1 else ""
        if not exists[p]:
            problems.append(Problem(ref.file, ref.record, p, f"image file not found (field {ref.field!r}){more}",
                                    dataset, "image"))
        elif p in cache and cache[p].error is not None and (p in to_open):
            problems.append(Problem(ref.file, ref.record, p, f"image does not open: {cache[p].error}{more}",
                                    dataset, "image"))
    opened = sum(1 for p in to_open if p in cache and cache[p].opened)
    decoded = sum(1 for p in to_open if p in cache and cache[p].decoded)
    return len(paths), opened, decoded, problems


# --------------------------------------------------------------------------- shards (stages 1-2)


def _scan_shard(path: Path, dataset: str, verify_quota: Optional[int], decode_quota: int) -> tuple:
    """(samples, opened, decoded, problems) for one tar shard. Fast path: read_shard; on an error,
    walk the members again and judge each sample with the reader's own per-sample rules."""
    def judge(samples_iter) -> tuple:
        count = opened = decoded = 0
        problems = []
        for sample in samples_iter:
            if isinstance(sample, Problem):
                problems.append(sample)
                continue
            if verify_quota is None or opened < verify_quota:
                decode = decoded < decode_quota
                error = _verify_bytes(sample.image, decode)
                opened += 1
                decoded += decode
                if error is not None:
                    problems.append(Problem(str(path), f"sample {count} (key {sample.key!r})", f"{path}#{sample.key}",
                                            f"image does not open: {error}", dataset, "image"))
            count += 1
        return count, opened, decoded, problems

    try:
        found = judge(read_shard(path))
    except (DataFormatError, tarfile.TarError, OSError, EOFError):
        found = judge(_walk_shard(path, dataset))
    if any(p.record is None and p.reason.startswith("not a readable tar") for p in found[3]):
        return found
    tail = _tar_tail_problem(path, dataset)
    return found if tail is None else found[:3] + (found[3] + [tail],)


def _tar_tail_problem(path: Path, dataset: str) -> Optional[Problem]:
    """A complete tar ends in at least two zero blocks (1024 bytes). Why check: tarfile stops
    silently at a header cut in half, so a shard truncated by a failed copy reads as a shorter
    but valid one."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - 1024))
            tail = f.read()
    except OSError as err:
        return Problem(str(path), None, None, f"cannot read: {err}", dataset)
    if size >= 1024 and tail.count(0) == len(tail):
        return None
    return Problem(str(path), None, None, "no end-of-archive marker (the last 1024 bytes are not zero): the file is "
                   "probably truncated and the samples after the cut are lost", dataset)


def _walk_shard(path: Path, dataset: str):
    """Yield each sample of a shard, or a Problem for each bad sample, reading to the end."""
    try:
        tar = tarfile.open(path, "r")
    except (tarfile.TarError, OSError) as err:
        yield Problem(str(path), None, None, f"not a readable tar file: {err}", dataset)
        return
    seen: set = set()
    key, members, index = None, {}, 0

    def finish():
        try:
            return _finish_shard_sample(path, index, key, members)
        except DataFormatError as err:
            return _problem(err, dataset)

    with tar:
        try:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_member_name(member.name)
                if member_key != key:
                    if key is not None:
                        yield finish()
                        index += 1
                    if member_key in seen:
                        yield Problem(str(path), f"sample {index} (key {member_key!r})", ext,
                                      "members of this key are not consecutive", dataset)
                    seen.add(member_key)
                    key, members = member_key, {}
                members[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            yield Problem(str(path), f"after sample {index}", None, f"tar file is truncated or corrupt: {err}", dataset)
            key = None  # the last sample's members may be incomplete: do not judge it
        if key is not None:
            yield finish()


def _scan_shards(spec: DatasetSpec, root: Path, max_images: Optional[int], pool: ThreadPoolExecutor,
                 result: DatasetResult) -> list:
    folder = root / spec.annotation
    try:
        shards = list_shards(folder)
    except FileNotFoundError:
        return [Problem(str(folder), None, None, "no .tar shards in this folder", spec.name, "missing")]
    verify_quota = None if max_images is None else math.ceil(max_images / len(shards))
    decode_quota = math.ceil(DECODE_ALL_UP_TO / len(shards))
    problems = []
    for count, opened, decoded, found in pool.map(
            lambda s: _scan_shard(s, spec.name, verify_quota, decode_quota), shards):
        result.records += count
        result.opened += opened
        result.decoded += decoded
        problems += found
    result.images = result.records
    result.note = f"{len(shards)} shard(s)"
    return problems


# --------------------------------------------------------------------------- the check


def _missing_paths(spec: DatasetSpec, root: Path) -> list:
    return [p for p in spec.paths if not (root / p).exists()]


def check_stage(stage: Union[int, str], root: Union[str, Path], *, max_images: Optional[int] = None,
                layout: str = "auto", skip: Iterable[str] = (), workers: Optional[int] = None) -> CheckReport:
    """Validate the data of one stage (1-4, or "eval" for the benchmarks) under root.

    Reads every annotation record with our readers, checks that every referenced image exists,
    opens images with PIL (verify() on up to max_images per dataset, None = all; a full decode on
    up to 500 of those) and collects every problem. layout: "auto" (a generated tree is known by
    its manifest.json), "real" or "samples". skip: dataset names to leave out on purpose.
    """
    started = time.perf_counter()
    if isinstance(stage, str) and stage.isdigit():
        stage = int(stage)
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: use 1, 2, 3, 4 or 'eval'")
    root = Path(root)
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in ("real", "samples"):
        raise ValueError(f"unknown layout {layout!r}: use auto, real or samples")
    skip = set(skip)
    unknown = skip - {s.name for s in STAGES[stage]}
    if unknown:
        raise ValueError(f"stage {stage} has no dataset(s) {sorted(unknown)}")
    report = CheckReport(stage, root, layout)
    if not root.is_dir():
        report.problems.append(Problem(str(root), None, None, "data root is not a folder", "", "missing"))
        report.seconds = time.perf_counter() - started
        return report
    cache: dict = {}
    workers = workers or min(8, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool, tempfile.TemporaryDirectory(prefix="tinygptv_check_") as tmp:
        for spec in stage_datasets(stage, layout):
            result = DatasetResult(spec.name, spec.title, spec.ratio)
            report.datasets.append(result)
            t0 = time.perf_counter()
            if spec.name in skip:
                result.status = "skipped"
                continue
            if layout == "samples" and not spec.samples:
                result.status = "not covered"
                continue
            try:
                found = _check_dataset(spec, root, max_images, pool, cache, Path(tmp), result, report)
            except Exception as err:  # never let one dataset's surprise hide the others' problems
                found = [Problem(str(root / spec.annotation), None, None,
                                 f"could not be checked ({type(err).__name__}: {err})", spec.name)]
            if any(p.kind == "missing" for p in found):
                result.status = "missing"
            result.problems = len(found)
            if found and result.status == "ok":
                result.status = "problems"
            report.problems += found
            result.seconds = time.perf_counter() - t0
    skipped = [d.name for d in report.datasets if d.status == "skipped"]
    if skipped:
        report.notes.append("left out on request: " + ", ".join(skipped))
    if layout == "samples":
        uncovered = [d.name for d in report.datasets if d.status == "not covered"]
        if uncovered:
            report.notes.append("shapes-world tree: the generator does not imitate " + ", ".join(uncovered)
                                + f"; a real data root must hold them (see {GUIDE})")
    report.seconds = time.perf_counter() - started
    return report


def _check_dataset(spec: DatasetSpec, root: Path, max_images: Optional[int], pool: ThreadPoolExecutor,
                   cache: dict, tmp: Path, result: DatasetResult, report: CheckReport) -> list:
    """The problems of one dataset; fills in result's counts."""
    missing = _missing_paths(spec, root)
    if len(missing) == len(spec.paths) > 1:  # nothing there: one problem for the dataset
        folder = os.path.commonpath(spec.paths)
        expected = ", ".join(spec.paths)
        hint = f"; {spec.hint}" if spec.hint else ""
        return [Problem(str(root / folder), None, None, f"dataset missing: {spec.title}{hint} (expected {expected}; "
                        f"see {GUIDE})", spec.name, "missing")]
    if spec.kind is None:  # no reader yet: presence only
        if missing:
            return [_problem_missing(spec, root, p) for p in missing]
        result.status = "present (not read)"
        report.notes.append(f"{spec.name}: files present; contents not checked, our code has no reader "
                            f"for this format yet (see {GUIDE})")
        return []
    if spec.annotation in missing or set(spec.extra) & set(missing):
        return [_problem_missing(spec, root, p) for p in missing]
    if spec.kind == "shards":
        return _scan_shards(spec, root, max_images, pool, result)
    scratch = tmp / re.sub(r"[^A-Za-z0-9_]", "_", spec.name)
    scratch.mkdir()
    result.records, refs, found, result.note = _scan_file_dataset(spec, root, scratch)
    if spec.images and spec.images in missing:  # one problem, not one per image
        result.images = len({str(r.path) for r in refs})
        return found + [_problem_missing(spec, root, spec.images)]
    result.images, result.opened, result.decoded, image_problems = _check_images(
        refs, spec.name, max_images, pool, cache)
    return found + image_problems


def _problem_missing(spec: DatasetSpec, root: Path, relative: str) -> Problem:
    hint = f"; {spec.hint}" if spec.hint else ""
    return Problem(str(root / relative), None, None, f"missing: {spec.title}{hint} (see {GUIDE})",
                   spec.name, "missing")


# --------------------------------------------------------------------------- command line


def _stage_arg(value: str):
    if value in ("1", "2", "3", "4"):
        return int(value)
    if value == "eval":
        return value
    raise argparse.ArgumentTypeError("use 1, 2, 3, 4 or eval")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", type=_stage_arg, required=True, help="1, 2, 3, 4, or eval (the benchmarks)")
    parser.add_argument("--root", required=True, help="the data root (layout: docs/DATA_GUIDE.md)")
    parser.add_argument("--max-images", type=int, default=None,
                        help="open at most N images per dataset with PIL (existence of all is always checked)")
    parser.add_argument("--layout", choices=["auto", "real", "samples"], default="auto",
                        help="auto: a tree with our generator's manifest.json is 'samples', else 'real'")
    parser.add_argument("--skip", action="append", default=[], metavar="DATASET",
                        help="leave a dataset out on purpose (repeatable)")
    parser.add_argument("--show-all", action="store_true", help="list every problem (default: 50 per dataset)")


def _run(args: argparse.Namespace) -> int:
    try:
        report = check_stage(args.stage, args.root, max_images=args.max_images, layout=args.layout, skip=args.skip)
    except ValueError as err:  # e.g. --skip with a name the stage does not have
        print(f"data check: {err}", file=sys.stderr)
        return 2
    print(report.format(None if args.show_all else 50))
    return 0 if report.ok else 1


def register(subparsers) -> argparse.ArgumentParser:
    """Add `data check` to an argparse subparsers object (e.g. the `tinygptv` command's)."""
    data = subparsers.add_parser("data", help="data tools: check a prepared data folder, generate the shapes world")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="validate every record and image of a stage's data",
                                description="Validate a prepared data folder for one stage: every record read "
                                            "with our readers, every image checked; exit code 1 on any problem.")
    _add_arguments(check)
    check.set_defaults(func=_run)
    from . import generate

    gen = data_sub.add_parser("generate", help="write the shapes world (larger sets on demand) in every format")
    generate.add_arguments(gen)
    gen.set_defaults(func=generate.run)
    return check


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinygptv_lib.data.check",
                                     description="Validate a prepared data folder for one training stage.")
    _add_arguments(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
