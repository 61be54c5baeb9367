"""Phi's third phase, seeing: the image slot holds the frozen towers' 32 queries, not text.

The first two phases teach Phi to answer from a *text* sheet in the image slot (about 15 tokens an
object). The course then has 150 steps to make 32 query vectors readable in its place, and the
measured limit was Phi, not the queries: queries that name an object's colour 94 % of the time
(linear read-out) gave a worse course than the shipped ones, because Phi could not learn to read
one object packed into one vector in that time.

So this phase does, once, what the long pretraining of a real LLM plus MiniGPT-4's alignment stand
for: the documents of the language phase, with the image slot filled by the queries of the scene's
picture through a throw-away projection (`Projection`, the course's own shape), Phi and that
projection trained together. The projection is kept apart (`seeing_projection.safetensors`) to
measure what Phi reads, never loaded by the course: stage 1 still learns both projections from
random (TinyGPT-V starts the first from MiniGPT-4's, which nano lacks). The towers stay frozen; their queries are what the course will feed.

Documents in the stage-4 layout (`[INST] ...`) show the picture at twice the towers' size, as the
course's stage 4 does; captions and stage-3 descriptions at the towers' size. Three sub-phases: the
first on every layout, the second on drills (`texts.DRILL_WEIGHTS`) with "unanswerable" lookups
all but removed: from queries, Phi had answered questions like "What colour is the square?"
about a square in the picture with "unanswerable" (or a colour not in it) in 39 of its 70 misses of
151 (measured 2026-11-27). The third drills on, asking colours and boxes twice as often
(`FOCUS_DRILLS`): after the second, Phi still named another object's colour in most misses, and
the lookup came late and suddenly: continuing the shipped second sub-phase this way, Phi's own
reading of 100 held-out scenes (224 px) went colour 0.72 -> 0.72 -> 0.81 -> 0.93 -> 0.95 at
0 / 400 / 800 / 1,200 / 1,600 steps (shape 0.92 -> 0.94, count 0.63 -> 0.72, boxes 0.08 -> 0.13;
measured 2026-11-28).
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

import torch

from ..data import world as W
from ..data.images import preprocess
from ..model.sequence import IMAGE_SLOT, TextBatch
from . import texts as T
from .common import adamw, lr_at, set_lr
from .language_stage import LanguageSettings, corpus_vocab, freeze_added_norms, sampled_loss

# The third sub-phase's drills (texts.DRILL_WEIGHTS: colour, shape, count, refer 3, the rest 1).
FOCUS_DRILLS = {"colour": 6, "refer": 6, "count": 3, "shape": 2, "unanswerable": 0.001}

SLOT = IMAGE_SLOT  # where a document's image goes (32 positions); `model.embed` splices the queries in


@dataclass
class SeeingSettings:
    steps: int = 1200  # the first sub-phase: every layout
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.05
    max_len: int = 256
    grad_clip: float = 1.0
    kinds: tuple[float, ...] = (2, 1, 4, 2, 4)  # texts.KINDS: caption, detail, task, chat, drill
    drill_steps: int = 800  # the second sub-phase: mostly drills, on from the first
    drill_lr: float = 5e-4
    drill_kinds: tuple[float, ...] = (1, 0, 2, 1, 8)
    drill_unanswerable: float = 0.001  # weight of "unanswerable" lookups in its drills (DRILL_WEIGHTS: 1)
    focus_steps: int = 1600  # the third sub-phase: drills that ask mostly for colours and boxes
    focus_lr: float = 5e-4
    focus_kinds: tuple[float, ...] = (1, 0, 2, 1, 8)
    focus_drills: dict = field(default_factory=lambda: dict(FOCUS_DRILLS))  # changes to texts.DRILL_WEIGHTS
    stream: str = "pretrain/see"

    @property
    def total_steps(self) -> int:
        return self.steps + self.drill_steps + self.focus_steps


def document(tokenizer, scene_seed: int, kinds, drill_weights: dict | None = None, max_len: int = 256):
    """(scene, ids, targets, stage-4 layout?): a language-phase document whose image slot is SLOT x 32."""
    scene = W.make_scene(scene_seed, 224)
    pieces = T.lm_document(scene, random.Random(scene_seed), 1.0, tuple(kinds), drill_weights=drill_weights)
    ids, target = T.tokenize_with_targets(tokenizer, pieces, facts_ids=[SLOT] * 32)
    wide = any(isinstance(p, str) and "[INST]" in p for p in pieces)
    return scene, ids[:max_len], target[:max_len], wide


def train_seeing(model, s: SeeingSettings, seed: int, tokenizer, on_step=None) -> list[dict]:
    """Train `model.phi` (its added norms stay at identity) and `model.projection` on documents whose
    image slot holds the frozen towers' queries; returns the per-step losses."""
    model.requires_grad_(False)
    model.projection.requires_grad_(True)
    model.phi.requires_grad_(True)
    freeze_added_norms(model.phi)
    model.eval()  # no dropout: every document is new
    size = model.cfg.vision.img_size
    wide_vision = copy.deepcopy(model.vision)
    wide_vision.set_image_size(2 * size)
    n_query = model.cfg.qformer.num_query_tokens
    params = [p for p in model.parameters() if p.requires_grad]
    history = []
    phases = ((s.steps, s.lr, s.kinds, None, s.stream),
              (s.drill_steps, s.drill_lr, s.drill_kinds, {"unanswerable": s.drill_unanswerable}, s.stream + "-drills"),
              (s.focus_steps, s.focus_lr, s.focus_kinds, s.focus_drills, s.stream + "-focus"))
    for steps, peak, kinds, weights, stream in phases:
        if not steps:
            continue
        opt = adamw(model, peak, s.weight_decay)
        vocab = corpus_vocab(tokenizer, LanguageSettings(kinds=kinds, fact_loss=False))
        for step in range(steps):
            docs = [document(tokenizer, W.derive_seed(seed, stream, step, i), kinds, weights, s.max_len)
                    for i in range(s.batch)]
            width = max(len(d[1]) for d in docs)
            ids = torch.full((len(docs), width), 50256)
            mask = torch.zeros((len(docs), width), dtype=torch.long)
            target = torch.zeros((len(docs), width), dtype=torch.bool)
            for i, (_, d, t, _) in enumerate(docs):
                ids[i, : len(d)], mask[i, : len(d)], target[i, : len(t)] = torch.tensor(d), 1, torch.tensor(t)
            queries = torch.zeros(len(docs), n_query, model.cfg.qformer.hidden_size)
            with torch.no_grad():
                for wide, vision in ((False, model.vision), (True, wide_vision)):
                    rows = [i for i, d in enumerate(docs) if d[3] == wide]
                    if rows:
                        px = torch.stack([preprocess(W.render(docs[i][0]), 2 * size if wide else size) for i in rows])
                        queries[rows] = model.qformer(vision(px))
            embeds = model.embed(TextBatch(ids, mask, ids, torch.ones(len(docs), dtype=torch.bool)), queries=queries)
            set_lr(opt, lr_at(step, steps, peak, s.warmup))
            hidden = model.phi.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
            where = target[:, 1:]
            loss = sampled_loss(model.phi.lm_head, hidden[:, :-1][where], ids[:, 1:][where], vocab)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            opt.step()
            history.append({"loss": round(loss.item(), 5)})
            if on_step is not None:
                on_step(history[-1])
    return history
