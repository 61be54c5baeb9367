"""Benchmark scoring rules: the VQA normaliser, VQA accuracy, GQA exact match, the original lenient
rules, IconQA's loss ranking, AUC, and property tests of the normaliser."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygptv_lib.eval import metrics as M
from tinygptv_lib.eval.metrics import normalize_answer as norm

# --------------------------------------------------------------------------- the normaliser


@pytest.mark.parametrize("text, expected", [
    # lower case, whitespace collapsed
    ("  Hello\n\tWORLD  ", "hello world"),
    # punctuation touching a space or an end is deleted; inside a word it becomes a space
    ("yes.", "yes"),
    ("Yes!", "yes"),
    ("(red)", "red"),
    ("red, white and blue?", "red white and blue"),
    ("t-shirt", "t shirt"),
    ("red/blue", "red blue"),
    ('"stop"', "stop"),
    ("10:30", "10:30"),  # ':' is not on EvalAI's list
    # decimal points stay, other periods go; commas inside numbers go
    ("3.5", "3.5"),
    ("3.5.", "3.5"),
    ("e.g.", "eg"),
    ("1,000", "1000"),
    ("1,000.50 dollars.", "1000.50 dollars"),
    ("1, 2", "1 2"),
    # number words -> digits
    ("Two", "2"),
    ("one dog and three cats", "1 dog and 3 cats"),
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),  # EvalAI maps zero..ten only
    # articles dropped
    ("The dog", "dog"),
    ("an apple", "apple"),
    ("a", ""),
    ("the a an", ""),
    ("theater", "theater"),  # only whole words
    # contractions restored
    ("dont", "don't"),
    ("Isnt it", "isn't it"),
    ("I dont know", "i don't know"),
    ("im here", "i'm here"),
    ("don't", "don't"),
    ("wont", "won't"),
    ("couldnt've", "couldn't've"),
    # all together
    ("The Two dogs, don't they?", "2 dogs don't they"),
    ("", ""),
])
def test_normalize_known_cases(text, expected):
    assert norm(text) == expected


def test_contraction_table_is_a_fixed_point():
    # a value that is also a key would make normalisation change on a second pass
    assert not set(M.CONTRACTIONS.values()) & set(M.CONTRACTIONS)
    assert all("'" in v for v in M.CONTRACTIONS.values())
    assert not set(M.NUMBER_WORDS.values()) & (set(M.NUMBER_WORDS) | M.ARTICLES)


# --------------------------------------------------------------------------- VQA accuracy


def humans(answer: str, k: int, other: str = "blue") -> list:
    """Ten human answers, k of them `answer`."""
    return [answer] * k + [other] * (10 - k)


@pytest.mark.parametrize("k, expected", [
    # k humans gave the answer. Leave one out, ten times:
    # - each of the k humans who gave it sees k-1 matches among the other 9: min(1, (k-1)/3)
    # - each of the 10-k others sees k matches: min(1, k/3)
    (0, 0.0),   # nobody: 0
    (1, 0.3),   # (1*0/3 + 9*1/3) / 10 = 3/10
    (2, 0.6),   # (2*1/3 + 8*2/3) / 10 = (2/3 + 16/3) / 10 = 6/10
    (3, 0.9),   # (3*2/3 + 7*1) / 10 = (2 + 7) / 10
    (4, 1.0),   # (4*1 + 6*1) / 10: 3 of the other 9 always match
    (10, 1.0),
])
def test_vqa_accuracy_leave_one_out(k, expected):
    assert M.vqa_accuracy("red", humans("red", k)) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    # "Two." and "2" are the same answer after normalisation; 3 of 10 -> 0.9 as above
    assert M.vqa_accuracy("Two.", humans("2", 3)) == pytest.approx(0.9)
    assert M.vqa_accuracy("the dog", humans("Dog", 2)) == pytest.approx(0.6)
    # "red car" is not "red": no partial credit in the standard protocol
    assert M.vqa_accuracy("red car", humans("red", 10)) == 0.0


def test_vqa_accuracy_other_answer_counts():
    # 3 humans: answer given by 1 -> (0 + 1/3 + 1/3) / 3 = 2/9
    assert M.vqa_accuracy("x", ["x", "y", "z"]) == pytest.approx(2 / 9)
    with pytest.raises(ValueError):
        M.vqa_accuracy("x", [])


def test_gqa_exact_match():
    assert M.exact_match("The Red.", "red") == 1.0
    assert M.exact_match("Two", "2") == 1.0
    assert M.exact_match("red car", "red") == 0.0
    assert M.exact_match("", "red") == 0.0


# --------------------------------------------------------------------------- original (lenient) rules


def test_gqa_lenient_is_a_substring_test():
    assert M.gqa_lenient("The circle is RED.", "red") == 1.0
    assert M.gqa_lenient("red", "Red") == 1.0
    assert M.gqa_lenient("blue", "red") == 0.0
    assert M.gqa_lenient("credit", "red") == 1.0  # lenient indeed: "red" inside "credit"
    assert M.gqa_lenient("anything", "") == 0.0  # an empty label matches nothing


def test_vsr_lenient_and_standard():
    assert M.vsr_lenient("True", 1) == 1.0
    assert M.vsr_lenient("yes, it is", 1) == 1.0  # the original accepts yes for true
    assert M.vsr_lenient("false", 1) == 0.0
    assert M.vsr_lenient("It is false.", 0) == 1.0
    assert M.vsr_lenient("not sure", 0) == 1.0  # "no" inside "not": the original rule is that lenient
    assert M.vsr_lenient("true, yes", 1) == 1.0  # counted once (the original counts it twice)
    assert M.vsr_standard("True.", 1) == 1.0
    assert M.vsr_standard("no", 0) == 1.0
    assert M.vsr_standard("it is true", 1) == 0.0  # first word must be the verdict
    assert M.vsr_standard("not sure", 0) == 0.0
    assert M.vsr_standard("", 0) == 0.0


def test_vizwiz_lenient():
    hs = ["hexagon"] * 8 + ["a hexagon", "unanswerable"]
    assert M.vizwiz_lenient("hexagon", hs) == 1.0  # 8 equal + 1 substring = 9 -> min(9/3, 1)
    assert M.vizwiz_lenient("hex", hs) == 1.0  # answer inside a human answer counts too
    assert M.vizwiz_lenient("A red hexagon", hs) == 1.0  # human answer inside the answer
    two = ["blue", "blue"] + ["red"] * 8
    assert M.vizwiz_lenient("blue", two) == pytest.approx(2 / 3)  # 2 matches -> 2/3
    assert M.vizwiz_lenient("green", two) == 0.0
    # the original scores an empty answer 1.0 (it is a substring of everything); we score 0
    assert M.vizwiz_lenient("", two) == 0.0
    assert M.vizwiz_lenient("   ", two) == 0.0


def test_hateful_memes_readings():
    assert M.hm_lenient_prediction("Yes, it is.") == 1
    assert M.hm_lenient_prediction("yes and no") == 1  # "yes" wins
    assert M.hm_lenient_prediction("No.") == 0
    assert M.hm_lenient_prediction("I don't know") == 0  # "no" inside "know"
    assert M.hm_lenient_prediction("maybe") is None
    assert M.hm_standard_prediction("Yes.") == 1
    assert M.hm_standard_prediction("no way") == 0
    assert M.hm_standard_prediction("I think yes") is None
    assert M.binary_correct(1, 1) == 1.0
    assert M.binary_correct(0, 1) == 0.0
    assert M.binary_correct(None, 0) == 0.0  # no reading is wrong


# --------------------------------------------------------------------------- IconQA


def test_iconqa_ranking_with_a_fake_loss():
    choices = ["circle", "star", "square"]

    def fake_loss(question, choice):  # the right answer has the lowest loss
        return {"circle": 2.5, "star": 0.7, "square": 1.9}[choice]

    assert M.iconqa_predict("What shape?", choices, fake_loss) == 1
    losses = [fake_loss("q", c) for c in choices]
    assert M.rank_by_loss(losses) == [1, 2, 0]
    assert M.iconqa_correct(losses, 1) == 1.0
    assert M.iconqa_correct(losses, 0) == 0.0


def test_rank_by_loss_ties_and_nan():
    assert M.rank_by_loss([1.0, 1.0, 0.5]) == [2, 0, 1]  # ties keep the order
    assert M.rank_by_loss([float("nan"), 3.0]) == [1, 0]  # NaN last
    with pytest.raises(ValueError):
        M.iconqa_correct([], 0)


def test_roc_auc():
    assert M.roc_auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert M.roc_auc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    assert M.roc_auc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.5
    # hard predictions: TPR 1/2, TNR 1 -> AUC = (1/2 + 1) / 2 = 0.75
    assert M.roc_auc([1, 0, 0, 0], [1, 1, 0, 0]) == pytest.approx(0.75)
    assert math.isnan(M.roc_auc([1, 0], [1, 1]))
    assert M.prediction_score(None) == 0.5


# --------------------------------------------------------------------------- properties

VQAISH = st.text(alphabet=st.sampled_from(list("0123456789.,-'()!?:/; \n\tabTHEonetwdsNI")), max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), VQAISH))
def test_normalize_is_idempotent(text):
    once = norm(text)
    assert norm(once) == once


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_normalize_never_raises_and_has_no_upper_case(text):
    out = norm(text)
    assert isinstance(out, str)
    assert not any(c.isupper() for c in out)
    assert out == out.strip() and "  " not in out
    assert not set(out) & M.PUNCTUATION
