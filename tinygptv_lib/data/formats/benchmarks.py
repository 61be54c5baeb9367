"""The evaluation sets of TinyGPT-V's Table 2, in the files their benchmarks ship.

GQA testdev-balanced uses ``read_gqa`` from vqa.py (same file shape as GQA's training files).
    VSR            test.jsonl      {"image", "caption", "label": 0/1, "relation"} per line
    IconQA         {pid}/data.json {"question", "choices", "answer": index, "ques_type": "choose_txt"}
                   {pid}/image.png
    VizWiz         val.json        [{"image", "question", "answers": [{"answer", "answer_confidence"}] x10,
                                     "answerable": 0/1, "answer_type"}]
    Hateful Memes  dev.jsonl       {"id", "img": "img/01234.png", "label": 0/1, "text"} per line
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from ._common import (DataFormatError, PathLike, iter_jsonl, read_json, require, require_flag,
                      require_list_of, resolve_under, where, write_json, write_jsonl)

# --------------------------------------------------------------------------- VSR


@dataclass(frozen=True)
class VSRRecord:
    """A spatial statement about an image; label 1 = true, 0 = false."""

    image: str
    caption: str
    label: int
    relation: str
    image_path: Optional[Path] = field(default=None, compare=False)


def write_vsr(path: PathLike, records: Iterable[VSRRecord]) -> Path:
    return write_jsonl(path, [{"image": r.image, "caption": r.caption, "label": r.label,
                               "relation": r.relation} for r in records])


def read_vsr(path: PathLike, image_root: PathLike, check_images: bool = True) -> list[VSRRecord]:
    path = Path(path)
    records = []
    for index, item in iter_jsonl(path):
        at = f"line {index + 1}"
        image = require(item, "image", str, file=path, at=at)
        caption = require(item, "caption", str, file=path, at=at)
        label = require_flag(item, "label", file=path, at=at)
        relation = require(item, "relation", str, file=path, at=at)
        image_path = resolve_under(image_root, image, file=path, at=at, field="image", must_exist=check_images)
        records.append(VSRRecord(image, caption, label, relation, image_path))
    return records


# --------------------------------------------------------------------------- IconQA

ICONQA_DATA = "data.json"
ICONQA_IMAGE = "image.png"


@dataclass(frozen=True)
class IconQARecord:
    """A multiple-choice problem: the answer is an index into choices."""

    pid: str
    question: str
    choices: list
    answer: int
    ques_type: str = "choose_txt"
    image_path: Optional[Path] = field(default=None, compare=False)


def write_iconqa(root: PathLike, records: Iterable[IconQARecord]) -> None:
    """Write root/{pid}/data.json for each problem (images go to root/{pid}/image.png)."""
    for r in records:
        write_json(Path(root) / r.pid / ICONQA_DATA, {"question": r.question, "choices": list(r.choices),
                                                      "answer": r.answer, "ques_type": r.ques_type})


def _pid_order(name: str):
    """Numeric problem ids sort as numbers (IconQA's are), others after them by name."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def read_iconqa(root: PathLike, check_images: bool = True) -> list[IconQARecord]:
    """Read every root/{pid}/data.json (IconQA's choose_txt folder, e.g. iconqa/val/choose_txt)."""
    root = Path(root)
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: _pid_order(p.name))
    records = []
    for folder in folders:
        path = folder / ICONQA_DATA
        if not path.is_file():
            raise DataFormatError(path, f"problem {folder.name!r}", None, "data.json is missing")
        item = read_json(path)
        at = f"problem {folder.name!r}"
        question = require(item, "question", str, file=path, at=at)
        choices = require_list_of(item, "choices", str, file=path, at=at, min_length=2)
        answer = require(item, "answer", int, file=path, at=at)
        if not 0 <= answer < len(choices):
            raise DataFormatError(path, at, "answer", f"index {answer} is not one of the {len(choices)} choices")
        ques_type = require(item, "ques_type", str, file=path, at=at)
        image_path = resolve_under(root, f"{folder.name}/{ICONQA_IMAGE}", file=path, at=at, field="image",
                                   must_exist=check_images)
        records.append(IconQARecord(folder.name, question, choices, answer, ques_type, image_path))
    return records


# --------------------------------------------------------------------------- VizWiz

CONFIDENCES = ("yes", "maybe", "no")


@dataclass(frozen=True)
class VizWizRecord:
    """A question from a blind user: ten (answer, confidence) dicts; answerable 0 or 1."""

    image: str
    question: str
    answers: list
    answerable: int
    answer_type: str
    image_path: Optional[Path] = field(default=None, compare=False)


def write_vizwiz(path: PathLike, records: Iterable[VizWizRecord]) -> Path:
    return write_json(path, [{"image": r.image, "question": r.question,
                              "answers": [dict(a) for a in r.answers],
                              "answerable": r.answerable, "answer_type": r.answer_type} for r in records])


def read_vizwiz(path: PathLike, image_root: PathLike, check_images: bool = True) -> list[VizWizRecord]:
    """Read VizWiz val.json; images are image_root/{image} (VizWiz ships them in a val/ folder)."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataFormatError(path, None, None, "expected a JSON list of records")
    records = []
    for index, item in enumerate(data):
        image = require(item, "image", str, file=path, at=where(index))
        at = where(index, image, "image")
        question = require(item, "question", str, file=path, at=at)
        answers = require(item, "answers", list, file=path, at=at)
        if len(answers) != 10:
            raise DataFormatError(path, at, "answers", f"expected 10 answers, got {len(answers)}")
        for k, answer in enumerate(answers):
            prefix = f"answers[{k}]."
            require(answer, "answer", str, file=path, at=at, field_prefix=prefix)
            confidence = require(answer, "answer_confidence", str, file=path, at=at, field_prefix=prefix)
            if confidence not in CONFIDENCES:
                raise DataFormatError(path, at, prefix + "answer_confidence",
                                      f"expected one of {CONFIDENCES}, got {confidence!r}")
        answerable = require_flag(item, "answerable", file=path, at=at)
        answer_type = require(item, "answer_type", str, file=path, at=at)
        image_path = resolve_under(image_root, image, file=path, at=at, field="image", must_exist=check_images)
        records.append(VizWizRecord(image, question, [dict(a) for a in answers], answerable, answer_type,
                                    image_path))
    return records


# --------------------------------------------------------------------------- Hateful Memes


@dataclass(frozen=True)
class MemeRecord:
    """A meme: the image, the text written on it, and the label (1 = 'hateful')."""

    id: int
    img: str
    label: int
    text: str
    image_path: Optional[Path] = field(default=None, compare=False)


def write_hateful_memes(path: PathLike, records: Iterable[MemeRecord]) -> Path:
    return write_jsonl(path, [{"id": r.id, "img": r.img, "label": r.label, "text": r.text} for r in records])


def read_hateful_memes(path: PathLike, root: Optional[PathLike] = None,
                       check_images: bool = True) -> list[MemeRecord]:
    """Read dev.jsonl; "img" paths ("img/01235.png") are relative to root (default: the file's folder)."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    records = []
    for index, item in iter_jsonl(path):
        ident = require(item, "id", int, file=path, at=f"line {index + 1}")
        at = f"line {index + 1} (id {ident})"
        img = require(item, "img", str, file=path, at=at)
        label = require_flag(item, "label", file=path, at=at)
        text = require(item, "text", str, file=path, at=at)
        image_path = resolve_under(root, img, file=path, at=at, field="img", must_exist=check_images)
        records.append(MemeRecord(ident, img, label, text, image_path))
    return records
