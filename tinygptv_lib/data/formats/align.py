"""MiniGPT-4's ``cc_sbu_align`` layout (stage 3: 3.5k detailed image descriptions).

    root/filter_cap.json   {"annotations": [{"image_id": "2", "caption": "..."}, ...]}
    root/image/2.jpg
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from ._common import (DataFormatError, OnError, PathLike, read_json, require, require_text, resolve_under, skip_or_raise, where,
                      write_json)

ALIGN_FILE = "filter_cap.json"
ALIGN_IMAGE_DIR = "image"


@dataclass(frozen=True)
class AlignRecord:
    """One detailed description. ``image_path`` is filled in by the reader (not compared)."""

    image_id: str
    caption: str
    image_path: Optional[Path] = field(default=None, compare=False)


def write_cc_sbu_align(root: PathLike, records: Iterable[AlignRecord]) -> Path:
    """Write root/filter_cap.json (the images go to root/image/{image_id}.jpg separately)."""
    annotations = [{"image_id": r.image_id, "caption": r.caption} for r in records]
    return write_json(Path(root) / ALIGN_FILE, {"annotations": annotations})


def read_cc_sbu_align(root: PathLike, check_images: bool = True, on_error: OnError = None) -> list[AlignRecord]:
    """Read root/filter_cap.json and resolve each image to root/image/{image_id}.jpg."""
    root = Path(root)
    path = root / ALIGN_FILE
    data = read_json(path)
    annotations = require(data, "annotations", list, file=path, at="top level")
    records = []
    for index, item in enumerate(annotations):
        try:
            at = where(index)
            image_id = require(item, "image_id", str, file=path, at=at)
            at = where(index, image_id, "image_id")
            caption = require_text(item, "caption", file=path, at=at, what="caption")
            image = resolve_under(root, f"{ALIGN_IMAGE_DIR}/{image_id}.jpg", file=path, at=at,
                                  field="image_id", must_exist=check_images)
        except DataFormatError as err:
            skip_or_raise(err, on_error)
            continue
        records.append(AlignRecord(image_id, caption, image))
    return records
