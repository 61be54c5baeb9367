"""A procedural "shapes world": small scenes of coloured shapes with exact ground truth.

Why this exists: TinyGPT-V is trained on millions of web images and evaluated on five public
benchmarks. A course cannot ship those, but it can ship a world where every caption, question,
box and label is *known* to be true because we drew the picture ourselves. Each text below is a
pure function of the scene, and each scene is a pure function of an integer seed, so the same
seed always gives the same pixels and the same words.

Coordinates: a box is ``(x1, y1, x2, y2)`` in pixels with ``x2``/``y2`` exclusive (one past the
last drawn pixel), so ``x2 - x1`` is the width. Box *text* (the stage-4 format) is
``{<x1><y1><x2><y2>}`` with integers 0..100, the box divided by the image size.
"""
from __future__ import annotations

import functools
import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Optional

from PIL import Image, ImageChops, ImageDraw, ImageFont

# Box text (box_to_text, parse_boxes, box_from_text, iou) has one implementation, shared by training
# texts, answers and evaluation: tinygptv_lib/infer/boxes.py. Re-exported here.
from ..infer.boxes import BoxFormatError, box_from_text, box_to_text, iou, parse_boxes  # noqa: F401

# --------------------------------------------------------------------------- vocabulary

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")

# Object colours: far apart in RGB so that the name is never in doubt.
COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (250, 210, 30),
    "orange": (255, 127, 14),
    "purple": (148, 60, 189),
    "white": (250, 250, 250),
    "black": (25, 25, 25),
}

# Backgrounds: pale, and none of them is an object colour, so "the red one" is never the floor.
BACKGROUNDS = {
    "grey": (150, 150, 150),
    "beige": (225, 212, 180),
    "light blue": (175, 210, 240),
    "pink": (245, 195, 210),
    "mint": (195, 235, 210),
}

# Side of the (square) bounding box as a fraction of the image side.
SIZES = {"small": (0.13, 0.17), "large": (0.25, 0.31)}

# Words written on ordinary scenes for reading questions: short, harmless, and never a shape
# or colour name, so that reading and recognising cannot be confused.
WORDS = (
    "sun", "cat", "tree", "boat", "moon", "fish", "kite", "bird", "cake", "lamp",
    "rain", "leaf", "door", "frog", "hat", "milk", "rose", "snow", "wave", "book",
)

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six")

TEXT_PROBABILITY = 0.3     # share of ordinary scenes that carry a written word
DUPLICATE_PROBABILITY = 0.3  # chance that a new object copies an earlier one's kind and colour
OVERLAP_PROBABILITY = 0.2  # chance that a new object is placed overlapping an earlier one
MAX_OVERLAP = 0.3          # an overlap may cover at most this share of the smaller box
CLEAR = 0.12               # a spatial difference counts only if it exceeds this share of the side
TEXT_COLOUR = "black"

Box = tuple[int, int, int, int]


# --------------------------------------------------------------------------- seeds


def derive_seed(*parts) -> int:
    """Mix any parts (ints, strings) into one 63-bit seed.

    Why: ``hash()`` of a string changes from run to run, and ``seed + index`` makes neighbouring
    streams overlap; a cryptographic hash gives stable, independent streams for
    ``(seed, "train", 17)`` and ``(seed, "eval/vsr", 17)``.
    """
    text = "/".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def _rng(scene: "Scene", purpose: str) -> random.Random:
    """A private random stream per (scene, text kind): texts never depend on call order."""
    return random.Random(derive_seed(scene.seed, purpose))


# --------------------------------------------------------------------------- data classes


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape and everything true about it."""

    kind: str
    colour: str
    size: str
    bbox: Box

    @property
    def centre(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.bbox
        return (x1 + x2) / 2, (y1 + y2) / 2

    @property
    def name(self) -> str:
        """'red circle': the colour and kind, the usual way to talk about an object."""
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class SceneText:
    """Text rendered on the image (a word, or a meme claim), with where it was drawn."""

    text: str
    bbox: Box
    colour: str = TEXT_COLOUR


@dataclass
class Scene:
    """A generated picture with its ground truth. ``image`` is the rendered RGB picture."""

    seed: int
    width: int
    height: int
    background: str
    objects: list[SceneObject]
    text: Optional[SceneText] = None
    image: Optional[Image.Image] = field(default=None, repr=False, compare=False)
    _overlaps: Optional[frozenset] = field(default=None, repr=False, compare=False)

    def ground_truth(self) -> dict:
        """JSON-ready description of the scene (everything except the pixels)."""
        return {
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
            "background": self.background,
            "objects": [
                {"kind": o.kind, "colour": o.colour, "size": o.size, "bbox": list(o.bbox)}
                for o in self.objects
            ],
            "text": None if self.text is None else {
                "text": self.text.text, "bbox": list(self.text.bbox), "colour": self.text.colour},
        }

    def overlaps(self, i: int, j: int) -> bool:
        """True when shapes i and j share drawn pixels (not just bounding-box corners)."""
        if self._overlaps is None:
            self._overlaps = _overlapping_pairs(self)
        return (min(i, j), max(i, j)) in self._overlaps


# --------------------------------------------------------------------------- layout


def _text_band(rng: random.Random, size: int) -> Box:
    """Reserve a strip at the top or bottom for writing, like the caption of a meme."""
    height = 11 * max(1, size // 112) + 8
    if rng.random() < 0.5:
        return (0, 0, size, height)
    return (0, size - height, size, size)


def _intersection(a: Box, b: Box) -> int:
    """Area shared by two boxes (0 when they are apart)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0, w) * max(0, h)


def _area(box: Box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def _acceptable(box: Box, others: list[Box], want_overlap: bool, gap: int) -> bool:
    """Apart from every other box by ``gap`` pixels, except (if wanted) a small overlap."""
    touched = False
    for other in others:
        grown = (box[0] - gap, box[1] - gap, box[2] + gap, box[3] + gap)
        if _intersection(grown, other) == 0:
            continue
        shared = _intersection(box, other)
        if not want_overlap or shared == 0 or shared > MAX_OVERLAP * min(_area(box), _area(other)):
            return False
        touched = True
    return touched or not want_overlap


def _find_box(rng, size, top, bottom, size_name, others, want_overlap):
    """Try random positions; fall back to a small shape, then to no overlap. None if full."""
    margin = max(2, size // 50)
    names = (size_name, "small") if size_name == "large" else (size_name,)
    for name in names:
        lo, hi = SIZES[name]
        side = max(4, round(rng.uniform(lo, hi) * size))
        if bottom - top - 2 * margin < side:
            continue
        for _ in range(60):
            x1 = rng.randint(margin, size - margin - side)
            y1 = rng.randint(top + margin, bottom - margin - side)
            box = (x1, y1, x1 + side, y1 + side)
            if _acceptable(box, others, want_overlap, gap=margin):
                return name, box
    if want_overlap:
        return _find_box(rng, size, top, bottom, size_name, others, False)
    return None


def _place_objects(rng: random.Random, size: int, n: int, band: Optional[Box]) -> list[SceneObject]:
    """Choose kind, colour, size and box for n objects, keeping the text band free."""
    top, bottom = 0, size
    if band is not None:
        if band[1] == 0:
            top = band[3]
        else:
            bottom = band[1]
    objects: list[SceneObject] = []
    for _ in range(n + 5):  # a few spare tries in case a crowded scene rejects an object
        if len(objects) == n:
            break
        if objects and rng.random() < DUPLICATE_PROBABILITY:
            model = rng.choice(objects)
            kind, colour = model.kind, model.colour
        else:
            kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        size_name = rng.choice(list(SIZES))
        want_overlap = bool(objects) and rng.random() < OVERLAP_PROBABILITY
        placed = _find_box(rng, size, top, bottom, size_name, [o.bbox for o in objects], want_overlap)
        if placed is not None:
            objects.append(SceneObject(kind, colour, placed[0], placed[1]))
    return objects


def _random_word(objects: list[SceneObject], rng: random.Random) -> str:
    return rng.choice(WORDS)


def make_scene(
    seed: int,
    size: int = 224,
    *,
    with_text: Optional[bool] = None,
    text_fn: Optional[Callable[[list[SceneObject], random.Random], str]] = None,
    n_objects: Optional[int] = None,
) -> Scene:
    """Build and render one scene. Same arguments, same scene, same pixels.

    ``with_text``: None lets the seed decide (30 %), True/False forces it.
    ``text_fn(objects, rng)`` chooses what to write once the shapes are known (default: a word);
    the meme benchmark uses it to write a claim about the shapes.
    """
    if size < 32:
        raise ValueError(f"image size {size} is too small (at least 32 pixels)")
    rng = random.Random(seed)
    background = rng.choice(list(BACKGROUNDS))
    if with_text is None:
        with_text = rng.random() < TEXT_PROBABILITY
    band = _text_band(rng, size) if with_text else None
    n = n_objects if n_objects is not None else rng.randint(2, 5)
    objects = _place_objects(rng, size, n, band)
    text = None
    if band is not None:
        words = (text_fn or _random_word)(objects, rng)
        text = _place_text(rng, words, band, size)
    scene = Scene(seed, size, size, background, objects, text)
    scene.image = render(scene)
    return scene


# --------------------------------------------------------------------------- drawing


def _star_points(points: int = 5, inner: float = 0.42) -> list[tuple[float, float]]:
    """Corners of a star pointing up, alternating outer radius 1 and inner radius ``inner``."""
    corners = []
    for k in range(2 * points):
        radius = 1.0 if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / points
        corners.append((radius * math.cos(angle), radius * math.sin(angle)))
    return corners


def _hexagon_points() -> list[tuple[float, float]]:
    """Corners of a regular hexagon with flat top and bottom."""
    return [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]


def _unit(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Stretch a polygon to touch all four sides of the unit square, so the box is tight."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return tuple(((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys)))
                 for x, y in points)


# Polygons in the unit square; circles and squares use PIL's own primitives.
_POLYGONS = {
    "triangle": ((0.5, 0.0), (1.0, 1.0), (0.0, 1.0)),
    "diamond": ((0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)),
    "star": _unit(_star_points()),
    "hexagon": _unit(_hexagon_points()),
}


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, bbox: Box, fill, outline) -> None:
    """Draw one shape filling its box; the last pixel drawn is x2-1, y2-1."""
    x1, y1, x2, y2 = bbox
    corners = [x1, y1, x2 - 1, y2 - 1]
    if kind == "circle":
        draw.ellipse(corners, fill=fill, outline=outline)
    elif kind == "square":
        draw.rectangle(corners, fill=fill, outline=outline)
    else:
        w, h = x2 - 1 - x1, y2 - 1 - y1
        points = [(x1 + u * w, y1 + v * h) for u, v in _POLYGONS[kind]]
        draw.polygon(points, fill=fill, outline=outline)


def _darker(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(c * 0.6) for c in rgb)


@functools.lru_cache(maxsize=1)
def _bitmap_font():
    """PIL's built-in bitmap font: no FreeType, so the same pixels on every machine."""
    loader = getattr(ImageFont, "load_default_imagefont", None)  # Pillow >= 10.1
    return loader() if loader is not None else ImageFont.load_default()


def _text_extent(text: str) -> tuple[int, int]:
    left, top, right, bottom = _bitmap_font().getbbox(text)
    return max(1, right), max(1, bottom)


def _place_text(rng: random.Random, text: str, band: Box, size: int) -> SceneText:
    """Scale the bitmap text 2x at 224 px (1x if it would not fit) and centre it in the band.

    On very small images a long text is shrunk below 1x to fit: blurry, but inside the picture.
    """
    w, h = _text_extent(text)
    scale = max(1, min(size // 112, (size - 8) // w))
    tw, th = w * scale, h * scale
    if tw > size - 8:
        tw, th = size - 8, max(1, round(h * (size - 8) / w))
    slack = max(0, size - 8 - tw)
    x1 = 4 + rng.randint(0, slack)
    y1 = band[1] + (band[3] - band[1] - th) // 2
    return SceneText(text, (x1, y1, x1 + tw, y1 + th))


def _draw_text(image: Image.Image, text: SceneText) -> None:
    w, h = _text_extent(text.text)
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).text((0, 0), text.text, fill=255, font=_bitmap_font())
    x1, y1, x2, y2 = text.bbox
    shrink = (x2 - x1) < w  # whole-pixel upscaling stays crisp; shrinking averages
    mask = mask.resize((x2 - x1, y2 - y1), Image.BOX if shrink else Image.NEAREST)
    image.paste(COLOURS[text.colour], (x1, y1, x2, y2), mask)


def render(scene: Scene) -> Image.Image:
    """Draw the scene: background, shapes in order (later ones on top), then the text."""
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        rgb = COLOURS[obj.colour]
        _draw_shape(draw, obj.kind, obj.bbox, rgb, _darker(rgb))
    if scene.text is not None:
        _draw_text(image, scene.text)
    return image


def _mask(scene: Scene, obj: SceneObject) -> Image.Image:
    mask = Image.new("1", (scene.width, scene.height), 0)
    _draw_shape(ImageDraw.Draw(mask), obj.kind, obj.bbox, 1, 1)
    return mask


def _overlapping_pairs(scene: Scene) -> frozenset:
    """Pairs (i, j), i < j, whose drawn pixels meet. Boxes first: most pairs are far apart."""
    pairs = set()
    objs = scene.objects
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            if _intersection(objs[i].bbox, objs[j].bbox) == 0:
                continue
            both = ImageChops.logical_and(_mask(scene, objs[i]), _mask(scene, objs[j]))
            if both.getbbox() is not None:
                pairs.add((i, j))
    return frozenset(pairs)


# --------------------------------------------------------------------------- language helpers


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def count_phrase(n: int, noun: str) -> str:
    """(2, 'red circle') -> 'two red circles'; (1, 'orange star') -> 'an orange star'."""
    if n == 1:
        return f"{article(noun)} {noun}"
    return f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} {noun}s"


def join_words(parts: list[str]) -> str:
    """['a', 'b', 'c'] -> 'a, b and c'."""
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def horizontal_zone(obj: SceneObject, width: int) -> str:
    cx = obj.centre[0] / width
    return "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"


def vertical_zone(obj: SceneObject, height: int) -> str:
    cy = obj.centre[1] / height
    return "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"


def place_phrase(obj: SceneObject, width: int, height: int) -> str:
    """Where in the picture: 'in the top left corner', 'on the left', 'in the centre', ..."""
    h, v = horizontal_zone(obj, width), vertical_zone(obj, height)
    if h == "centre" and v == "middle":
        return "in the centre"
    if v == "middle":
        return f"on the {h}"
    if h == "centre":
        return f"at the {v}"
    return f"in the {v} {h} corner"


RELATIONS = ("left of", "right of", "above", "below")
RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of",
                  "above": "above", "below": "below"}


def relation_holds(a: SceneObject, b: SceneObject, relation: str, width: int, height: int):
    """Is a <relation> b, judged by box centres? None when the difference is too small to tell.

    Why centres and a margin: 'left of' for touching shapes is a matter of taste; we only ask
    about pairs whose centres differ by more than CLEAR of the image side.
    """
    (ax, ay), (bx, by) = a.centre, b.centre
    if relation in ("left of", "right of"):
        delta, side = bx - ax, width
    elif relation in ("above", "below"):
        delta, side = by - ay, height
    else:
        raise ValueError(f"unknown relation {relation!r}")
    if abs(delta) < CLEAR * side:
        return None
    holds = delta > 0  # a is left of / above b
    return holds if relation in ("left of", "above") else not holds


# --------------------------------------------------------------------------- naming objects


def _matching(scene: Scene, obj: SceneObject, attrs: tuple[str, ...]) -> list[int]:
    return [j for j, o in enumerate(scene.objects) if all(getattr(o, a) == getattr(obj, a) for a in attrs)]


def _words(obj: SceneObject, attrs: tuple[str, ...], noun: str) -> str:
    adjectives = [getattr(obj, a) for a in ("size", "colour") if a in attrs]
    return " ".join(adjectives + [noun])


def _extreme(scene: Scene, i: int, group: list[int]) -> Optional[str]:
    """'left'/'right'/'top'/'bottom' if object i is clearly the extreme one of its group."""
    objs = scene.objects
    for axis, low, high, side in ((0, "left", "right", scene.width), (1, "top", "bottom", scene.height)):
        order = sorted(group, key=lambda j: objs[j].centre[axis])
        if order[0] == i and objs[order[1]].centre[axis] - objs[i].centre[axis] >= CLEAR * side:
            return low
        if order[-1] == i and objs[i].centre[axis] - objs[order[-2]].centre[axis] >= CLEAR * side:
            return high
    return None


_EXTREME_ADJ = {"left": "leftmost", "right": "rightmost", "top": "highest", "bottom": "lowest"}


def describe(scene: Scene, i: int, omit: tuple[str, ...] = (), allow_position: bool = True) -> Optional[str]:
    """Shortest phrase ('the red circle') that picks out object i and no other, or None.

    ``omit`` leaves out attributes the question asks about ('colour' for 'what colour is ...?',
    'kind' turns the noun into 'shape'). Position ('the circle on the left') is the last resort.
    """
    obj = scene.objects[i]
    use_kind = "kind" not in omit
    noun = obj.kind if use_kind else "shape"
    base = ("kind",) if use_kind else ()
    options = [(), ("colour",), ("size",), ("size", "colour")]
    allowed = [o for o in options if not any(a in omit for a in o)]
    for extra in allowed:
        if _matching(scene, obj, base + extra) == [i]:
            return "the " + _words(obj, extra, noun)
    if not allow_position:
        return None
    extra = allowed[-1]
    group = _matching(scene, obj, base + extra)
    where = _extreme(scene, i, group)
    if where is None:
        return None
    words = _words(obj, extra, noun)
    if len(group) == 2:
        return f"the {words} {'on the' if where in ('left', 'right') else 'at the'} {where}"
    return f"the {_EXTREME_ADJ[where]} {words}"


def _groups(scene: Scene) -> list[list[int]]:
    """Objects grouped by (colour, kind), groups ordered left to right by their first member."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, obj in enumerate(scene.objects):
        groups.setdefault((obj.colour, obj.kind), []).append(i)
    return sorted(groups.values(), key=lambda g: min(scene.objects[j].centre[0] for j in g))


def _text_clause(scene: Scene) -> str:
    """'with the word cat written at the top' (no quotes: BLIP's caption cleaner removes them)."""
    text = scene.text
    where = "top" if text.bbox[1] < scene.height / 2 else "bottom"
    noun = "word" if " " not in text.text else "words"
    return f"with the {noun} {text.text} written at the {where}"


# --------------------------------------------------------------------------- captions (stages 1-3)


def short_caption(scene: Scene) -> str:
    """Stage 1-2 caption: 'two blue squares and a red circle on a grey background'."""
    rng = _rng(scene, "caption")
    parts = []
    for group in _groups(scene):
        obj = scene.objects[group[0]]
        noun = obj.name
        if len(group) == 1 and rng.random() < 0.3:
            noun = f"{obj.size} {noun}"
        parts.append(count_phrase(len(group), noun))
    listing, bg = join_words(parts), scene.background
    template = rng.choice(("{list} on a {bg} background", "{list} against a {bg} background",
                           "a {bg} background with {list}", "{list} on {bg}"))
    caption = template.format(list=listing, bg=bg)
    if scene.text is not None:
        caption += " " + _text_clause(scene)
    return caption


def _nameable_pairs(scene: Scene):
    """(i, j, phrase_i, phrase_j) for every ordered pair that can be named without positions."""
    names = [describe(scene, i, allow_position=False) for i in range(len(scene.objects))]
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i != j and a and b:
                yield i, j, a, b


def detailed_description(scene: Scene) -> str:
    """Stage 3 description: several sentences with places, relations, overlaps and text."""
    rng = _rng(scene, "detail")
    objs, bg = scene.objects, scene.background
    sentences = [rng.choice((
        "The image shows {n} shapes on a {bg} background.",
        "This picture contains {n} shapes drawn on a plain {bg} background.",
        "There are {n} shapes on a {bg} background in this image.",
    )).format(n=NUMBER_WORDS[len(objs)], bg=bg)]
    for i in sorted(range(len(objs)), key=lambda k: objs[k].centre[0]):
        obj = objs[i]
        thing = f"{article(obj.size)} {obj.size} {obj.name}"
        place = place_phrase(obj, scene.width, scene.height)
        template = rng.choice(("{Thing} is {place}.", "There is {thing} {place}.", "{Place}, there is {thing}."))
        sentences.append(template.format(thing=thing, Thing=_cap(thing), place=place, Place=_cap(place)))
    relations = []
    for i, j, a, b in _nameable_pairs(scene):
        if i > j:  # each pair once: "A is left of B" already says "B is right of A"
            continue
        for rel in RELATIONS:
            if relation_holds(objs[i], objs[j], rel, scene.width, scene.height):
                relations.append(f"{_cap(a)} is {RELATION_WORDS[rel]} {b}.")
    sentences += rng.sample(relations, min(2, len(relations)))
    names = [describe(scene, i, allow_position=False) for i in range(len(objs))]
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            if scene.overlaps(i, j):
                if names[i] and names[j]:
                    sentences.append(f"{_cap(names[j])} overlaps {names[i]}.")
                else:
                    sentences.append(f"Two of the {objs[i].kind}s overlap." if objs[i].kind == objs[j].kind
                                     else "Two of the shapes overlap.")
    if scene.text is not None:
        where = "top" if scene.text.bbox[1] < scene.height / 2 else "bottom"
        what = "word" if " " not in scene.text.text else "text"
        sentences.append(f'The {what} "{scene.text.text}" is written at the {where} of the image.')
    return " ".join(sentences)


# --------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class QA:
    """One question with its short answer (VQA style) and a full-sentence answer (chat style)."""

    question: str
    answer: str
    full_answer: str
    qtype: str        # colour, shape, count, position, relation, yesno, reading, unanswerable
    answer_type: str  # VQAv2/VizWiz answer types: 'other', 'number', 'yes/no', 'unanswerable'


def _count_answer(n: int, noun: str) -> str:
    if n == 0:
        return f"There are no {noun}s."
    if n == 1:
        return f"There is one {noun}."
    return f"There are {count_phrase(n, noun)}."


def vqa_items(scene: Scene) -> list[QA]:
    """Every question this module can ask about the scene, in a fixed order, all answers true."""
    rng = _rng(scene, "vqa")
    objs, w, h = scene.objects, scene.width, scene.height
    items: list[QA] = []
    present_kinds = [k for k in SHAPES if any(o.kind == k for o in objs)]
    absent_kinds = [k for k in SHAPES if k not in present_kinds]

    for i, obj in enumerate(objs):  # colour
        phrase = describe(scene, i, omit=("colour",))
        if phrase:
            items.append(QA(f"What colour is {phrase}?", obj.colour, f"{_cap(phrase)} is {obj.colour}.",
                            "colour", "other"))
    items.append(QA("What colour is the background?", scene.background,
                    f"The background is {scene.background}.", "colour", "other"))

    for i, obj in enumerate(objs):  # shape
        phrase = describe(scene, i, omit=("kind",))
        if phrase:
            items.append(QA(f"What shape is {phrase}?", obj.kind,
                            f"{_cap(phrase)} is {article(obj.kind)} {obj.kind}.", "shape", "other"))

    count_kinds = present_kinds + absent_kinds[:1]  # one absent kind gives a "0" answer
    for kind in count_kinds:
        n = sum(o.kind == kind for o in objs)
        items.append(QA(f"How many {kind}s are there?", str(n), _count_answer(n, kind), "count", "number"))
    for colour in dict.fromkeys(o.colour for o in objs):
        n = sum(o.colour == colour for o in objs)
        items.append(QA(f"How many {colour} shapes are there?", str(n),
                        _count_answer(n, f"{colour} shape"), "count", "number"))
    items.append(QA("How many shapes are there?", str(len(objs)), _count_answer(len(objs), "shape"),
                    "count", "number"))

    for i, obj in enumerate(objs):  # position in the picture
        phrase = describe(scene, i, allow_position=False)
        if not phrase:
            continue
        cx, cy = obj.centre
        if abs(cx - w / 2) >= CLEAR * w:
            side = "left" if cx < w / 2 else "right"
            items.append(QA(f"Is {phrase} on the left or on the right side of the image?", side,
                            f"{_cap(phrase)} is on the {side} side of the image.", "position", "other"))
        if abs(cy - h / 2) >= CLEAR * h:
            half = "top" if cy < h / 2 else "bottom"
            items.append(QA(f"Is {phrase} in the top or the bottom half of the image?", half,
                            f"{_cap(phrase)} is in the {half} half of the image.", "position", "other"))

    for i, j, a, b in _nameable_pairs(scene):  # relations between two objects
        if i > j:
            continue
        left = relation_holds(objs[i], objs[j], "left of", w, h)
        if left is not None:
            word = "left" if left else "right"
            items.append(QA(f"Is {a} to the left or to the right of {b}?", word,
                            f"{_cap(a)} is to the {word} of {b}.", "relation", "other"))
            rel = rng.choice(("left of", "right of"))
            yes = relation_holds(objs[i], objs[j], rel, w, h)
            items.append(QA(f"Is {a} {RELATION_WORDS[rel]} {b}?", "yes" if yes else "no",
                            f"{'Yes' if yes else 'No'}, {a} is to the {word} of {b}.", "relation", "yes/no"))
        above = relation_holds(objs[i], objs[j], "above", w, h)
        if above is not None:
            word = "above" if above else "below"
            items.append(QA(f"Is {a} above or below {b}?", word, f"{_cap(a)} is {word} {b}.",
                            "relation", "other"))

    for group in _groups(scene):  # yes/no existence
        obj = objs[group[0]]
        items.append(QA(f"Is there {article(obj.name)} {obj.name}?", "yes",
                        f"Yes, there is {article(obj.name)} {obj.name}.", "yesno", "yes/no"))
    absent = [(c, k) for k in SHAPES for c in COLOURS if not any(o.colour == c and o.kind == k for o in objs)]
    for colour, kind in rng.sample(absent, 2):
        name = f"{colour} {kind}"
        items.append(QA(f"Is there {article(name)} {name}?", "no", f"No, there is no {name}.",
                        "yesno", "yes/no"))
    if absent_kinds:
        kind = rng.choice(absent_kinds)
        items.append(QA(f"Are there any {kind}s?", "no", f"No, there are no {kind}s.", "yesno", "yes/no"))

    if scene.text is not None:  # reading
        items.append(QA("What is written in the image?", scene.text.text,
                        f'The image says "{scene.text.text}".', "reading", "other"))

    for kind in absent_kinds[:2]:  # questions the picture cannot answer
        items.append(QA(f"What colour is the {kind}?", "unanswerable",
                        f"There is no {kind} in the image, so I cannot tell its colour.",
                        "unanswerable", "unanswerable"))
    if scene.text is None:
        items.append(QA("What word is written in the image?", "unanswerable",
                        "Nothing is written in the image.", "unanswerable", "unanswerable"))
    return items


def _pick_by_type(rng: random.Random, items: list[QA], types: tuple[str, ...]) -> Optional[QA]:
    """Choose a question type first, then a question: keeps rare types from vanishing."""
    pool = [t for t in types if any(q.qtype == t for q in items)]
    if not pool:
        return None
    qtype = rng.choice(pool)
    return rng.choice([q for q in items if q.qtype == qtype])


ANSWERABLE_TYPES = ("colour", "shape", "count", "position", "relation", "yesno", "reading")


def pick_questions(scene: Scene, k: int, purpose: str = "questions",
                   types: tuple[str, ...] = ANSWERABLE_TYPES) -> list[QA]:
    """Up to k different questions of the given types, drawn from the scene's own stream."""
    rng = _rng(scene, purpose)
    items = [q for q in vqa_items(scene) if q.qtype in types]
    chosen: list[QA] = []
    for _ in range(3 * k):
        if len(chosen) == k:
            break
        qa = _pick_by_type(rng, items, types)
        if qa is not None and qa not in chosen:
            chosen.append(qa)
    return chosen


def conversation(scene: Scene) -> list[dict]:
    """LLaVA-style multi-turn chat: [{'from': 'human', 'value': '<image>\\n...'}, {'from': 'gpt', ...}]."""
    rng = _rng(scene, "conversation")
    items = vqa_items(scene)
    turns: list[tuple[str, str]] = []
    if rng.random() < 0.5:
        turns.append((rng.choice(("What do you see in this image?", "Describe the picture briefly.")),
                      _cap(short_caption(scene)) + "."))
    types = ("colour", "shape", "count", "position", "relation", "yesno", "reading", "unanswerable")
    asked = set()
    for _ in range(rng.randint(2, 4)):
        qa = _pick_by_type(rng, items, types)
        if qa is not None and qa.question not in asked:
            asked.add(qa.question)
            turns.append((qa.question, qa.full_answer))
    out = []
    for k, (question, answer) in enumerate(turns):
        out.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + question})
        out.append({"from": "gpt", "value": answer})
    return out


# --------------------------------------------------------------------------- grounding (stage 4)


@dataclass(frozen=True)
class RefItem:
    """A referring expression: phrases that each pick out exactly one object, and its box."""

    index: int
    sentences: tuple[str, ...]
    bbox: Box


def referring_expressions(scene: Scene) -> list[RefItem]:
    """One RefItem per object that can be named uniquely (shortest phrase first)."""
    items = []
    for i, obj in enumerate(scene.objects):
        phrases = [describe(scene, i)]
        if _matching(scene, obj, ("kind", "size", "colour")) == [i]:
            phrases.append(f"the {obj.size} {obj.name}")
        phrases.append(describe(scene, i, omit=("size",)))
        unique = tuple(dict.fromkeys(p for p in phrases if p))
        if unique:
            items.append(RefItem(i, unique, obj.bbox))
    return items


def grounded_caption(scene: Scene) -> str:
    """'<p>a red circle</p> {<..>} and <p>two blue squares</p> {<..>}<delim>{<..>} on ...'."""
    parts = []
    for group in _groups(scene):
        obj = scene.objects[group[0]]
        boxes = "<delim>".join(box_to_text(scene.objects[j].bbox, scene.width, scene.height) for j in group)
        parts.append(f"<p>{count_phrase(len(group), obj.name)}</p> {boxes}")
    return f"{join_words(parts)} on a {scene.background} background"


def task_samples(scene: Scene) -> list[tuple[str, str]]:
    """Stage-4 (instruction, answer) pairs with the task identifiers [caption] [vqa] [refer] ..."""
    rng = _rng(scene, "tasks")
    w, h = scene.width, scene.height
    samples = [("[caption] Briefly describe this image.", short_caption(scene))]
    qa = _pick_by_type(rng, vqa_items(scene), ("colour", "shape", "count", "position", "relation", "yesno"))
    if qa is not None:
        samples.append((f"[vqa] {qa.question}", qa.answer))
    refs = referring_expressions(scene)
    if refs:
        ref = rng.choice(refs)
        box = box_to_text(ref.bbox, w, h)
        samples.append((f"[refer] {rng.choice(ref.sentences)}", box))
        samples.append((f"[identify] {box}", ref.sentences[0][len("the "):]))
    samples.append(("[grounding] Describe this image in detail.", grounded_caption(scene)))
    kind = rng.choice([o.kind for o in scene.objects])
    boxes = [box_to_text(o.bbox, w, h) for o in scene.objects if o.kind == kind]
    samples.append((f"[detection] {kind}", "<delim>".join(boxes)))
    return samples


# --------------------------------------------------------------------------- evaluation items


@dataclass(frozen=True)
class VSRItem:
    """A spatial statement about two objects and whether it is true (label 1) or false (0)."""

    caption: str
    label: int
    relation: str


def vsr_item(scene: Scene) -> Optional[VSRItem]:
    """VSR-style true/false statement; half true, half false. None if no clear pair exists."""
    rng = _rng(scene, "vsr")
    candidates = []
    for i, j, a, b in _nameable_pairs(scene):
        for rel in RELATIONS:
            truth = relation_holds(scene.objects[i], scene.objects[j], rel, scene.width, scene.height)
            if truth is not None:
                candidates.append((a, b, rel, truth))
    if not candidates:
        return None
    want = rng.random() < 0.5
    pool = [c for c in candidates if c[3] == want] or candidates
    a, b, rel, truth = rng.choice(pool)
    return VSRItem(f"{_cap(a)} is {RELATION_WORDS[rel]} {b}.", int(truth), rel)


def gqa_item(scene: Scene) -> Optional[QA]:
    """GQA-style short-answer question (no counting and no unanswerable ones, like GQA)."""
    return _pick_by_type(_rng(scene, "gqa"), vqa_items(scene),
                         ("colour", "shape", "position", "relation", "yesno", "reading"))


@dataclass(frozen=True)
class ChoiceItem:
    """IconQA choose_txt style: a question, 2-5 text choices and the index of the right one."""

    question: str
    choices: tuple[str, ...]
    answer: int


def iconqa_item(scene: Scene) -> Optional[ChoiceItem]:
    """Multiple choice about counts, colours or shapes; distractors are never also correct."""
    rng = _rng(scene, "iconqa")
    n_choices = rng.randint(2, 5)
    objs = scene.objects
    for qtype in rng.sample(("count", "colour", "shape"), 3):
        if qtype == "count":
            kind = rng.choice(sorted({o.kind for o in objs}))
            n = sum(o.kind == kind for o in objs)
            others = rng.sample([k for k in range(0, 7) if k != n], n_choices - 1)
            choices = sorted([n] + others)
            return ChoiceItem(f"How many {kind}s are there?", tuple(str(c) for c in choices), choices.index(n))
        for i in rng.sample(range(len(objs)), len(objs)):
            omit = ("colour",) if qtype == "colour" else ("kind",)
            phrase = describe(scene, i, omit=omit)
            if not phrase:
                continue
            truth = objs[i].colour if qtype == "colour" else objs[i].kind
            vocabulary = list(COLOURS) if qtype == "colour" else list(SHAPES)
            choices = [truth] + rng.sample([v for v in vocabulary if v != truth], n_choices - 1)
            rng.shuffle(choices)
            question = f"What colour is {phrase}?" if qtype == "colour" else f"What shape is {phrase}?"
            return ChoiceItem(question, tuple(choices), choices.index(truth))
    return None


def _variants(qa: QA) -> list[str]:
    """Other ways people write the same answer (they lower VQA-style agreement, as real data does)."""
    a = qa.answer
    if qa.answer_type == "number":
        n = int(a)
        return [NUMBER_WORDS[n] if 0 < n < len(NUMBER_WORDS) else "none", f"{a} shapes" if n != 1 else "1 shape"]
    if qa.answer_type == "yes/no":
        return ["yes it is", "yeah"] if a == "yes" else ["no it is not", "nope"]
    if qa.qtype == "colour":
        return [f"{a} color", f"it is {a}", f"light {a}"]
    if qa.qtype == "shape":
        return [f"{article(a)} {a}", f"{a} shape"]
    if qa.qtype == "reading":
        return [a.upper(), f"the word {a}"]
    return [f"the {a}", f"on the {a}"]


def human_answers(rng: random.Random, qa: QA, n: int = 10, agree: float = 0.8) -> list[tuple[str, str]]:
    """n simulated annotators: (answer, confidence). At least half give the canonical answer."""
    answers = [(qa.answer, "yes")] * (n // 2)
    for _ in range(n - n // 2):
        if rng.random() < agree:
            answers.append((qa.answer, "yes"))
        else:
            answers.append((rng.choice(_variants(qa)), "maybe"))
    rng.shuffle(answers)
    return answers


@dataclass(frozen=True)
class VizWizItem:
    """VizWiz style: question, 10 (answer, confidence) pairs, answerable flag and answer type."""

    question: str
    answers: tuple[tuple[str, str], ...]
    answerable: int
    answer_type: str


def vizwiz_item(scene: Scene) -> Optional[VizWizItem]:
    """About a quarter of the questions cannot be answered from the picture."""
    rng = _rng(scene, "vizwiz")
    items = vqa_items(scene)
    unanswerable = [q for q in items if q.qtype == "unanswerable"]
    if unanswerable and rng.random() < 0.25:
        qa = rng.choice(unanswerable)
        answers = []
        for _ in range(10):
            if rng.random() < 0.8:
                answers.append(("unanswerable", rng.choice(("yes", "maybe"))))
            else:
                answers.append((rng.choice(list(COLOURS)), "no"))
        answers[0] = ("unanswerable", "yes")  # keep 'unanswerable' the majority answer
        answers[1] = ("unanswerable", "yes")
        answers[2] = ("unanswerable", "yes")
        return VizWizItem(qa.question, tuple(answers), 0, "unanswerable")
    qa = _pick_by_type(rng, items, ("colour", "shape", "count", "yesno", "reading"))
    if qa is None:
        return None
    answers = human_answers(rng, qa, agree=0.6)
    if rng.random() < 0.3:  # now and then one annotator gives up (never below half agreeing)
        others = [k for k, (a, _) in enumerate(answers) if a != qa.answer] or list(range(len(answers)))
        answers[rng.choice(others)] = ("unanswerable", "no")
    return VizWizItem(qa.question, tuple(answers), 1, qa.answer_type)


# --------------------------------------------------------------------------- memes (Hateful Memes stand-in)
#
# Rule (documented in docs/DATA_FORMATS.md): a meme scene carries a written claim
# "<number> [<colour>] <kind>s" such as "two red circles" or "no stars" or "one blue shape".
# label 1 when the claim is FALSE for the picture (the text contradicts the image),
# label 0 when it is true. A harmless stand-in: "hateful" here means "the caption lies".


@dataclass(frozen=True)
class Claim:
    count: int
    colour: Optional[str]
    kind: Optional[str]  # None means any shape ("shapes")


def claim_text(claim: Claim) -> str:
    noun = claim.kind or "shape"
    if claim.colour:
        noun = f"{claim.colour} {noun}"
    if claim.count == 1:
        return f"one {noun}"
    return f"{NUMBER_WORDS[claim.count]} {noun}s"


def parse_claim(text: str) -> Claim:
    """Inverse of claim_text; raises ValueError for anything else."""
    words = text.split()
    if len(words) not in (2, 3) or words[0] not in NUMBER_WORDS:
        raise ValueError(f"not a claim: {text!r}")
    count = NUMBER_WORDS.index(words[0])
    noun = words[-1][:-1] if count != 1 else words[-1]
    if count != 1 and not words[-1].endswith("s"):
        raise ValueError(f"not a claim: {text!r}")
    colour = words[1] if len(words) == 3 else None
    kind = None if noun == "shape" else noun
    if (kind is not None and kind not in SHAPES) or (colour is not None and colour not in COLOURS):
        raise ValueError(f"not a claim: {text!r}")
    return Claim(count, colour, kind)


def count_matching(objects: list[SceneObject], colour: Optional[str], kind: Optional[str]) -> int:
    return sum((colour is None or o.colour == colour) and (kind is None or o.kind == kind) for o in objects)


def meme_claim(objects: list[SceneObject], rng: random.Random) -> str:
    """text_fn for make_scene: a claim about the shapes, true or false with equal chance."""
    model = rng.choice(objects)
    colour, kind = rng.choice(((model.colour, model.kind), (None, model.kind), (model.colour, None),
                               (rng.choice(list(COLOURS)), rng.choice(SHAPES))))
    truth = count_matching(objects, colour, kind)
    count = truth
    if rng.random() < 0.5:
        count = rng.choice([k for k in range(0, 4) if k != truth])
    return claim_text(Claim(count, colour, kind))


def meme_label(scene: Scene) -> int:
    """1 if the written claim is false for this picture, 0 if it is true."""
    if scene.text is None:
        raise ValueError("a meme scene needs written text")
    claim = parse_claim(scene.text.text)
    return int(count_matching(scene.objects, claim.colour, claim.kind) != claim.count)


def make_meme_scene(seed: int, size: int = 224) -> Scene:
    """A scene whose written text is a claim about its shapes (see meme_label)."""
    return make_scene(seed, size, with_text=True, text_fn=meme_claim)
