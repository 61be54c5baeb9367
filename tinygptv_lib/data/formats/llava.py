"""LLaVA-style conversation JSON (stage 3/4 chat data: LLaVA-Instruct, multi-task conversations).

    [{"id": "000000033471", "image": "000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"},
                        {"from": "gpt", "value": "..."}, ...]}, ...]

Image paths are relative to an image root given to the reader (for LLaVA: COCO train2017).
Text-only records (no "image" key) are allowed, as in LLaVA's mixtures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from ._common import (DataFormatError, OnError, PathLike, read_json, require, resolve_under, skip_or_raise, where,
                      write_json)

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")


@dataclass(frozen=True)
class ConversationRecord:
    """One chat: alternating human/gpt turns, the first human turn holding '<image>'."""

    id: str
    image: Optional[str]
    conversations: list
    image_path: Optional[Path] = field(default=None, compare=False)


def write_llava(path: PathLike, records: Iterable[ConversationRecord]) -> Path:
    items = []
    for r in records:
        item = {"id": r.id, "conversations": [{"from": t["from"], "value": t["value"]} for t in r.conversations]}
        if r.image is not None:
            item["image"] = r.image
        items.append(item)
    return write_json(path, items)


def _check_turns(path: Path, at: str, turns: list, has_image: bool) -> None:
    """Roles alternate human, gpt, ...; only the first human turn carries the image token."""
    if not turns:
        raise DataFormatError(path, at, "conversations", "empty conversation")
    if len(turns) % 2:
        raise DataFormatError(path, at, f"conversations[{len(turns) - 1}]",
                              "the conversation ends with a question that has no answer")
    for k, turn in enumerate(turns):
        prefix = f"conversations[{k}]."
        role = require(turn, "from", str, file=path, at=at, field_prefix=prefix)
        value = require(turn, "value", str, file=path, at=at, field_prefix=prefix)
        if role != ROLES[k % 2]:
            raise DataFormatError(path, at, prefix + "from", f"expected {ROLES[k % 2]!r}, got {role!r}")
        if role == "gpt" and not value.strip():
            raise DataFormatError(path, at, prefix + "value", "empty answer")
        tokens = value.count(IMAGE_TOKEN)
        wanted = 1 if (k == 0 and has_image) else 0
        if tokens != wanted:
            raise DataFormatError(path, at, prefix + "value",
                                  f"expected {wanted} '{IMAGE_TOKEN}' token(s), found {tokens}")


def read_llava(path: PathLike, image_root: Optional[PathLike] = None,
               check_images: bool = True, on_error: OnError = None) -> list[ConversationRecord]:
    """Read a LLaVA JSON list; images resolve under image_root (default: the file's folder).

    A conversation must end with the assistant ('gpt'), so every question has its answer."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    data = read_json(path)
    if not isinstance(data, list):
        raise DataFormatError(path, None, None, "expected a JSON list of records")
    records = []
    for index, item in enumerate(data):
        try:
            ident = require(item, "id", (str, int), file=path, at=where(index))
            at = where(index, ident)
            image = item.get("image")
            image_path = None
            if image is not None:
                image = require(item, "image", str, file=path, at=at)
                image_path = resolve_under(root, image, file=path, at=at, field="image", must_exist=check_images)
            turns = require(item, "conversations", list, file=path, at=at)
            _check_turns(path, at, turns, image is not None)
        except DataFormatError as err:
            skip_or_raise(err, on_error)
            continue
        records.append(ConversationRecord(ident, image, [dict(t) for t in turns], image_path))
    return records
