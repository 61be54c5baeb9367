"""Boxes as text: MiniGPT-v2's `{<x1><y1><x2><y2>}` with integers 0..100 (the box divided by the
image size), read from answers, mapped to pixels and drawn.

The one implementation: `data.world` re-exports these, so training texts and answers read back the
same way. A pixel box is (x1, y1, x2, y2) with x2/y2 exclusive. Several boxes of one phrase are
joined with `<delim>` (`{<..>}<delim>{<..>}`); a phrase may precede them as `<p>phrase</p>`.

A model's answer can be cut off or garbled, so every `{<` in a text must open a well-formed box:
anything else raises `BoxFormatError`, naming the text and what was expected, instead of being
silently skipped (pass `strict=False` to skip it, e.g. to draw what can be drawn).
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Optional, Sequence

EXPECTED = "'{<x1><y1><x2><y2>}' with four integers 0..100, x1 <= x2 and y1 <= y2"

_BOX = re.compile(r"\{<(\d{1,3})><(\d{1,3})><(\d{1,3})><(\d{1,3})>\}")
_OPEN = re.compile(r"\{\s*<")  # every box attempt starts like this
_PHRASE = re.compile(r"<p>(.*?)</p>", re.DOTALL)
_DELIM = "<delim>"


class BoxFormatError(ValueError):
    """A box in a text is malformed (or absent where one is needed); the message quotes the text."""


@dataclass(frozen=True)
class TextBox:
    """One box found in a text: its 0..100 values, the phrase it belongs to (if any), where it stood."""

    box: tuple[int, int, int, int]
    label: Optional[str]
    span: tuple[int, int]


def _short(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _attempt_end(text: str, start: int) -> int:
    """End of the box attempt opened at `start`: after its '}', or where the next '{' or the text begins/ends."""
    close = text.find("}", start)
    nxt = text.find("{", start + 1)
    if close == -1:
        return len(text) if nxt == -1 else nxt
    return close + 1 if nxt == -1 or close < nxt else nxt


def find_boxes(text: str, strict: bool = True) -> list[TextBox]:
    """Every box in `text`, in order, with the `<p>phrase</p>` it follows (boxes joined by <delim> share it)."""
    if not isinstance(text, str):
        raise TypeError(f"expected the answer text as a str, got {type(text).__name__}")
    found: list[TextBox] = []
    label: Optional[str] = None
    prev_end = 0
    for opening in _OPEN.finditer(text):
        start = opening.start()
        if start < prev_end:  # inside a box already read
            continue
        end = _attempt_end(text, start)
        m = _BOX.fullmatch(text, start, end)
        problem = None
        if m is None:
            problem = f"malformed box {text[start:end]!r}"
        else:
            values = tuple(int(v) for v in m.groups())
            if max(values) > 100:
                problem = f"box {m.group(0)} has a value above 100"
            elif values[0] > values[2] or values[1] > values[3]:
                problem = f"box {m.group(0)} has x1 > x2 or y1 > y2"
        if problem is not None:
            if strict:
                raise BoxFormatError(f"{problem} in {_short(text)}: expected {EXPECTED}")
            prev_end = end
            continue
        between = text[prev_end:start]
        phrases = _PHRASE.findall(between)
        if phrases:
            label = phrases[-1].strip()
        elif not (found and between.strip() in ("", _DELIM)):
            label = None  # a box not attached to a phrase (a [refer] answer, a new sentence)
        found.append(TextBox(values, label, (start, end)))
        prev_end = end
    return found


def parse_boxes(text: str, strict: bool = True) -> list[tuple[int, int, int, int]]:
    """All `{<x1><y1><x2><y2>}` boxes in a text as 0..100 integers; malformed ones raise BoxFormatError."""
    return [b.box for b in find_boxes(text, strict)]


def to_hundred(bbox: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel box -> 0..100 integers (rounded half up, clamped), as the training texts were written."""
    _check_size(width, height)
    x1, y1, x2, y2 = bbox
    scaled = (x1 / width, y1 / height, x2 / width, y2 / height)
    return tuple(min(100, max(0, int(v * 100 + 0.5))) for v in scaled)


def to_pixels(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """0..100 box -> pixels (floats): within half a step (size / 200) of the box it came from."""
    _check_size(width, height)
    x1, y1, x2, y2 = box
    return (x1 * width / 100, y1 * height / 100, x2 * width / 100, y2 * height / 100)


def box_to_text(bbox: Sequence[float], width: int, height: int) -> str:
    """Pixel box -> '{<x1><y1><x2><y2>}' with integers 0..100 (MiniGPT-v2's box format)."""
    return "{" + "".join(f"<{v}>" for v in to_hundred(bbox, width, height)) + "}"


def box_from_text(text: str, width: int, height: int) -> tuple[float, float, float, float]:
    """The first box in a text, in pixels; BoxFormatError when there is none or one is malformed."""
    boxes = parse_boxes(text)
    if not boxes:
        raise BoxFormatError(f"no box in {_short(text)}: expected {EXPECTED}")
    return to_pixels(boxes[0], width, height)


def boxes_in_pixels(text: str, width: int, height: int, strict: bool = False) -> list[tuple[Optional[str], tuple]]:
    """(label, pixel box) for each box of an answer; lenient by default, for drawing what can be drawn."""
    return [(b.label, to_pixels(b.box, width, height)) for b in find_boxes(text, strict)]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _check_size(width, height) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width} x {height}")


# --------------------------------------------------------------------------- drawing

_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


def draw_boxes(image, boxes: Sequence, labels: Optional[Sequence[Optional[str]]] = None, *,
               pixels: bool = True, ax=None):
    """Draw boxes (pixels, or 0..100 with pixels=False) with their labels on a PIL image.

    Returns the matplotlib Figure. Built on `matplotlib.figure.Figure` (not pyplot), so it works
    without a display and leaves no figure open behind.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    w, h = image.size
    if labels is not None and len(labels) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
    if ax is None:
        fig = Figure(figsize=(5, 5 * h / w), dpi=100)
        ax = fig.add_axes((0, 0, 1, 1))
    else:
        fig = ax.figure
    ax.imshow(image)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    for k, box in enumerate(boxes):
        x1, y1, x2, y2 = box if pixels else to_pixels(box, w, h)
        colour = _COLOURS[k % len(_COLOURS)]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2))
        label = labels[k] if labels is not None else None
        if label:
            ax.text(x1 + 2, y1 + 2, label, color="white", fontsize=9, va="top",
                    bbox={"facecolor": colour, "alpha": 0.8, "pad": 1.5, "edgecolor": "none"})
    return fig


def draw_answer(image, answer: str, *, label: Optional[str] = None):
    """The image with every well-formed box of an answer drawn; None if it has no box.

    Each box is labelled with its `<p>phrase</p>`, else `label` (e.g. the [refer] question), else 'box k'.
    """
    found = boxes_in_pixels(answer, *image.size)
    if not found:
        return None
    labels = [phrase or label or f"box {k + 1}" for k, (phrase, _) in enumerate(found)]
    return draw_boxes(image, [b for _, b in found], labels)


def figure_png(fig) -> bytes:
    """A Figure as PNG bytes (for a widget, or a file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
