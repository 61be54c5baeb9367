"""Every text the backbones are pretrained on, made from shapes-world scenes.

Two readers, two kinds of text:

- The vision side (ViT + Q-Former) learns from texts *about one picture*: a short caption for the
  contrastive loss, and for the captioning loss either a "scene sheet" (every object with its
  size, colour, shape and box, left to right) or the world's detailed description (places,
  relations, overlaps). The sheet is what later stages need most: colour, shape, size, count and
  where each object is. Writing it from the 32 queries forces them to keep all of it.
- The nano Phi learns the world's language in the exact token layout of the later stages:
  stage 1-2 captions, stage-3 `###Human: ... ###Assistant: ...` descriptions, and stage-4
  `[INST] ... [/INST]` tasks ([vqa], [refer], [identify], [grounding], [caption], [detection]) and
  conversations. Most documents state the scene's facts (its sheet) where the image will later
  stand, between `<Img>` and `</Img>`: Phi-2 learnt to answer from context on web text, and here
  the nano Phi learns to answer from what sits in the image slot. A minority has an empty slot,
  which teaches the prior (what answers look like without a picture).
  Phi's second phase adds *drills*: 6-10 short lookups ([vqa] colour, shape, count, ...; [refer];
  [identify]) about one sheet, a kind of question drawn first (`DRILL_WEIGHTS`), and reads the
  sheet without predicting it (`Facts`: not a loss target).

A document is a list of pieces tokenized one by one, exactly as `model/sequence.py` tokenizes a
prompt (split at `<ImageHere>`) and its answer: "[/INST]" + "blue" is not the same token sequence
as "[/INST] blue".
"""
from __future__ import annotations

import random
from typing import Union

from ..data import world as W

BOS = None  # a piece that stands for the BOS token (later turns of a conversation start with it)


class Facts(str):
    """The text that stands where the image will be (the scene sheet). Phi reads it but is never
    asked to predict it: in the course those positions hold image embeddings, never targets."""


Piece = Union[str, None]

from ..data.generate import DETAIL_PROMPTS  # noqa: E402  (the stage-3 instructions, one list for all)
STAGE3 = "###Human: {} ###Assistant: "
STAGE4 = "[INST] {} [/INST]"
IMAGE = "<Img><ImageHere></Img>"


# --------------------------------------------------------------------------- texts about one picture


def scene_sheet(scene: W.Scene) -> str:
    """Everything later stages ask about, in one fixed order (left to right).

    'four shapes on a pink background: a large black circle {<33><45><64><75>}, a small blue
    circle {<46><33><60><47>}, ... and a small purple hexagon {<76><79><92><95>}. the word snow is
    written at the bottom.'
    """
    objs = sorted(scene.objects, key=lambda o: (o.centre[0], o.centre[1]))
    items = [f"{W.article(o.size)} {o.size} {o.name} {W.box_to_text(o.bbox, scene.width, scene.height)}"
             for o in objs]
    noun = "shape" if len(objs) == 1 else "shapes"
    sheet = f"{W.NUMBER_WORDS[len(objs)]} {noun} on a {scene.background} background: {W.join_words(items)}."
    if scene.text is not None:
        where = "top" if scene.text.bbox[1] < scene.height / 2 else "bottom"
        sheet += f" the word {scene.text.text} is written at the {where}."
    return sheet


def contrastive_text(scene: W.Scene) -> str:
    """The text paired with the picture in the contrastive loss (and in retrieval)."""
    return W.short_caption(scene)


def caption_target(scene: W.Scene, rng: random.Random, sheet_share: float = 0.5) -> tuple[bool, str]:
    """What the caption decoder must write from the 32 queries: (is it the sheet?, text)."""
    if rng.random() < sheet_share:
        return True, scene_sheet(scene)
    return False, W.detailed_description(scene)


# --------------------------------------------------------------------------- documents for the LM


def _fill(prompt: str, facts: str) -> list[Piece]:
    """Split at <ImageHere> like `tokenize_prompt`; the facts (or nothing) take the image's place."""
    before, _, after = prompt.partition("<ImageHere>")
    return [p for p in (before, Facts(facts), after) if p]


def _conversation(first_prompt: str, facts: str, answer: str, later: list[tuple[str, str]],
                  end: str = "###") -> list[Piece]:
    """[q1 with facts] a1+end [BOS] q2 a2+end ... : the multi-turn layout of `model/sequence.py`."""
    pieces = _fill(first_prompt, facts) + [answer + end]
    for question, reply in later:
        pieces += [BOS, question, reply + end]
    return pieces


KINDS = ("caption", "detail", "task", "chat", "drill")


def lm_document(scene: W.Scene, rng: random.Random, context_share: float = 0.8,
                weights: tuple[float, ...] = (2, 1, 5, 2, 0), drill_weights: dict | None = None) -> list[Piece]:
    """One LM training document about `scene`, in one of the course's stage layouts (BOS not included).
    `weights`: how often each of `KINDS` is drawn; `drill_weights`: changes to `DRILL_WEIGHTS`."""
    facts = scene_sheet(scene) if rng.random() < context_share else ""
    kind = rng.choices(KINDS, weights=weights)[0]
    if kind == "drill":  # stage 4, lookups only: many short [vqa] / [refer] / [identify] turns about one sheet
        return _task_conversation(_drill_turns(scene, rng, rng.randint(6, 10), drill_weights), facts)
    if kind == "caption":  # stages 1-2: [BOS][image][caption\n]
        return _fill("<ImageHere>", facts) + [W.short_caption(scene) + "\n"]
    if kind == "detail":  # stage 3
        prompt = STAGE3.format(f"{IMAGE} {rng.choice(DETAIL_PROMPTS)}")
        return _conversation(prompt, facts, W.detailed_description(scene), [])
    if kind == "task":  # stage 4: several tasks with their identifiers, one conversation (MiniGPT-v2's multi-task chats)
        tasks = W.task_samples(scene) + _extra_tasks(scene, rng)
        return _task_conversation(rng.sample(tasks, min(len(tasks), rng.randint(3, 6))), facts)
    chat = W.conversation(scene)  # stage 4, LLaVA-style multi-turn
    pairs = [(chat[k]["value"].replace("<image>\n", ""), chat[k + 1]["value"]) for k in range(0, len(chat) - 1, 2)]
    first = STAGE4.format(f"{IMAGE} {pairs[0][0]}")
    later = [(STAGE4.format(q), a) for q, a in pairs[1:]]
    return _conversation(first, facts, pairs[0][1], later)


def _task_conversation(turns: list[tuple[str, str]], facts: str) -> list[Piece]:
    """(instruction, answer) turns as one stage-4 conversation, the image (facts) in the first."""
    (instruction, answer), later = turns[0], turns[1:]
    return _conversation(STAGE4.format(f"{IMAGE} {instruction}"), facts, answer,
                         [(STAGE4.format(i), a) for i, a in later])


# How often a drill asks each kind of question (then any question of that kind in the scene): the
# lookups the later stages ask most (an object's colour, shape, count, box) weigh more, and
# "unanswerable" (a colour asked of an absent shape) does not outnumber the answerable colour questions.
DRILL_WEIGHTS = {"colour": 3, "shape": 3, "count": 3, "refer": 3, "identify": 1, "position": 1, "relation": 1,
                 "yesno": 1, "reading": 1, "unanswerable": 1}


def _drill_turns(scene: W.Scene, rng: random.Random, k: int, changes: dict | None = None) -> list[tuple[str, str]]:
    """k different (instruction, answer) lookups about the scene, a kind drawn first (DRILL_WEIGHTS,
    with `changes`)."""
    weights = {**DRILL_WEIGHTS, **(changes or {})}
    pools: dict[str, list[tuple[str, str]]] = {}
    for qa in W.vqa_items(scene):
        pools.setdefault(qa.qtype, []).append((f"[vqa] {qa.question}", qa.answer))
    for refer, identify in _box_tasks(scene, rng):
        pools.setdefault("refer", []).append(refer)
        pools.setdefault("identify", []).append(identify)
    turns: list[tuple[str, str]] = []
    while len(turns) < k:
        kinds = [q for q in weights if pools.get(q) and weights[q] > 0]
        if not kinds:
            break
        kind = rng.choices(kinds, weights=[weights[q] for q in kinds])[0]
        turns.append(pools[kind].pop(rng.randrange(len(pools[kind]))))
    return turns


def _extra_tasks(scene: W.Scene, rng: random.Random) -> list[tuple[str, str]]:
    """More [vqa] / [refer] / [identify] items than `task_samples` draws (counting, boxes)."""
    out = [(f"[vqa] {qa.question}", qa.answer) for qa in W.pick_questions(scene, 4, "lm-vqa")]
    for refer, identify in _box_tasks(scene, rng):
        out += [refer, identify]
    return out


def _box_tasks(scene: W.Scene, rng: random.Random) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Per referring expression: ([refer] phrase -> box, [identify] box -> phrase)."""
    out = []
    for ref in W.referring_expressions(scene):
        box = W.box_to_text(ref.bbox, scene.width, scene.height)
        out.append(((f"[refer] {rng.choice(ref.sentences)}", box), (f"[identify] {box}", ref.sentences[0][len("the "):])))
    return out


def tokenize_pieces(tokenizer, pieces: list[Piece], bos_id: int = 50256) -> list[int]:
    """[BOS] + each piece tokenized on its own (None -> BOS), as the later stages tokenize."""
    return tokenize_with_targets(tokenizer, pieces, bos_id)[0]


def tokenize_with_targets(tokenizer, pieces: list[Piece], bos_id: int = 50256,
                          facts_ids: list[int] | None = None) -> tuple[list[int], list[bool]]:
    """The ids of `tokenize_pieces` and, per id, whether it is a loss target (False for `Facts`).
    `facts_ids`: ids that stand for the `Facts` piece instead of its text (image slots)."""
    ids, target = [bos_id], [False]
    for piece in pieces:
        if piece is BOS:
            ids.append(bos_id)
            target.append(True)
        elif facts_ids is not None and isinstance(piece, Facts):
            ids += facts_ids
            target += [False] * len(facts_ids)
        elif piece:
            new = tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids += new
            target += [not isinstance(piece, Facts)] * len(new)
    return ids, target
