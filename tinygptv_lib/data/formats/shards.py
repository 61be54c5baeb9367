"""webdataset ``.tar`` shards of image-caption pairs (stages 1-2: LAION, CC3M, SBU).

img2dataset writes each pair as consecutive tar members sharing a key: ``{key}.jpg``,
``{key}.txt`` (the caption, UTF-8) and ``{key}.json`` (metadata). We read and write that layout
with the standard library's ``tarfile``: no webdataset dependency, and the same reader works on
the shipped samples and on real LAION shards.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Optional, Union

from PIL import Image

from ._common import DataFormatError, OnError, PathLike, dumps, open_image, skip_or_raise

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class ShardSample(NamedTuple):
    """One pair from a shard. ``image`` is the encoded file (decode with ``sample.decode()``)."""

    key: str
    image: bytes
    caption: str
    meta: Optional[dict] = None

    def decode(self) -> Image.Image:
        return open_image(self.image)


def _image_extension(data: bytes) -> str:
    """Pick the member suffix from the file's magic bytes, as img2dataset names them."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise ValueError("image bytes are neither JPEG, PNG nor WebP")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one member with fixed metadata, so the same samples give the same tar bytes."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: PathLike, samples: Iterable[ShardSample]) -> int:
    """Write samples to one tar shard (members in the given order). Returns the sample count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            if "." in sample.key or "/" in sample.key:
                raise ValueError(f"shard key {sample.key!r} may not contain '.' or '/'")
            _add(tar, f"{sample.key}.{_image_extension(sample.image)}", sample.image)
            _add(tar, f"{sample.key}.txt", sample.caption.encode("utf-8"))
            if sample.meta is not None:
                _add(tar, f"{sample.key}.json", dumps(sample.meta, indent=None).encode("utf-8"))
            count += 1
    return count


def _split_name(name: str) -> tuple[str, str]:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'): webdataset splits at the first dot of the basename."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _finish(path: Path, index: int, key: str, members: dict) -> ShardSample:
    """Turn one key's members into a sample, or explain which member is missing or bad."""
    at = f"sample {index} (key {key!r})"
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if image_ext is None:
        raise DataFormatError(path, at, "jpg", f"no image member ({', '.join(IMAGE_EXTENSIONS)})")
    if "txt" not in members:
        raise DataFormatError(path, at, "txt", "no caption member")
    try:
        caption = members["txt"].decode("utf-8")
    except UnicodeDecodeError:
        raise DataFormatError(path, at, "txt", "caption is not UTF-8") from None
    if not caption.strip():
        raise DataFormatError(path, at, "txt", "empty caption")
    meta = None
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError:
            raise DataFormatError(path, at, "json", "metadata is not valid JSON") from None
        if not isinstance(meta, dict):
            raise DataFormatError(path, at, "json", "metadata must be a JSON object")
    return ShardSample(key, members[image_ext], caption, meta)


def read_shard(path: PathLike, on_error: OnError = None) -> Iterator[ShardSample]:
    """Stream the samples of one shard in order. Members of one key must be consecutive.

    on_error: report a bad sample (or an unreadable shard) through it and go on; default: raise.
    """
    path = Path(path)
    try:
        tar = tarfile.open(path, "r")
    except tarfile.TarError as err:
        skip_or_raise(DataFormatError(path, None, None, f"not a readable tar file: {err}"), on_error)
        return
    seen: set[str] = set()
    key, members, index = None, {}, 0

    def finish():
        if members is None:  # a key seen before: reported already, left out
            return None
        try:
            return _finish(path, index, key, members)
        except DataFormatError as err:
            skip_or_raise(err, on_error)
            return None

    with tar:
        try:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_name(member.name)
                if member_key != key:
                    if key is not None:
                        sample = finish()
                        if sample is not None:
                            yield sample
                        index += 1
                    key, members = member_key, {}
                    if member_key in seen:
                        skip_or_raise(DataFormatError(path, f"sample {index} (key {member_key!r})", ext,
                                                      "members of this key are not consecutive"), on_error)
                        members = None
                    seen.add(member_key)
                if members is not None:
                    members[ext] = tar.extractfile(member).read()
        except tarfile.TarError as err:  # damaged past its header
            skip_or_raise(DataFormatError(path, f"sample {index}", None, f"damaged tar file: {err}"), on_error)
            return
        if key is not None:
            sample = finish()
            if sample is not None:
                yield sample


def list_shards(folder: PathLike) -> list[Path]:
    """All ``*.tar`` files in a folder, in name order (the order img2dataset numbered them)."""
    shards = sorted(Path(folder).glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no .tar shards in {folder}")
    return shards


def read_shards(source: Union[PathLike, Iterable[PathLike]], on_error: OnError = None) -> Iterator[ShardSample]:
    """Samples of a folder of shards (or of a list of shard paths), shard after shard."""
    paths = list_shards(source) if isinstance(source, (str, Path)) and Path(source).is_dir() else (
        [Path(source)] if isinstance(source, (str, Path)) else [Path(p) for p in source])
    for path in paths:
        yield from read_shard(path, on_error)
