"""Shared pieces of every reader and writer: the error type, field checks, safe paths, JSON.

Why one error type: a learner pointing a reader at a 100k-record file needs to know *which*
file, *which* record and *which* field is wrong, not a bare KeyError from deep inside a loop.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from PIL import Image

PathLike = Union[str, Path]

# A reader given `on_error` calls it with each bad record's DataFormatError and goes on with the next
# record (training with skip_bad_samples counts them); without it, the first bad record raises.
OnError = Optional[Callable[["DataFormatError"], None]]


class DataFormatError(ValueError):
    """A file or record that does not follow its format. Names the file, record and field."""

    def __init__(self, file: PathLike, record: Optional[str] = None, field: Optional[str] = None,
                 problem: Optional[str] = None):
        self.file = str(file)
        self.record = record
        self.field = field
        self.problem = problem
        if problem is None:  # a ready-made message, e.g. re-raised from a DataLoader worker
            super().__init__(self.file)
            return
        where = [self.file]
        if record is not None:
            where.append(record)
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(": ".join(where) + ": " + problem)

    def __reduce__(self):
        """Pickle with all four parts, so the error survives a trip through worker processes."""
        return (type(self), (self.file, self.record, self.field, self.problem))


def where(index: int, ident: Any = None, id_name: str = "id") -> str:
    """'record 3' or 'record 3 (question_id 17)': how errors point at a record."""
    if ident is None:
        return f"record {index}"
    return f"record {index} ({id_name} {ident!r})"


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}


def _is(value: Any, expected) -> bool:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in kinds:
        return False  # JSON true is not the integer 1
    return isinstance(value, kinds)


def _type_name(expected) -> str:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)


def require(record: Any, key: str, expected, *, file: PathLike, at: str, field_prefix: str = ""):
    """record[key], checked to exist and to have the expected type(s); else DataFormatError."""
    name = field_prefix + key
    if not isinstance(record, dict):
        raise DataFormatError(file, at, field_prefix.rstrip(".") or None,
                              f"expected an object, got {type(record).__name__}")
    if key not in record:
        raise DataFormatError(file, at, name, "missing")
    value = record[key]
    if not _is(value, expected):
        raise DataFormatError(file, at, name,
                              f"expected {_type_name(expected)}, got {type(value).__name__} {value!r:.60}")
    return value


def require_text(record: Any, key: str, *, file: PathLike, at: str, field_prefix: str = "",
                 what: str = "text") -> str:
    """A string field that must hold some text (answers, captions): empty or blank is an error."""
    value = require(record, key, str, file=file, at=at, field_prefix=field_prefix)
    if not value.strip():
        raise DataFormatError(file, at, field_prefix + key, f"empty {what}")
    return value


def require_finite(values: list, *, file: PathLike, at: str, field: str) -> list:
    """Numbers that must be finite (Python's json reads NaN and Infinity)."""
    for k, v in enumerate(values):
        if not math.isfinite(v):
            raise DataFormatError(file, at, f"{field}[{k}]", f"expected a finite number, got {v!r}")
    return values


def skip_or_raise(err: "DataFormatError", on_error: OnError) -> None:
    """Raise err, or (with on_error) report it so the reader can go on with the next record."""
    if on_error is None:
        raise err
    on_error(err)


def require_list_of(record: Any, key: str, item_type, *, file: PathLike, at: str,
                    length: Optional[int] = None, min_length: int = 0) -> list:
    """A list field whose items all have one type, optionally of a fixed or minimum length."""
    values = require(record, key, list, file=file, at=at)
    if length is not None and len(values) != length:
        raise DataFormatError(file, at, key, f"expected {length} items, got {len(values)}")
    if len(values) < min_length:
        raise DataFormatError(file, at, key, f"expected at least {min_length} items, got {len(values)}")
    for k, value in enumerate(values):
        if not _is(value, item_type):
            raise DataFormatError(file, at, f"{key}[{k}]",
                                  f"expected {_type_name(item_type)}, got {type(value).__name__}")
    return values


def require_flag(record: Any, key: str, *, file: PathLike, at: str) -> int:
    """An integer field that must be 0 or 1 (labels, answerable)."""
    value = require(record, key, int, file=file, at=at)
    if value not in (0, 1):
        raise DataFormatError(file, at, key, f"expected 0 or 1, got {value}")
    return value


def resolve_under(root: PathLike, relative: Any, *, file: PathLike, at: str, field: str,
                  must_exist: bool = True) -> Path:
    """root/relative as an absolute path, refusing anything that leaves root.

    Why: annotation files come from the internet; an entry like '../../home/me/.ssh/id_rsa' or
    '/etc/passwd' must not turn a data loader into a file reader. Symbolic links are resolved
    first, so a link pointing out of the root is refused too.
    """
    if not isinstance(relative, str) or not relative:
        raise DataFormatError(file, at, field, f"expected a relative path, got {relative!r}")
    if relative.startswith(("/", "\\")) or Path(relative).is_absolute():
        raise DataFormatError(file, at, field, f"absolute path {relative!r} is not allowed")
    try:
        base = Path(root).resolve()
        target = (base / relative).resolve()
    except (OSError, ValueError) as err:  # e.g. a NUL byte in the name, or a symlink loop
        raise DataFormatError(file, at, field, f"unusable path {relative!r}: {err}") from None
    if target != base and base not in target.parents:
        raise DataFormatError(file, at, field, f"path {relative!r} escapes the data root {str(base)!r}")
    if must_exist and not target.is_file():
        raise DataFormatError(file, at, field, f"image file not found: {str(target)!r}")
    return target


# --------------------------------------------------------------------------- JSON files


def read_json(path: PathLike) -> Any:
    """Parse a JSON file; a syntax error becomes a DataFormatError naming the file and line."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DataFormatError(path, None, None, f"invalid JSON at line {err.lineno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise DataFormatError(path, None, None, f"not UTF-8 text: byte {err.object[err.start:err.start + 1]!r} "
                                                f"at offset {err.start} ({err.reason})") from None


def iter_jsonl(path: PathLike, on_error: OnError = None) -> Iterator[tuple[int, Any]]:
    """(line index, parsed object) for every non-empty line of a JSON-lines file.

    A line that is not JSON (or not UTF-8) raises, or with `on_error` is reported and passed over.
    """
    path = Path(path)
    with open(path, "rb") as f:
        for index, raw in enumerate(f):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                skip_or_raise(DataFormatError(path, f"line {index + 1}", None,
                                              f"not UTF-8 text: byte {raw[err.start:err.start + 1]!r} at column "
                                              f"{err.start + 1} ({err.reason})"), on_error)
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                skip_or_raise(DataFormatError(path, f"line {index + 1}", None, f"invalid JSON: {err.msg}"), on_error)
                continue
            yield index, item


def dumps(obj: Any, indent: Optional[int] = 1) -> str:
    """Deterministic JSON: sorted keys, fixed separators, real UTF-8 characters."""
    separators = (",", ": ") if indent is not None else (",", ":")
    return json.dumps(obj, sort_keys=True, indent=indent, ensure_ascii=False, separators=separators)


def write_json(path: PathLike, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(obj) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: PathLike, records: list) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(dumps(r, indent=None) + "\n" for r in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- images

JPEG_QUALITY = 90


def encode_image(image: Image.Image, fmt: str) -> bytes:
    """Encode without metadata (no EXIF, no timestamps) so the same pixels give the same bytes."""
    buffer = io.BytesIO()
    fmt = fmt.lower()
    if fmt in ("jpg", "jpeg"):
        image.convert("RGB").save(buffer, "JPEG", quality=JPEG_QUALITY, subsampling=2,
                                  optimize=False, progressive=False)
    elif fmt == "png":
        image.save(buffer, "PNG", compress_level=9)
    else:
        raise ValueError(f"unsupported image format {fmt!r} (use jpg or png)")
    return buffer.getvalue()


def save_image(image: Image.Image, path: PathLike) -> Path:
    """Save as JPEG or PNG according to the suffix, deterministically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_image(image, path.suffix.lstrip(".")))
    return path


def open_image(source: Union[bytes, PathLike]) -> Image.Image:
    """Decode image bytes or a file into an RGB PIL image: the project's one image loader
    (`tinygptv_lib.data.images.load_image`: EXIF orientation applied, alpha on white, bad files
    refused with an `ImageLoadError` naming the file and the reason)."""
    from ..images import load_image

    return load_image(source)
