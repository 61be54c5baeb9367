"""Pretraining the nano Phi as a causal language model on the shapes world's text.

Phi-2 had read 1.4 trillion tokens before TinyGPT-V used it; the nano Phi reads a few hundred
thousand, all about the shapes world, in the layouts of the later stages (see `texts.py`). It is
our `TinyGPTVPhiForCausalLM` at the nano numbers with the real Phi-2 tokenizer, so its file is a
`microsoft/phi-2`-style folder that `load_phi2` reads like the real one.

Two phases, one function (`train_language`): the first (`LanguageSettings()`) from scratch on every
layout, every token a target; the second, the reading phase (`reading_settings()`), on from the
first's Phi with lookup drills added and the facts in the image slot read but not predicted.

TinyGPT-V's added norms (q_layernorm, k_layernorm, post_layernorm) stay frozen at identity here:
Phi-2 never trained them either. The nano Phi still computes *with* them (a QK-norm and an RMSNorm
whose weights are 1), so TinyGPT-V's later stages start from exactly the function pretrained here.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import TinyGPTVConfig
from ..data import world as W
from ..model.phi import build_phi
from ..weights.phi2 import ADDED_NORM
from . import texts as T
from .common import adamw, lr_at, set_lr

HELDOUT = "pretrain/heldout-lm"


@dataclass
class LanguageSettings:
    steps: int = 3500
    batch: int = 16
    lr: float = 1.5e-3
    warmup: int = 20
    weight_decay: float = 0.05
    max_len: int = 256
    context_share: float = 0.8  # documents whose image slot holds the scene's facts as text
    grad_clip: float = 1.0
    corpus_softmax: bool = True  # a sampled softmax: the corpus's tokens + random others (lm_loss)
    kinds: tuple[float, ...] = (2, 1, 5, 2, 0)  # weights of texts.KINDS: caption, detail, task, chat, drill
    fact_loss: bool = True  # also predict the facts in the image slot (they are image embeddings later)
    stream: str = "pretrain/lm"  # names the documents' seeds: each phase reads documents of its own


def reading_settings() -> LanguageSettings:
    """Phi's second phase, on from the first: a third of its documents are lookup drills (6-10 short
    [vqa] / [refer] / [identify] turns about one sheet), the facts in the slot are read but not
    predicted, a lower peak learning rate, documents of its own."""
    return LanguageSettings(steps=3000, lr=1e-3, kinds=(2, 1, 3, 2, 4), fact_loss=False, stream="pretrain/lm-reading")


Doc = tuple[list[int], list[bool]]  # token ids (BOS first) and, per token, whether it is a loss target


def document(tokenizer, scene_seed: int, s: LanguageSettings) -> Doc:
    """One tokenized document about the scene of `scene_seed`, with its loss targets: every token
    but the first and, unless `s.fact_loss`, but the facts in the image slot."""
    scene = W.make_scene(scene_seed, 224)
    pieces = T.lm_document(scene, random.Random(scene_seed), s.context_share, tuple(s.kinds))
    ids, target = T.tokenize_with_targets(tokenizer, pieces)
    if s.fact_loss:
        target = [False] + [True] * (len(ids) - 1)
    return ids[: s.max_len], target[: s.max_len]


def training_documents(tokenizer, seed: int, step: int, s: LanguageSettings) -> list[Doc]:
    return [document(tokenizer, W.derive_seed(seed, s.stream, step, i), s) for i in range(s.batch)]


def heldout_documents(tokenizer, n: int, s: LanguageSettings) -> list[Doc]:
    """Documents about held-out scenes: the same for every run seed, never trained on."""
    return [document(tokenizer, W.derive_seed(HELDOUT, i), s) for i in range(n)]


def pad_documents(docs: list[Doc], pad_id: int = 50256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, target mask), right-padded; padding is neither attended to nor a target."""
    T_ = max(len(ids) for ids, _ in docs)
    ids = torch.full((len(docs), T_), pad_id, dtype=torch.long)
    mask = torch.zeros((len(docs), T_), dtype=torch.long)
    target = torch.zeros((len(docs), T_), dtype=torch.bool)
    for i, (d, t) in enumerate(docs):
        ids[i, : len(d)] = torch.tensor(d)
        mask[i, : len(d)] = 1
        target[i, : len(t)] = torch.tensor(t)
    return ids, mask, target


def lm_loss(phi, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor | None = None,
            vocab: torch.Tensor | None = None, negatives: int = 2048) -> torch.Tensor:
    """Next-token loss on the target tokens only (`target`; default: every real token): the output
    layer never runs on padding or on the facts in the image slot.

    `vocab` (sorted token ids): a sampled softmax. The shapes world writes with a few hundred of
    Phi-2's 51,200 tokens, and the full output layer cost 80% of a step. So the softmax runs over
    those tokens (and the batch's own targets) plus `negatives` rows drawn at random from the rest,
    whose logits are raised by log(rest / negatives): their sum of exponentials then estimates the
    whole rest's, so the loss keeps the full softmax's scale (a trained token must beat 50,000
    untrained ones, not only its few hundred rivals) at a twentieth of the cost.
    """
    hidden = phi.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    where = (mask if target is None else target)[:, 1:].bool()
    return sampled_loss(phi.lm_head, hidden[:, :-1][where], ids[:, 1:][where], vocab, negatives)


def sampled_loss(head, h: torch.Tensor, targets: torch.Tensor, vocab: torch.Tensor | None = None,
                 negatives: int = 2048) -> torch.Tensor:
    """Cross-entropy of the output layer `head` on hidden states `h` (N, width): over the whole
    vocabulary, or with `vocab` the sampled softmax described in `lm_loss`."""
    if vocab is None:
        return F.cross_entropy(head(h).float(), targets)
    rows = torch.unique(torch.cat([vocab, targets]))  # sorted
    rest = torch.ones(head.out_features, dtype=torch.bool)
    rest[rows] = False
    rest = rest.nonzero().squeeze(1)
    drawn = rest[torch.randperm(len(rest))[:negatives]]
    picked = torch.cat([rows, drawn])
    logits = F.linear(h, head.weight[picked], None if head.bias is None else head.bias[picked]).float()
    correction = torch.zeros(len(picked))
    correction[len(rows):] = math.log(len(rest) / max(1, len(drawn)))
    return F.cross_entropy(logits + correction, torch.searchsorted(rows, targets))


def corpus_vocab(tokenizer, s: LanguageSettings, n_docs: int = 400) -> torch.Tensor:
    """Sorted ids of every token in a fixed set of documents (the same for every run seed) and in
    the box numbers 0..100 and the world's words."""
    ids: set[int] = set()
    for i in range(n_docs):
        ids.update(document(tokenizer, W.derive_seed("pretrain/lm-vocab", i), s)[0])
    words = [*W.SHAPES, *W.COLOURS, *W.BACKGROUNDS, *W.WORDS, *W.NUMBER_WORDS, *W.SIZES]
    for text in (" ".join(f"{{<{a}><{a}><{a}><{a}>}}" for a in range(101)), *(f"a {w} {w}s, {w}." for w in words)):
        ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return torch.tensor(sorted(ids))


def freeze_added_norms(phi) -> None:
    """Keep TinyGPT-V's added norms at identity (they are not part of Phi-2)."""
    for name, p in phi.named_parameters():
        if ADDED_NORM.fullmatch(f"phi.{name}"):
            p.requires_grad_(False)


def train_language(cfg: TinyGPTVConfig, s: LanguageSettings, seed: int, tokenizer, on_step=None, phi=None):
    """Train the nano Phi for `s.steps` steps, from scratch or on from `phi`; returns it and the
    per-step losses.

    Dropout stays off (eval mode while training): every document is new, nothing can be over-fitted.
    """
    phi = build_phi(cfg.phi) if phi is None else phi
    freeze_added_norms(phi)
    phi.eval()
    opt = adamw(phi, s.lr, s.weight_decay)
    vocab = corpus_vocab(tokenizer, s) if s.corpus_softmax else None
    history = []
    for step in range(s.steps):
        ids, mask, target = pad_documents(training_documents(tokenizer, seed, step, s))
        set_lr(opt, lr_at(step, s.steps, s.lr, s.warmup))
        loss = lm_loss(phi, ids, mask, target, vocab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in phi.parameters() if p.requires_grad], s.grad_clip)
        opt.step()
        history.append({"loss": round(loss.item(), 5)})
        if on_step is not None:
            on_step(history[-1])
    return phi, history
