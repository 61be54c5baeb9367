"""Pretraining the nano EVA ViT + Q-Former: BLIP-2's first-stage losses, plus two dense helpers.

EVA-CLIP's ViT and BLIP-2's Q-Former were trained before TinyGPT-V froze them; at nano size we
train ours on the shapes world, both at once (BLIP-2 kept its ViT frozen because EVA-CLIP had
already trained it; we have no such ViT). Four losses, summed:

- ITC (BLIP-2: image-text contrastive): the best-matching query of each picture must pick out its
  own caption among the batch's captions, and each caption its own picture.
- ITG (BLIP-2: image-grounded text generation): a small decoder reads the 32 query outputs and
  writes the picture's scene sheet or detailed description. Contrast alone only needs what tells
  pictures apart; writing the sheet needs every colour, shape, size, count and box.
- slots (not in BLIP-2; DETR's set prediction): a *linear* head must read one object per query -
  colour, shape, size, box - and say which queries hold none. Later stages read the frozen queries
  through a linear projection, so what a linear head can read off them is what Phi will get.
  Objects go to queries by DETR's matching on the predictions; `slot_anchors` ties each query to a
  fixed place instead (measured with the dense phase's box loss: far better queries, a worse
  course; the backbones' README, "Known limits").
- patches (not in BLIP-2; a stand-in for the years of pretraining behind EVA's ViT): a linear head
  names the colour and shape of the object under every patch token of the ViT. Dense labels
  reach the ViT directly instead of through the Q-Former, which speeds up a from-scratch ViT
  that has only minutes (measured: higher retrieval and colour accuracy at the same step count).

Every training picture is new (scene seeds come from the run seed and the step), rendered at
224 px like the course data, JPEG-encoded like the shipped files, then resized (bicubic) and
CLIP-normalised by the course's one image preprocessor. No flips: left and right matter.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TinyGPTVConfig
from ..data import world as W
from ..data.formats import encode_image, open_image
from ..data.images import preprocess
from ..model.qformer import QFormer
from ..model.vision import VisionTower
from . import heads as H
from . import texts as T
from .common import adamw, lr_at, set_lr

HELDOUT = "pretrain/heldout"  # held-out scenes: the same for every run seed, never trained on


@dataclass
class VisionSettings:
    steps: int = 500
    batch: int = 32
    lr: float = 8e-4
    warmup: int = 30
    weight_decay: float = 0.05
    embed_dim: int = 128  # ITC space (BLIP-2: 256)
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    decoder_width: int = 192
    decoder_layers: int = 3
    decoder_heads: int = 4
    max_text_len: int = 160
    caption_weight: float = 1.0
    sheet_share: float = 0.5  # captions that are scene sheets (the rest: detailed descriptions)
    slot_weight: float = 1.0
    slot_anchors: bool = False  # True: objects go to queries by fixed places (`heads.anchor_points`)
    patch_weight: float = 1.0
    render_size: int = 224  # the course's scenes are drawn at 224 px, then resized to the model's size
    grad_clip: float = 1.0


class ContrastiveHeads(nn.Module):
    """ITC's parts outside the Q-Former; BLIP-2 names: vision_proj, text_proj, temp."""

    def __init__(self, query_width: int, vocab_size: int, s: VisionSettings):
        super().__init__()
        self.vision_proj = nn.Linear(query_width, s.embed_dim)
        self.text_encoder = H.TextEncoder(vocab_size, s.text_width, s.text_layers, s.text_heads, s.max_text_len)
        self.text_proj = nn.Linear(s.text_width, s.embed_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))  # BLIP-2's initial temperature

    def image_feats(self, queries: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(queries), dim=-1)

    def text_feats(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_encoder(ids)), dim=-1)

    def logits(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return H.itc_logits(self.image_feats(queries), self.text_feats(ids), self.temp.clamp(0.001, 0.5))


class VisionPretrainer(nn.Module):
    """ViT + ln_vision + Q-Former (the parts that ship) and the ITC / ITG helpers (thrown away)."""

    def __init__(self, cfg: TinyGPTVConfig, vocab_size: int, s: VisionSettings):
        super().__init__()
        self.vision = VisionTower(cfg.vision)
        self.qformer = QFormer(cfg.qformer, encoder_width=cfg.vision.width)
        width = cfg.qformer.hidden_size
        self.contrastive = ContrastiveHeads(width, vocab_size, s)
        self.decoder = H.CaptionDecoder(vocab_size, width, s.decoder_width, s.decoder_layers, s.decoder_heads,
                                        s.max_text_len)
        self.slots = H.SlotHead(width, len(W.COLOURS), len(W.SHAPES), len(W.SIZES))
        self.patches = H.PatchHead(cfg.vision.width, len(W.COLOURS), len(W.SHAPES))
        self.grid = cfg.vision.img_size // cfg.vision.patch_size
        self.caption_weight = s.caption_weight
        self.slot_weight = s.slot_weight
        self.patch_weight = s.patch_weight
        self.anchors = H.anchor_points(cfg.qformer.num_query_tokens) if s.slot_anchors else None

    def queries(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.qformer(self.vision(pixels))

    def forward(self, pixels: torch.Tensor, itc_ids: torch.Tensor, cap_ids: torch.Tensor, objects: list,
                patch_colour: torch.Tensor, patch_shape: torch.Tensor) -> dict:
        feats = self.vision(pixels)
        q = self.qformer(feats)
        losses = {"itc": H.itc_loss(self.contrastive.logits(q, itc_ids)),
                  "itg": H.caption_loss(self.decoder(q, cap_ids), cap_ids)}
        if self.slot_weight:
            losses["slots"] = H.slot_loss(self.slots(q), objects, anchors=self.anchors)
        if self.patch_weight:
            losses["patches"] = H.patch_loss(self.patches, feats[:, 1:], patch_colour, patch_shape)
        weights = {"itc": 1.0, "itg": self.caption_weight, "slots": self.slot_weight, "patches": self.patch_weight}
        return {"loss": sum(weights[k] * v for k, v in losses.items()), **losses}


# --------------------------------------------------------------------------- data


def scene_pixels(scene: W.Scene, img_size: int) -> torch.Tensor:
    """The picture as the later stages see it: JPEG (like the shipped files), bicubic, CLIP-normalised."""
    return preprocess(open_image(encode_image(scene.image, "jpg")), img_size)


def encode_text(tokenizer, vocab: H.CompactVocab, text: str) -> list[int]:
    return vocab.encode(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_caption(tokenizer, vocab: H.CompactVocab, text: str, sheet: bool) -> list[int]:
    """[SHEET or START] + text + [END]: the decoder is told which kind of text to write."""
    return [H.SHEET if sheet else H.START] + encode_text(tokenizer, vocab, text) + [H.END]


def make_batch(scenes: list[W.Scene], rngs: list[random.Random], img_size: int, tokenizer,
               vocab: H.CompactVocab, max_len: int, sheet_share: float = 0.5, patch_size: int = 14) -> dict:
    """Pixels, contrastive-text ids and caption ids (ending in END) for a list of scenes."""
    pixels = torch.stack([scene_pixels(s, img_size) for s in scenes])
    itc = [encode_text(tokenizer, vocab, T.contrastive_text(s)) for s in scenes]
    cap = [encode_caption(tokenizer, vocab, text, sheet)
           for sheet, text in (T.caption_target(s, r, sheet_share) for s, r in zip(scenes, rngs))]
    objects = [object_targets(s) for s in scenes]
    grid = img_size // patch_size
    labels = [H.patch_labels(o["box"], o["colour"], o["shape"], grid) for o in objects]
    return {"pixels": pixels, "itc_ids": H.pad_rows(itc, max_len), "cap_ids": H.pad_rows(cap, max_len),
            "objects": objects, "patch_colour": torch.stack([c for c, _ in labels]),
            "patch_shape": torch.stack([s for _, s in labels])}


def object_targets(scene: W.Scene) -> dict[str, torch.Tensor]:
    """Class indices and boxes (x1, y1, x2, y2 on 0..1) of a scene's objects, for the slot loss."""
    objs = scene.objects
    return {"colour": torch.tensor([list(W.COLOURS).index(o.colour) for o in objs]),
            "shape": torch.tensor([W.SHAPES.index(o.kind) for o in objs]),
            "size": torch.tensor([list(W.SIZES).index(o.size) for o in objs]),
            "box": torch.tensor([[o.bbox[0] / scene.width, o.bbox[1] / scene.height, o.bbox[2] / scene.width,
                                  o.bbox[3] / scene.height] for o in objs], dtype=torch.float32)}


def training_scenes(seed: int, step: int, batch: int, size: int) -> tuple[list[W.Scene], list[random.Random]]:
    """The scenes of one training step (a pure function of seed and step) and a text rng for each."""
    seeds = [W.derive_seed(seed, "pretrain/vision", step, i) for i in range(batch)]
    return [W.make_scene(s, size) for s in seeds], [random.Random(s) for s in seeds]


def heldout_scenes(n: int, size: int = 224) -> list[W.Scene]:
    return [W.make_scene(W.derive_seed(HELDOUT, i), size) for i in range(n)]


def build_vocab(tokenizer, n_scenes: int = 600) -> H.CompactVocab:
    """Every Phi-2 token the vision texts use, from a fixed set of scenes (the same for every seed),
    plus the box numbers 0..100 and every word of the world's vocabulary."""
    ids: set[int] = set()

    def add(text: str) -> None:
        ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])

    for i in range(n_scenes):
        scene = W.make_scene(W.derive_seed("pretrain/vocab", i), 224)
        for text in (T.contrastive_text(scene), T.scene_sheet(scene), W.detailed_description(scene)):
            add(text)
    add(" ".join(f"{{<{a}><{a}><{a}><{a}>}}" for a in range(101)))
    for words in (W.SHAPES, W.COLOURS, W.BACKGROUNDS, W.WORDS, W.NUMBER_WORDS, W.SIZES):
        for w in words:
            add(f"a {w} {w}s, {w}.")
    return H.CompactVocab(sorted(ids))


# --------------------------------------------------------------------------- training


def _to(x, device):
    if isinstance(x, list):
        return [{k: v.to(device) for k, v in d.items()} for d in x]
    return x.to(device)


def train_vision(cfg: TinyGPTVConfig, s: VisionSettings, seed: int, tokenizer, vocab: H.CompactVocab,
                 on_step=None, device: str = "cpu",
                 vision: VisionTower | None = None) -> tuple[VisionPretrainer, list[dict]]:
    """Train for `s.steps` steps; returns the model and the per-step losses.

    `vision`: a ViT to start from (the dense phase's, `dense_stage.py`); else it starts from random.

    The Q-Former's dropout stays off (eval mode while training): every picture is new, so there is
    nothing to over-fit, and dropout would only slow a run this short.
    """
    model = VisionPretrainer(cfg, len(vocab), s)
    if vision is not None:
        model.vision.load_state_dict(vision.state_dict())
    model = model.to(device)
    model.eval()
    opt = adamw(model, s.lr, s.weight_decay)
    history = []
    for step in range(s.steps):
        scenes, rngs = training_scenes(seed, step, s.batch, s.render_size)
        batch = make_batch(scenes, rngs, cfg.vision.img_size, tokenizer, vocab, s.max_text_len, s.sheet_share,
                           cfg.vision.patch_size)
        batch = {k: _to(v, device) for k, v in batch.items()}
        set_lr(opt, lr_at(step, s.steps, s.lr, s.warmup))
        out = model(**batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        history.append({k: round(v.item(), 5) for k, v in out.items()})
        if on_step is not None:
            on_step(history[-1])
    return model.cpu(), history
