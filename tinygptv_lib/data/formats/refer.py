"""RefCOCO-style referring expressions (stage 4 [refer] / [identify]).

Our file is a flat JSON list, one record per referred object:
    [{"ref_id": 0, "image": "000000000001.jpg", "sentences": ["the red circle", ...],
      "bbox": [x, y, w, h], "width": 224, "height": 224}, ...]
``bbox`` is COCO's convention: top-left corner plus width and height, in pixels.

The real RefCOCO ships ``refs(unc).p`` (a pickle: a list of refs with ref_id, ann_id, image_id,
split, sentences=[{"sent": ...}]) beside COCO's ``instances.json`` (images with file_name,
width, height; annotations with id and bbox). ``convert_refcoco`` joins the two into our records.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from ._common import (DataFormatError, OnError, PathLike, read_json, require, require_finite, require_list_of,
                      resolve_under, skip_or_raise, where, write_json)


@dataclass(frozen=True)
class RefRecord:
    """One referred object: phrases for it, its COCO-style [x, y, w, h] box and the image size."""

    ref_id: int
    image: str
    sentences: list
    bbox: list
    width: int
    height: int
    image_path: Optional[Path] = field(default=None, compare=False)

    @property
    def box_xyxy(self) -> tuple:
        """(x1, y1, x2, y2): the corner form that box text and IoU use."""
        x, y, w, h = self.bbox
        return (x, y, x + w, y + h)


def write_refcoco(path: PathLike, records: Iterable[RefRecord]) -> Path:
    items = [{"ref_id": r.ref_id, "image": r.image, "sentences": list(r.sentences), "bbox": list(r.bbox),
              "width": r.width, "height": r.height} for r in records]
    return write_json(path, items)


def _check_box(path: Path, at: str, bbox: list, width: int, height: int) -> None:
    """Positive size and inside the image (one pixel of slack for COCO's rounding)."""
    require_finite(bbox, file=path, at=at, field="bbox")
    if width <= 0 or height <= 0:
        raise DataFormatError(path, at, "width" if width <= 0 else "height",
                              f"image size must be positive, got {width}x{height}")
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        raise DataFormatError(path, at, "bbox", f"width and height must be positive, got {bbox}")
    if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
        raise DataFormatError(path, at, "bbox", f"box {bbox} lies outside the {width}x{height} image")


def read_refcoco(path: PathLike, image_root: PathLike, check_images: bool = True,
                 on_error: OnError = None) -> list[RefRecord]:
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataFormatError(path, None, None, "expected a JSON list of records")
    records = []
    for index, item in enumerate(data):
        try:
            ref_id = require(item, "ref_id", int, file=path, at=where(index))
            at = where(index, ref_id, "ref_id")
            image = require(item, "image", str, file=path, at=at)
            sentences = require_list_of(item, "sentences", str, file=path, at=at, min_length=1)
            for k, sentence in enumerate(sentences):
                if not sentence.strip():
                    raise DataFormatError(path, at, f"sentences[{k}]", "empty sentence")
            bbox = require_list_of(item, "bbox", (int, float), file=path, at=at, length=4)
            width = require(item, "width", int, file=path, at=at)
            height = require(item, "height", int, file=path, at=at)
            _check_box(path, at, bbox, width, height)
            image_path = resolve_under(image_root, image, file=path, at=at, field="image", must_exist=check_images)
        except DataFormatError as err:
            skip_or_raise(err, on_error)
            continue
        records.append(RefRecord(ref_id, image, sentences, bbox, width, height, image_path))
    return records


def convert_refcoco(refs: list, instances: dict) -> list[RefRecord]:
    """Join the real RefCOCO refs (already unpickled) with COCO instances into our records.

    Load ``refs(unc).p`` yourself with ``pickle.load`` only if you trust the file: unpickling
    runs code. The image name comes from instances.json, because the pickle's ``file_name``
    carries an extra ``_{ann_id}`` suffix that is not a real file.
    """
    images = {img["id"]: img for img in instances["images"]}
    boxes = {ann["id"]: ann["bbox"] for ann in instances["annotations"]}
    records = []
    for ref in refs:
        image = images[ref["image_id"]]
        records.append(RefRecord(
            ref_id=ref["ref_id"],
            image=image["file_name"],
            sentences=[s["sent"] for s in ref["sentences"]],
            bbox=list(boxes[ref["ann_id"]]),
            width=image["width"],
            height=image["height"],
        ))
    return records
