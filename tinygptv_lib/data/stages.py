"""From on-disk records to training samples for each stage, and the stage-4 mixture sampler.

A `Sample` is an image reference plus (question, answer) turns already in the stage's template;
`model/sequence.py` turns a list of samples into a batch. The readers in `formats/` read the
shipped shapes-world files and the real datasets alike, so this file serves both.

Bad records: by default the first one stops the load with a `DataFormatError` naming the file,
the record and the field. Given a `SkipLog` (what `skip_bad_samples: true` in a stage config
does), each bad record is left out and counted by dataset and reason, and the run goes on.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .world import box_to_text, derive_seed
from .formats import (DataFormatError, read_cc_sbu_align, read_gqa, read_llava, read_refcoco, read_shards,
                      read_vqav2)

IMAGE_PROMPT = "<Img><ImageHere></Img>"

# Stage 3's four instructions (the original config names a prompt file missing from its repository):
# one list, in data/generate.py, for writing the data and reading it.
from .generate import DETAIL_PROMPTS  # noqa: E402


@dataclass(frozen=True)
class Sample:
    image: str | bytes | None  # a file path, encoded bytes (shards), or None for text-only samples
    key: str  # unique per image: the cache key for frozen image features
    turns: tuple[tuple[str, str], ...]  # (question as the model reads it, answer)
    source: str  # dataset name, for logs and skip counts


class SkipLog:
    """What a tolerant run left out: counts by (dataset, reason) and the first few full messages."""

    def __init__(self, keep: int = 20):
        self.counts: Counter = Counter()
        self.examples: list[str] = []
        self.keep = keep

    def add(self, dataset: str, err: Exception) -> None:
        self.counts[f"{dataset}: {skip_reason(err)}"] += 1
        if len(self.examples) < self.keep:
            self.examples.append(f"{dataset}: {err}")

    def reporter(self, dataset: str) -> Callable[[Exception], None]:
        return lambda err: self.add(dataset, err)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        lines = [f"skipped {self.total} bad record(s):"]
        lines += [f"  {n:>7}  {reason}" for reason, n in self.counts.most_common()]
        if self.examples:
            lines.append(f"first {len(self.examples)} in full:")
            lines += [f"  {e}" for e in self.examples]
        return "\n".join(lines)


_VALUE = re.compile(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\b\d+x\d+\b")


def skip_reason(err: Exception) -> str:
    """A short reason to count skips by: the field and the problem without its particular values
    ("field 'bbox': box … lies outside the … image")."""
    if isinstance(err, DataFormatError) and err.problem is not None:
        problem = re.split(r",? got |: | \(", err.problem, maxsplit=1)[0]
        problem = _VALUE.sub("…", problem)
        return f"field {err.field!r}: {problem}" if err.field else problem
    return type(err).__name__


def clean_caption(text: str, max_words: int = 50) -> str:
    """BLIP's caption cleaner (stages 1-2): lower case, some punctuation to spaces, <= 50 words."""
    text = re.sub(r"([.!\"()*#:;~])", " ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


def _stable_rng(*parts) -> random.Random:
    return random.Random(derive_seed(*parts))


def box_text(bbox_xywh: Sequence[float], width: int, height: int) -> str:
    """RefCOCO's pixel box (x, y, w, h) -> '{<x1><y1><x2><y2>}' on 0..100 (the world's box text)."""
    x, y, w, h = bbox_xywh
    return box_to_text((x, y, x + w, y + h), width, height)


def with_template(template: str | None, question: str) -> str:
    return template.format(question) if template else question


# ----------------------------------------------------------------------------- one builder per kind
# Each takes (root, spec, template, seed, on_error): on_error None raises at the first bad record.
def shards_samples(root: Path, spec: dict, template: str | None, seed: int, on_error=None) -> list[Sample]:
    folder = root / spec["path"]
    out = []
    for s in read_shards(folder, on_error):
        caption = clean_caption(s.caption)
        if not caption:
            err = DataFormatError(folder, f"key {s.key!r}", "txt", f"caption {s.caption!r:.40} is empty once cleaned")
            if on_error is None:
                raise err
            on_error(err)
            continue
        out.append(Sample(s.image, f"{spec['path']}:{s.key}", (("<ImageHere>", caption),), spec["name"]))
    return out


def align_samples(root: Path, spec: dict, template: str | None, seed: int, on_error=None) -> list[Sample]:
    out = []
    for r in read_cc_sbu_align(root / spec["path"], on_error=on_error):
        prompt = _stable_rng(seed, spec["name"], r.image_id).choice(DETAIL_PROMPTS)
        q = with_template(template, f"{IMAGE_PROMPT} {prompt}")
        out.append(Sample(str(r.image_path), str(r.image_path), ((q, r.caption),), spec["name"]))
    return out


def llava_samples(root: Path, spec: dict, template: str | None, seed: int, on_error=None) -> list[Sample]:
    path = root / spec["path"]
    image_root = root / spec["image_root"] if "image_root" in spec else None
    out = []
    for r in read_llava(path, image_root, on_error=on_error):
        turns = []
        for k in range(0, len(r.conversations) - 1, 2):
            q = r.conversations[k]["value"]
            if k == 0 and r.image is not None:
                q = f"{IMAGE_PROMPT} " + q.replace("<image>", "").strip()
            turns.append((with_template(template, q), r.conversations[k + 1]["value"]))
        image = str(r.image_path) if r.image_path is not None else None
        out.append(Sample(image, image or f"text:{r.id}", tuple(turns), spec["name"]))
    return out


def vqa_samples(root: Path, spec: dict, template: str | None, seed: int, on_error=None) -> list[Sample]:
    """VQAv2-style: the answer is drawn by annotator frequency (fixed per question and seed); blank
    annotator answers are never drawn."""
    d = root / spec["path"]
    out = []
    for r in read_vqav2(d / "questions.json", d / "annotations.json", d / spec.get("image_dir", "images"),
                        on_error=on_error):
        counts = Counter(a for a in r.answers if a.strip())
        if not counts:
            err = DataFormatError(d / "annotations.json", f"question_id {r.question_id}", "answers",
                                  "every annotator answer is empty")
            if on_error is None:
                raise err
            on_error(err)
            continue
        answers, weights = zip(*sorted(counts.items()))
        answer = _stable_rng(seed, spec["name"], r.question_id).choices(answers, weights)[0]
        q = with_template(template, f"{IMAGE_PROMPT} [vqa] {r.question}")
        out.append(Sample(str(r.image_path), str(r.image_path), ((q, answer),), spec["name"]))
    return out


def gqa_samples(root: Path, spec: dict, template: str | None, seed: int, on_error=None) -> list[Sample]:
    d = root / spec["path"]
    out = []
    for r in read_gqa(d / spec.get("file", "train_balanced_questions.json"), d / spec.get("image_dir", "images"),
                      on_error=on_error):
        q = with_template(template, f"{IMAGE_PROMPT} [vqa] {r.question}")
        out.append(Sample(str(r.image_path), str(r.image_path), ((q, r.answer),), spec["name"]))
    return out


def refer_samples(root: Path, spec: dict, template: str | None, seed: int, on_error=None) -> list[Sample]:
    """RefCOCO-style: [refer] phrase -> box, or (inverse=True) [identify] box -> phrase."""
    d = root / spec["path"]
    out = []
    for r in read_refcoco(d / spec.get("file", "refs.json"), d / spec.get("image_dir", "images"),
                          on_error=on_error):
        box = box_text(r.bbox, r.width, r.height)
        sentence = _stable_rng(seed, spec["name"], r.ref_id).choice(r.sentences)
        if spec.get("inverse"):
            q, a = f"{IMAGE_PROMPT} [identify] {box}", sentence
        else:
            q, a = f"{IMAGE_PROMPT} [refer] {sentence}", box
        out.append(Sample(str(r.image_path), str(r.image_path), ((with_template(template, q), a),), spec["name"]))
    return out


BUILDERS: dict[str, Callable[..., list[Sample]]] = {
    "shards": shards_samples,
    "cc_sbu_align": align_samples,
    "llava": llava_samples,
    "vqa": vqa_samples,
    "gqa": gqa_samples,
    "refcoco": refer_samples,
}


def load_datasets(root: str | Path, specs: list[dict], template: str | None, seed: int, *,
                  skip_log: Optional[SkipLog] = None) -> dict[str, list[Sample]]:
    """{dataset name: samples} for a stage's dataset list (each spec: name, kind, path, ratio, ...).

    skip_log: leave bad records out and count them there (default: the first one raises). A file
    that cannot be read at all (not JSON, not UTF-8, missing) still raises: it holds no records to
    keep, and silently training without a whole dataset would change the stage's mixture.
    """
    root = Path(root)
    out = {}
    for spec in specs:
        for key in ("name", "kind", "path"):
            if key not in spec:
                raise DataFormatError(f"stage config: dataset entry {spec!r} is missing '{key}'")
        kind = spec["kind"]
        if kind not in BUILDERS:
            raise DataFormatError(f"stage config: dataset '{spec['name']}' has unknown kind {kind!r}; "
                                  f"expected one of {sorted(BUILDERS)}")
        before = skip_log.total if skip_log is not None else 0
        on_error = skip_log.reporter(spec["name"]) if skip_log is not None else None
        samples = BUILDERS[kind](root, spec, template, seed, on_error=on_error)
        if not samples:
            skipped = (skip_log.total - before) if skip_log is not None else 0
            raise DataFormatError(f"{root / spec['path']}: dataset '{spec['name']}' has no usable records"
                                  + (f" ({skipped} bad record(s) skipped)" if skipped else ""))
        out[spec["name"]] = samples
    return out


class MixtureSampler:
    """Stateless sampler: the j-th sample of global step s depends only on (seed, s, j).

    A dataset is drawn with probability proportional to its ratio (stage 4's mixture; a single
    dataset otherwise), then a record uniformly. Being stateless, the data position of a resumed run
    is just the step number, and each GPU of a multi-process run takes its slice of the global batch.
    """

    def __init__(self, datasets: dict[str, list[Sample]], ratios: dict[str, float], seed: int):
        self.names = list(datasets)
        self.datasets = datasets
        self.weights = [float(ratios.get(n, 1.0)) for n in self.names]
        self.seed = seed

    def sample(self, step: int, j: int) -> Sample:
        rng = _stable_rng(self.seed, step, j)
        name = rng.choices(self.names, self.weights)[0]
        data = self.datasets[name]
        return data[rng.randrange(len(data))]

    def batch(self, step: int, global_batch: int, rank: int = 0, world: int = 1) -> list[Sample]:
        per = global_batch // world
        return [self.sample(step, j) for j in range(rank * per, (rank + 1) * per)]
