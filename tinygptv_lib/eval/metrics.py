"""Scoring rules for TinyGPT-V's five benchmarks: the original lenient rules and the standard ones.

Two families, both pure functions of (model answer, label):

* **original** - what TinyGPT-V's own evaluation script counts (TINYGPTV_REFERENCE.md 5): substring
  tests on the lower-cased answer (GQA, VSR, VizWiz, Hateful Memes) and loss ranking (IconQA).
  Generous: "the circle is not red" counts as a correct "red".
* **standard** - the VQAv2 / EvalAI rules that lmms-eval and VLMEvalKit use: the answer and the
  labels are normalised (`normalize_answer`), then compared exactly; VizWiz uses VQA accuracy over
  its ten human answers (`vqa_accuracy`).

Where the original rule has a bug the course fixes it and says so in the function's docstring.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Optional, Sequence

# --------------------------------------------------------------------------- VQA normalisation

# EvalAI's punctuation list. Not in it: the apostrophe (contractions keep theirs), the period
# (handled by its own rule, decimal points survive) and ':' ("10:30" stays a time).
PUNCTUATION = frozenset(';/[]"{}()=+\\_-><@`,?!')

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES = frozenset({"a", "an", "the"})

# Apostrophe-less spellings -> the contraction. A subset of EvalAI's table, written for this course:
# the common negations and pronoun contractions. Left out on purpose: spellings that are also
# ordinary words ("ill", "well", "were", "wed", "shed", "hell", "its", "lets", "id"); "cant" stays,
# as in EvalAI. EvalAI's keys with capitals ("Im", "Ive") never match after lower-casing; here they
# are lower-case so that they do. No value is also a key, which keeps the normaliser idempotent.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldntve": "couldn't've", "couldnt've": "couldn't've", "couldn'tve": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "mightnt": "mightn't",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "shant": "shan't", "shes": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldntve": "shouldn't've", "thats": "that's", "thered": "there'd",
    "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "wasnt": "wasn't", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldntve": "wouldn't've", "yall": "y'all", "youd": "you'd",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}

_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")  # "1,000" -> "1000"
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")  # every period except one between two digits


def _strip_punctuation(s: str) -> str:
    """EvalAI's punctuation rule, decided per occurrence: a mark touching whitespace (or an end of
    the text) is deleted, one inside a word becomes a space ("t-shirt" -> "t shirt")."""
    out = []
    last = len(s) - 1
    for i, c in enumerate(s):
        if c not in PUNCTUATION:
            out.append(c)
        elif i == 0 or i == last or s[i - 1].isspace() or s[i + 1].isspace():
            continue
        else:
            out.append(" ")
    return "".join(out)


def normalize_answer(text: str) -> str:
    """VQAv2 / EvalAI answer normalisation: lower-case, punctuation rules, number words -> digits,
    articles dropped, contractions fixed, whitespace collapsed. Idempotent.

    >>> normalize_answer("The Two dogs, don't they?")
    "2 dogs don't they"
    >>> normalize_answer("1,000.50 dollars.")
    '1000.50 dollars'
    """
    s = str(text).lower()
    s = "".join(c for c in s if not c.isupper())  # letter-like symbols with no lower case (e.g. U+2102)
    s = _DIGIT_COMMA.sub("", s)
    s = _strip_punctuation(s)
    s = _NON_DECIMAL_PERIOD.sub("", s)
    words = []
    for w in s.split():
        w = NUMBER_WORDS.get(w, w)
        if w in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(w, w))
    return " ".join(words)


# --------------------------------------------------------------------------- standard rules


def vqa_accuracy(answer: str, human_answers: Sequence[str]) -> float:
    """Standard VQA accuracy: for each human answer, take the other ones and score
    min(1, matches / 3); average over all humans. Answers are normalised first.

    With ten humans: an answer 1 of them gave scores 0.3, 2 of them 0.6, 3 of them 0.9, 4+ 1.0.
    """
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_answer(answer)
    humans = [normalize_answer(h) for h in human_answers]
    total_matches = sum(h == pred for h in humans)
    scores = []
    for h in humans:
        others = total_matches - (h == pred)  # matches among the other answers
        scores.append(min(1.0, others / 3.0))
    return sum(scores) / len(scores)


def exact_match(answer: str, label: str) -> float:
    """GQA's standard score: 1.0 when the normalised answer equals the normalised label."""
    return float(normalize_answer(answer) == normalize_answer(label))


YES_NO = {"yes": 1, "no": 0}
TRUE_FALSE = {"true": 1, "yes": 1, "false": 0, "no": 0}


def parse_yes_no(answer: str, words: Optional[dict] = None) -> Optional[int]:
    """Strict reading of a binary answer: the first normalised word must be one of `words`
    (default yes -> 1, no -> 0); None when it is not."""
    words = YES_NO if words is None else words
    tokens = normalize_answer(answer).split()
    return words.get(tokens[0]) if tokens else None


def vsr_standard(answer: str, label: int) -> float:
    """VSR, standard: the answer's first normalised word is true/false (yes/no accepted) and agrees."""
    return float(parse_yes_no(answer, TRUE_FALSE) == int(label))


def hm_standard_prediction(answer: str) -> Optional[int]:
    """Hateful Memes, standard: first normalised word yes -> 1, no -> 0, anything else None (wrong)."""
    return parse_yes_no(answer, YES_NO)


# --------------------------------------------------------------------------- original (lenient) rules


def gqa_lenient(answer: str, label: str) -> float:
    """GQA, original: correct if the label is a substring of the lower-cased answer."""
    label = str(label).lower().strip()
    return float(bool(label) and label in str(answer).lower())


VSR_WORDS = {1: ("true", "yes"), 0: ("false", "no")}


def vsr_lenient(answer: str, label: int) -> float:
    """VSR, original: correct if "true" (label 1) or "false" (label 0) is a substring of the
    lower-cased answer; the original also accepts "yes" / "no" for them.

    The original adds one point for the true/false match and another for the yes/no match, so an
    answer like "true, yes" counts twice (scores above 100% are possible); we count an item once.
    """
    text = str(answer).lower()
    return float(any(w in text for w in VSR_WORDS[int(label)]))


def vizwiz_lenient(answer: str, human_answers: Sequence[str]) -> float:
    """VizWiz, original: min(#human answers matching / 3, 1); a human answer matches when it equals
    the answer, or either one is a substring of the other (lower-cased).

    The original lets an empty answer match every human answer (the empty string is a substring of
    everything), so saying nothing scores 1.0; we let an empty answer match nothing.
    """
    text = str(answer).lower().strip()
    if not text:
        return 0.0
    count = 0
    for h in human_answers:
        h = str(h).lower().strip()
        if h == text or (h and h in text) or text in h:
            count += 1
    return min(count / 3.0, 1.0)


def hm_lenient_prediction(answer: str) -> Optional[int]:
    """Hateful Memes, original: "yes" anywhere in the lower-cased answer -> 1, else "no" -> 0, else
    None (the original then compares the raw text with the label, which is never equal: wrong)."""
    text = str(answer).lower()
    if "yes" in text:
        return 1
    if "no" in text:
        return 0
    return None


def binary_correct(prediction: Optional[int], label: int) -> float:
    """1.0 when a 0/1 prediction equals the label; None (no reading) is wrong."""
    return float(prediction is not None and int(prediction) == int(label))


# --------------------------------------------------------------------------- IconQA: loss ranking


def rank_by_loss(losses: Sequence[float]) -> list[int]:
    """Candidate indices from the lowest loss to the highest (ties keep the candidates' order;
    NaN ranks last)."""
    def key(i):
        v = float(losses[i])
        return (math.isnan(v), v if not math.isnan(v) else 0.0, i)

    return sorted(range(len(losses)), key=key)


def iconqa_correct(losses: Sequence[float], answer: int) -> float:
    """IconQA (original and standard alike): 1.0 when the candidate with the lowest loss is the answer."""
    if not losses:
        raise ValueError("iconqa_correct needs at least one candidate loss")
    return float(rank_by_loss(losses)[0] == int(answer))


def iconqa_predict(question, choices: Sequence[str], loss_fn: Callable) -> int:
    """Top-1 choice under `loss_fn(question, choice) -> float` (the model's loss in practice)."""
    return rank_by_loss([loss_fn(question, c) for c in choices])[0]


# --------------------------------------------------------------------------- aggregates


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; NaN for an empty list."""
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (the probability that a random positive outranks a random negative,
    ties counting half); NaN when only one class is present."""
    pos = [float(s) for s, y in zip(scores, labels) if int(y) == 1]
    neg = [float(s) for s, y in zip(scores, labels) if int(y) != 1]
    if not pos or not neg:
        return float("nan")
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(pos) * len(neg))


def prediction_score(prediction: Optional[int]) -> float:
    """A 0/1/None prediction as a ranking score for AUC: None sits in the middle (0.5)."""
    return 0.5 if prediction is None else float(prediction)
