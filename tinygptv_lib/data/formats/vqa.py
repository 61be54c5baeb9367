"""VQAv2-style question/annotation files and GQA-style balanced question files.

VQAv2 splits each split in two files joined by ``question_id``:
    questions:   {"questions": [{"image_id": 9, "question": "...", "question_id": 9001}, ...]}
    annotations: {"annotations": [{"question_id": 9001, "image_id": 9, "multiple_choice_answer": "2",
                                   "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": 1}, ...x10],
                                   "answer_type": "number"}, ...]}
GQA keeps one dict keyed by question id:
    {"02930152": {"imageId": "2354786", "question": "...", "answer": "no", "fullAnswer": "No, ..."}}
GQA's testdev-balanced file (the benchmark) has exactly this shape too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from ._common import (DataFormatError, OnError, PathLike, read_json, require, require_text, resolve_under,
                      skip_or_raise, where, write_json)

VQA_IMAGE_PATTERN = "{image_id:012d}.jpg"  # real VQAv2 train: "COCO_train2014_{image_id:012d}.jpg"


@dataclass(frozen=True)
class VQARecord:
    """A question with its ten human answers (VQA accuracy needs all ten)."""

    question_id: int
    image_id: int
    question: str
    answers: list
    multiple_choice_answer: str
    answer_type: Optional[str] = None
    image_path: Optional[Path] = field(default=None, compare=False)


def write_vqav2(questions_file: PathLike, annotations_file: PathLike, records: Iterable[VQARecord]) -> None:
    records = list(records)
    questions = [{"image_id": r.image_id, "question": r.question, "question_id": r.question_id}
                 for r in records]
    annotations = []
    for r in records:
        item = {
            "question_id": r.question_id,
            "image_id": r.image_id,
            "multiple_choice_answer": r.multiple_choice_answer,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                        for k, a in enumerate(r.answers)],
        }
        if r.answer_type is not None:
            item["answer_type"] = r.answer_type
        annotations.append(item)
    write_json(questions_file, {"task_type": "Open-Ended", "questions": questions})
    write_json(annotations_file, {"annotations": annotations})


def _read_annotations(path: Path, on_error: OnError = None) -> tuple[dict, set]:
    """question_id -> (image_id, answers, multiple_choice_answer, answer_type), every field checked;
    and the question ids of annotations that were bad (reported through on_error)."""
    items = require(read_json(path), "annotations", list, file=path, at="top level")
    by_id, bad = {}, set()
    for index, item in enumerate(items):
        try:
            qid = require(item, "question_id", int, file=path, at=where(index))
            at = where(index, qid, "question_id")
            require(item, "image_id", int, file=path, at=at)
            answers = require(item, "answers", list, file=path, at=at)
            if len(answers) != 10:
                raise DataFormatError(path, at, "answers", f"expected 10 answers, got {len(answers)}")
            texts = [require(a, "answer", str, file=path, at=at, field_prefix=f"answers[{k}].")
                     for k, a in enumerate(answers)]
            mc = require_text(item, "multiple_choice_answer", file=path, at=at, what="answer")
            answer_type = item.get("answer_type")
            if answer_type is not None:
                require(item, "answer_type", str, file=path, at=at)
        except DataFormatError as err:
            qid = item.get("question_id") if isinstance(item, dict) else None
            if isinstance(qid, str) and qid.strip().isdigit():
                qid = int(qid)  # a question_id written as text still names its question
            if isinstance(qid, int):
                bad.add(qid)
            skip_or_raise(err, on_error)
            continue
        by_id[qid] = (item["image_id"], texts, mc, answer_type)
    return by_id, bad


def read_vqav2(questions_file: PathLike, annotations_file: PathLike, image_root: PathLike,
               image_pattern: str = VQA_IMAGE_PATTERN, check_images: bool = True,
               on_error: OnError = None) -> list[VQARecord]:
    """Join questions and annotations by question_id; image = image_root/image_pattern.

    on_error: report bad records through it and go on (a question whose annotation was bad is left
    out without a second report); default: raise at the first."""
    qpath, apath = Path(questions_file), Path(annotations_file)
    annotations, bad = _read_annotations(apath, on_error)
    questions = require(read_json(qpath), "questions", list, file=qpath, at="top level")
    records = []
    for index, item in enumerate(questions):
        try:
            qid = require(item, "question_id", int, file=qpath, at=where(index))
            at = where(index, qid, "question_id")
            image_id = require(item, "image_id", int, file=qpath, at=at)
            question = require(item, "question", str, file=qpath, at=at)
            if qid not in annotations:
                if qid in bad:
                    continue  # its annotation was bad and has been reported
                raise DataFormatError(apath, f"question_id {qid}", "annotations", "no annotation for this question")
            ann_image, answers, mc, answer_type = annotations[qid]
            if ann_image != image_id:
                raise DataFormatError(apath, f"question_id {qid}", "image_id",
                                      f"annotation says image {ann_image}, question says {image_id}")
            image = resolve_under(image_root, image_pattern.format(image_id=image_id), file=qpath, at=at,
                                  field="image_id", must_exist=check_images)
        except DataFormatError as err:
            skip_or_raise(err, on_error)
            continue
        records.append(VQARecord(qid, image_id, question, answers, mc, answer_type, image))
    return records


@dataclass(frozen=True)
class GQARecord:
    """A GQA question: short answer plus the full-sentence answer."""

    qid: str
    image_id: str
    question: str
    answer: str
    full_answer: str
    image_path: Optional[Path] = field(default=None, compare=False)


def write_gqa(path: PathLike, records: Iterable[GQARecord]) -> Path:
    data = {r.qid: {"imageId": r.image_id, "question": r.question, "answer": r.answer,
                    "fullAnswer": r.full_answer} for r in records}
    return write_json(path, data)


def read_gqa(path: PathLike, image_root: PathLike, check_images: bool = True,
             on_error: OnError = None) -> list[GQARecord]:
    """Read a GQA balanced-questions file; images are image_root/{imageId}.jpg."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataFormatError(path, None, None, "expected a JSON object keyed by question id")
    records = []
    for index, (qid, item) in enumerate(data.items()):
        at = where(index, qid, "qid")
        try:
            image_id = require(item, "imageId", str, file=path, at=at)
            question = require(item, "question", str, file=path, at=at)
            answer = require_text(item, "answer", file=path, at=at, what="answer")
            full = require(item, "fullAnswer", str, file=path, at=at)
            image = resolve_under(image_root, f"{image_id}.jpg", file=path, at=at, field="imageId",
                                  must_exist=check_images)
        except DataFormatError as err:
            skip_or_raise(err, on_error)
            continue
        records.append(GQARecord(qid, image_id, question, answer, full, image))
    return records
