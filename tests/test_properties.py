"""Property-based tests (hypothesis) for the prompt builder, the box text parser and the answer
normaliser: invariants that must hold for any input, not just the examples we thought of."""
import warnings

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tinygptv_lib.data import world as W
from tinygptv_lib.eval import metrics as M
from tinygptv_lib.model.sequence import (IGNORE, IMAGE_SLOT, PLACEHOLDER, build_conversation_batch,
                                          build_prompt_batch, tokenize_prompt)
from tinygptv_lib.tokenizer import load_tokenizer

TOK = load_tokenizer()
BOS = 50256
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# text with the characters prompts are made of: words, spaces and tabs (Phi-2's whitespace tokens),
# brackets of the templates and task identifiers, markup, punctuation, accents, CJK and emoji
PROMPT_CHARS = st.sampled_from(list("abcxyzABC 019  \t\n[]<>/{}#:?!.,'\"-_") + ["é", "ß", "中", "🙂", "INST", "vqa",
                                                                               "</Img>", "<Img>"])
FRAGMENT = st.lists(PROMPT_CHARS, max_size=30).map("".join).filter(lambda s: PLACEHOLDER not in s)


def tokens(text: str) -> list:
    return TOK(text, add_special_tokens=False)["input_ids"] if text else []


@st.composite
def prompts(draw):
    before, after = draw(FRAGMENT), draw(FRAGMENT)
    image = draw(st.booleans())
    prompt = before + (PLACEHOLDER if image else "") + after
    assume(image or prompt.strip())
    return prompt, image


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation and unknown-identifier warnings are tested elsewhere
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------- the prompt builder


@FAST
@given(prompts(), st.integers(1, 8), st.one_of(st.none(), st.integers(0, 40)))
def test_image_slots_are_never_cut_and_the_prompt_end_is_kept(p, n_query, extra):
    prompt, image = p
    full = quiet(tokenize_prompt, TOK, prompt, n_query)
    assert full.count(IMAGE_SLOT) == (n_query if image else 0)
    limit = None if extra is None else (n_query if image else 0) + max(1, extra)
    ids = quiet(tokenize_prompt, TOK, prompt, n_query, limit)
    slots = [i for i, t in enumerate(ids) if t == IMAGE_SLOT]
    assert len(slots) == (n_query if image else 0)  # exactly num_query_tokens slots, or none
    if slots:
        assert slots == list(range(slots[0], slots[0] + n_query))  # in one piece
    if limit is None or len(full) <= limit:
        assert ids == full
    else:
        assert len(ids) == limit
        if not slots:
            assert ids == full[-limit:]  # text cut from the start
        else:
            k = full.index(IMAGE_SLOT)
            head, tail = ids[:slots[0]], ids[slots[-1] + 1:]
            full_head, full_tail = full[:k], full[k + n_query:]
            assert tail == full_tail[len(full_tail) - len(tail):]  # each side keeps its end
            assert head == full_head[len(full_head) - len(head):]
            assert not head or tail == full_tail  # the start goes first


@FAST
@given(st.lists(st.tuples(prompts(), FRAGMENT), min_size=1, max_size=4), st.integers(1, 6),
       st.sampled_from(["\n", "###"]), st.integers(1, 40))
def test_training_batch_targets_only_the_answers(samples, n_query, end_sym, max_txt_len):
    convs = [[(prompt, answer)] for (prompt, _), answer in samples]
    batch = quiet(build_conversation_batch, TOK, convs, num_query_tokens=n_query, end_sym=end_sym,
                  max_txt_len=max_txt_len)
    for i, ((prompt, image), answer) in enumerate(samples):
        ids, mask, tgt = batch.input_ids[i].tolist(), batch.attention_mask[i].tolist(), batch.targets[i].tolist()
        n = sum(mask)
        assert mask == [1] * n + [0] * (len(mask) - n)  # right padding
        assert ids[0] == BOS and ids.count(IMAGE_SLOT) == (n_query if image else 0)
        prompt_len = 1 + len(quiet(tokenize_prompt, TOK, prompt, n_query))
        answer_ids = tokens(answer + end_sym)[:max_txt_len]
        assert n == prompt_len + len(answer_ids)
        assert tgt[:prompt_len] == [IGNORE] * prompt_len  # never on BOS, prompt or image
        assert tgt[prompt_len:n] == answer_ids == ids[prompt_len:n]  # exactly the answer tokens
        assert tgt[n:] == [IGNORE] * (len(tgt) - n)
        assert bool(batch.has_image[i]) == image


@FAST
@given(st.lists(prompts(), min_size=1, max_size=5), st.integers(1, 6))
def test_generation_batch_is_left_padded_so_every_row_ends_together(ps, n_query):
    batch = quiet(build_prompt_batch, TOK, [p for p, _ in ps], num_query_tokens=n_query)
    T = batch.input_ids.shape[1]
    assert bool(batch.attention_mask[:, -1].all())  # generation starts right after every row's end
    for i, (prompt, image) in enumerate(ps):
        row = [BOS] + quiet(tokenize_prompt, TOK, prompt, n_query)
        mask = batch.attention_mask[i].tolist()
        assert mask == [0] * (T - len(row)) + [1] * len(row)
        assert batch.input_ids[i, T - len(row):].tolist() == row
        assert (batch.targets[i] == IGNORE).all()
        assert bool(batch.has_image[i]) == image


# --------------------------------------------------------------------------- box text


@st.composite
def boxes(draw):
    w, h = draw(st.integers(1, 4000)), draw(st.integers(1, 4000))
    xs = sorted(draw(st.floats(0, w, allow_nan=False)) for _ in range(2))
    ys = sorted(draw(st.floats(0, h, allow_nan=False)) for _ in range(2))
    return (xs[0], ys[0], xs[1], ys[1]), w, h


@FAST
@given(boxes())
def test_box_text_round_trip(b):
    box, w, h = b
    text = W.box_to_text(box, w, h)
    (ints,) = W.parse_boxes(text)
    assert all(0 <= v <= 100 for v in ints) and ints[0] <= ints[2] and ints[1] <= ints[3]
    back = W.box_from_text(text, w, h)
    for v, orig, side in zip(back, box, (w, h, w, h)):
        assert abs(v - orig) <= side * 0.005 + 1e-9  # within half a percent of the side
    assert W.box_to_text(back, w, h) == text  # text -> pixels -> text is the identity


BOX_PIECES = st.sampled_from(["{", "}", "<", ">", "<0>", "<100>", "<101>", "<7>", "<-3>", "<1.5>", "{<",
                              "><", ">}", "0", "42", "99999999999999999999", "x", " ", "<delim>", "٣", "\n"])


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.text(max_size=60), st.lists(BOX_PIECES, max_size=25).map("".join)),
       st.integers(1, 1000), st.integers(1, 1000))
def test_box_parser_fails_only_with_value_error(text, w, h):
    try:
        found = W.parse_boxes(text)
    except ValueError:
        pass
    else:
        assert all(len(b) == 4 and all(isinstance(v, int) and 0 <= v <= 100 for v in b) for b in found)
    try:
        x1, y1, x2, y2 = W.box_from_text(text, w, h)
    except ValueError:
        pass
    else:
        assert 0 <= x1 <= w and 0 <= x2 <= w and 0 <= y1 <= h and 0 <= y2 <= h


# --------------------------------------------------------------------------- answer normaliser

ANSWERISH = st.lists(st.sampled_from(["the", "a", "an", "two", "Two", "dog", "dogs", "1,000", "3.5", "don't", "dont",
                                      "t-shirt", "yes", "No", "10:30", "!", "?", ",", ".", "-", "'", " ", "  ",
                                      "\t", "(", ")", "Red", "ÉCOLE"]), max_size=10).map(" ".join)
ANY_TEXT = st.one_of(ANSWERISH, st.text(max_size=40))


@settings(max_examples=100, deadline=None)
@given(ANY_TEXT)
def test_normaliser_is_idempotent_and_case_blind(text):
    once = M.normalize_answer(text)
    assert M.normalize_answer(once) == once
    assert M.normalize_answer(text.upper()) == M.normalize_answer(text.upper().lower())
    ascii_text = text.encode("ascii", "ignore").decode()
    assert M.normalize_answer(ascii_text.swapcase()) == M.normalize_answer(ascii_text)


@settings(max_examples=100, deadline=None)
@given(ANSWERISH, st.sampled_from(["?", "!", ".", ",", ";"]), st.sampled_from(["the ", "a ", "an ", "The "]))
def test_normaliser_ignores_trailing_punctuation_and_leading_articles(text, mark, article):
    base = M.normalize_answer(text)
    assert M.normalize_answer(text + mark) == base
    assert M.normalize_answer(text.rstrip() + mark) == M.normalize_answer(text.rstrip())
    assert M.normalize_answer(article + text) == base


HUMANS = st.lists(st.sampled_from(["red", "Red.", "blue", "two", "2", "the dog", "dog", "yes", "no", ""]),
                  min_size=1, max_size=10)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["red", "2", "dog", "yes", "green"]), HUMANS, st.data())
def test_vqa_accuracy_is_bounded_and_monotone(pred, humans, data):
    acc = M.vqa_accuracy(pred, humans)
    assert 0.0 <= acc <= 1.0
    others = [i for i, h in enumerate(humans) if M.normalize_answer(h) != M.normalize_answer(pred)]
    if others:  # one more human agreeing with the prediction never lowers its score
        i = data.draw(st.sampled_from(others))
        agreeing = humans[:i] + [pred] + humans[i + 1:]
        assert M.vqa_accuracy(pred, agreeing) >= acc
    k = sum(M.normalize_answer(h) == M.normalize_answer(pred) for h in humans)
    if k == 0:
        assert acc == 0.0
    if len(humans) == 10:  # the closed form for ten annotators: 0.3, 0.6, 0.9, then 1.0
        assert acc == pytest.approx([0, 0.3, 0.6, 0.9, 1, 1, 1, 1, 1, 1, 1][k])
