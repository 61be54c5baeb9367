"""The shapes world: determinism, truthful texts, and box text that points at the right object."""
import re
import time

import pytest

from tinygptv_lib.data import world as W

SEEDS = range(40)


def scene(seed, **kwargs):
    return W.make_scene(W.derive_seed("test", seed), **kwargs)


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_same_scene_and_pixels():
    a, b = scene(3), scene(3)
    assert a.ground_truth() == b.ground_truth()
    assert a.image.tobytes() == b.image.tobytes()


def test_different_seeds_give_different_scenes():
    truths = {str(scene(s).ground_truth()["objects"]) for s in range(20)}
    assert len(truths) == 20


def test_texts_are_deterministic_and_independent_of_call_order():
    first = scene(5)
    caption = W.short_caption(first)
    second = scene(5)
    W.conversation(second), W.vqa_items(second), W.detailed_description(second)  # other texts first
    assert W.short_caption(second) == caption
    assert W.conversation(first) == W.conversation(second)
    assert W.task_samples(first) == W.task_samples(second)


def test_derive_seed_is_stable_and_separates_streams():
    assert W.derive_seed(0, "train", 1) == W.derive_seed(0, "train", 1)
    assert W.derive_seed(0, "train", 1) != W.derive_seed(0, "eval", 1)
    assert W.derive_seed(0, "train", 1) != W.derive_seed(1, "train", 1)
    # A fixed value: a change here means every shipped sample changes too.
    assert W.derive_seed(0, "train/pairs", 0, 0) == 7857580481100021698


def test_generation_is_fast():
    start = time.perf_counter()
    for s in range(50):
        sc = scene(1000 + s)
        W.short_caption(sc), W.vqa_items(sc)
    per_scene = (time.perf_counter() - start) / 50
    assert per_scene < 0.02, f"{per_scene * 1000:.1f} ms per scene"


# --------------------------------------------------------------------------- scenes


def test_scene_objects_follow_the_rules():
    for s in SEEDS:
        sc = scene(s, size=160)
        assert sc.image.size == (160, 160) and sc.image.mode == "RGB"
        assert 2 <= len(sc.objects) <= 5
        for obj in sc.objects:
            assert obj.kind in W.SHAPES and obj.colour in W.COLOURS and obj.size in W.SIZES
            x1, y1, x2, y2 = obj.bbox
            assert 0 <= x1 < x2 <= 160 and 0 <= y1 < y2 <= 160
            lo, hi = W.SIZES[obj.size]
            assert lo * 160 - 1 <= x2 - x1 <= hi * 160 + 1
            if sc.text is not None:  # writing never covers a shape
                assert W._intersection(obj.bbox, sc.text.bbox) == 0


def test_pixels_agree_with_ground_truth():
    """The centre pixel of every shape not covered by a later one has the shape's colour."""
    checked = 0
    for s in SEEDS:
        sc = scene(s)
        for i, obj in enumerate(sc.objects):
            cx, cy = (int(v) for v in obj.centre)
            covered = any(b.bbox[0] <= cx < b.bbox[2] and b.bbox[1] <= cy < b.bbox[3] for b in sc.objects[i + 1:])
            if not covered:
                assert sc.image.getpixel((cx, cy)) == W.COLOURS[obj.colour], (s, obj)
                checked += 1
        corner = sc.image.getpixel((0, sc.height // 2))
        if not any(o.bbox[0] == 0 for o in sc.objects) and sc.text is None:
            assert corner == W.BACKGROUNDS[sc.background]
    assert checked > 60


def test_some_scenes_overlap_and_some_carry_text():
    scenes = [scene(s) for s in range(60)]
    overlapping = sum(any(sc.overlaps(i, j) for i in range(len(sc.objects)) for j in range(i + 1, len(sc.objects)))
                      for sc in scenes)
    with_text = [sc for sc in scenes if sc.text is not None]
    assert 3 <= overlapping <= 40
    assert 5 <= len(with_text) <= 35
    for sc in with_text:  # the word is really drawn: dark pixels inside its box
        x1, y1, x2, y2 = sc.text.bbox
        region = sc.image.crop((x1, y1, x2, y2)).convert("L")
        assert region.getextrema()[0] < 60
        assert sc.text.text in W.WORDS


def test_size_parameter_scales_boxes():
    for size in (112, 448):
        sc = W.make_scene(7, size=size)
        assert sc.image.size == (size, size)
        for obj in sc.objects:
            lo, hi = W.SIZES[obj.size]
            assert lo * size - 1 <= obj.bbox[2] - obj.bbox[0] <= hi * size + 1
    with pytest.raises(ValueError):
        W.make_scene(7, size=16)


# --------------------------------------------------------------------------- box text


def test_box_text_uses_0_to_100_integers_and_finds_the_right_object():
    for s in SEEDS:
        sc = scene(s, size=200)
        for i, obj in enumerate(sc.objects):
            text = W.box_to_text(obj.bbox, sc.width, sc.height)
            assert re.fullmatch(r"\{<\d{1,3}><\d{1,3}><\d{1,3}><\d{1,3}>\}", text)
            (values,) = W.parse_boxes(text)
            assert all(0 <= v <= 100 for v in values)
            back = W.box_from_text(text, sc.width, sc.height)
            assert all(abs(a - b) <= 0.005 * 200 + 1e-9 for a, b in zip(back, obj.bbox))
            best = max(range(len(sc.objects)), key=lambda j: W.iou(back, sc.objects[j].bbox))
            assert sc.objects[best].bbox == obj.bbox


def test_box_text_examples_and_errors():
    assert W.box_to_text((0, 0, 224, 224), 224, 224) == "{<0><0><100><100>}"
    assert W.box_to_text((56, 112, 168, 224), 224, 448) == "{<25><25><75><50>}"
    assert W.parse_boxes("a {<1><2><3><4>}<delim>{<5><6><7><8>} b") == [(1, 2, 3, 4), (5, 6, 7, 8)]
    with pytest.raises(ValueError):
        W.parse_boxes("{<1><2><3><101>}")
    with pytest.raises(ValueError):
        W.box_from_text("no box here", 10, 10)


def _resolve(sc, phrase):
    """Interpret a generated phrase like 'the small red circle on the left' -> object indices."""
    words = phrase.split()
    objs = sc.objects
    match = [i for i, o in enumerate(objs)
             if all(getattr(o, attr) == w for w in words for attr, vocab in
                    (("size", W.SIZES), ("colour", W.COLOURS), ("kind", W.SHAPES)) if w in vocab)]
    positional = {"left": 0, "leftmost": 0, "right": 0, "rightmost": 0, "highest": 1, "top": 1,
                  "lowest": 1, "bottom": 1}
    for w in words:
        if w in positional:
            axis = positional[w]
            key = lambda i: objs[i].centre[axis]
            pick = min(match, key=key) if w in ("left", "leftmost", "highest", "top") else max(match, key=key)
            return [pick]
    return match


def test_referring_expressions_pick_out_exactly_their_object():
    count = 0
    for s in SEEDS:
        sc = scene(s)
        refs = W.referring_expressions(sc)
        for ref in refs:
            for sentence in ref.sentences:
                assert _resolve(sc, sentence) == [ref.index], (sentence, sc.objects)
                count += 1
            assert ref.bbox == sc.objects[ref.index].bbox
    assert count > 80


def test_grounded_caption_boxes_belong_to_their_phrases():
    sc = scene(11)
    text = W.grounded_caption(sc)
    for phrase, boxes in re.findall(r"<p>([^<]+)</p> ((?:\{<\d+><\d+><\d+><\d+>\}(?:<delim>)?)+)", text):
        colour, kind = phrase.split()[-2], phrase.split()[-1].rstrip("s")
        wanted = sorted(W.box_to_text(o.bbox, sc.width, sc.height) for o in sc.objects
                        if o.colour == colour and o.kind == kind)
        assert sorted(boxes.split("<delim>")) == wanted


# --------------------------------------------------------------------------- questions and items


def test_vqa_answers_are_true():
    checked = {"count": 0, "colour": 0, "yesno": 0, "unanswerable": 0}
    for s in SEEDS:
        sc = scene(s)
        objs = sc.objects
        for qa in W.vqa_items(sc):
            m = re.fullmatch(r"How many (\w+)s are there\?", qa.question)
            if m:
                kind = m.group(1)
                n = len(objs) if kind == "shape" else sum(o.kind == kind for o in objs)
                assert qa.answer == str(n)
                checked["count"] += 1
            m = re.fullmatch(r"What colour is (the .+)\?", qa.question)
            if m and qa.qtype == "colour" and m.group(1) != "the background":
                (index,) = _resolve(sc, m.group(1))
                assert qa.answer == objs[index].colour
                checked["colour"] += 1
            m = re.fullmatch(r"Is there an? (\w+) (\w+)\?", qa.question)
            if m:
                present = any(o.colour == m.group(1) and o.kind == m.group(2) for o in objs)
                assert qa.answer == ("yes" if present else "no")
                checked["yesno"] += 1
            if qa.qtype == "unanswerable":
                assert qa.answer == "unanswerable"
                m = re.fullmatch(r"What colour is the (\w+)\?", qa.question)
                if m:
                    assert not any(o.kind == m.group(1) for o in objs)
                else:
                    assert sc.text is None
                checked["unanswerable"] += 1
    assert all(v > 20 for v in checked.values()), checked


def test_conversation_is_alternating_and_starts_with_the_image():
    turns = W.conversation(scene(2))
    assert len(turns) >= 4 and len(turns) % 2 == 0
    assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    assert turns[0]["value"].startswith("<image>\n")
    assert sum("<image>" in t["value"] for t in turns) == 1


def test_captions_and_descriptions_mention_every_shape():
    for s in range(15):
        sc = scene(s)
        caption, detail = W.short_caption(sc), W.detailed_description(sc)
        for obj in sc.objects:
            assert obj.colour in caption and obj.kind in caption
            assert obj.name in detail
        assert sc.background in caption
        assert caption == caption.lower()


def test_task_samples_use_the_stage4_identifiers():
    samples = W.task_samples(scene(4))
    prefixes = [s[0].split()[0] for s in samples]
    assert prefixes[0] == "[caption]" and "[grounding]" in prefixes and "[detection]" in prefixes
    (refer_answer,) = [answer for instruction, answer in samples if instruction.startswith("[refer]")]
    (identify_answer,) = [answer for instruction, answer in samples if instruction.startswith("[identify]")]
    assert len(W.parse_boxes(refer_answer)) == 1
    assert not W.parse_boxes(identify_answer) and identify_answer.split()[-1] in W.SHAPES


def test_vsr_items_are_half_true_and_correct():
    labels = []
    for s in SEEDS:
        sc = scene(s)
        item = W.vsr_item(sc)
        if item is None:
            continue
        m = re.fullmatch(r"(The .+) is (to the left of|to the right of|above|below) (the .+)\.", item.caption)
        (a,), (b,) = _resolve(sc, m.group(1).lower()), _resolve(sc, m.group(3))
        truth = W.relation_holds(sc.objects[a], sc.objects[b], item.relation, sc.width, sc.height)
        assert truth is not None and int(truth) == item.label
        labels.append(item.label)
    assert len(labels) > 25 and 0.25 < sum(labels) / len(labels) < 0.75


def test_iconqa_items_have_one_right_choice():
    for s in SEEDS:
        sc = scene(s)
        item = W.iconqa_item(sc)
        assert item is not None
        assert 2 <= len(item.choices) <= 5 and len(set(item.choices)) == len(item.choices)
        assert 0 <= item.answer < len(item.choices)
        m = re.fullmatch(r"How many (\w+)s are there\?", item.question)
        if m:
            assert item.choices[item.answer] == str(sum(o.kind == m.group(1) for o in sc.objects))


def test_vizwiz_items_have_ten_answers_and_some_unanswerable():
    answerable = []
    for s in SEEDS:
        item = W.vizwiz_item(scene(s))
        assert len(item.answers) == 10
        assert all(conf in ("yes", "maybe", "no") for _, conf in item.answers)
        answers = [a for a, _ in item.answers]
        if item.answerable == 0:
            assert item.answer_type == "unanswerable"
            assert answers.count("unanswerable") >= 3
        else:
            assert max(answers.count(a) for a in answers) >= 5
        answerable.append(item.answerable)
    assert 0 < answerable.count(0) < len(answerable)


def test_meme_label_follows_the_documented_rule():
    labels = []
    for s in SEEDS:
        sc = W.make_meme_scene(W.derive_seed("meme", s))
        claim = W.parse_claim(sc.text.text)
        actual = sum((claim.colour in (None, o.colour)) and (claim.kind in (None, o.kind)) for o in sc.objects)
        label = W.meme_label(sc)
        assert label == int(actual != claim.count)
        labels.append(label)
    assert 10 < sum(labels) < 30


def test_claims_round_trip_and_reject_other_text():
    for claim in (W.Claim(0, None, "star"), W.Claim(1, "red", None), W.Claim(3, "blue", "circle")):
        assert W.parse_claim(W.claim_text(claim)) == claim
    assert W.claim_text(W.Claim(0, None, "star")) == "no stars"
    for bad in ("cat", "two cats", "seven stars", "two pink stars"):
        with pytest.raises(ValueError):
            W.parse_claim(bad)
