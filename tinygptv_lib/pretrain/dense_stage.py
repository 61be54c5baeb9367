"""A first, cheaper phase for the from-scratch nano ViT: dense labels on its own patch tokens.

EVA's ViT came to BLIP-2 after a long pretraining of its own; ours starts from random weights, and
the BLIP-2 losses alone (which reach the ViT only through the Q-Former) leave it hardly able to
tell a hexagon from a circle after the few hundred steps a laptop affords (measured: a linear
read-out of the queries named the shape 20% of the time, chance 17%). So before the Q-Former joins,
the ViT trains alone, three times cheaper a step, on labels that sit on its patch tokens:

- colour: every patch names the colour of the object covering it (or "background");
- shape: the patch under each object's centre names its shape; background patches say
  "background"; the other patches of an object are not asked (their pixels may be all one colour);
- object: the mean of the tokens inside each object's box names its colour, shape and size through
  a linear head, so an object's edge patches (where its shape shows) must carry what it is;
- box (off in the shipped recipe, `box_weight`): every patch that shows an object names that
  object's box (x1, y1, x2, y2 in the view, through a linear head and a sigmoid). Without it the
  tokens hardly know where they are (measured: a linear probe named the column of an object's patch
  20% of the time, chance 12.5%, and its box at IoU > 0.5 3% of the time); with it 75% and 51%
  after 1,000 steps. With queries tied to places (`VisionSettings.slot_anchors`) it made far
  better queries, but a worse course: see the backbones' README, "Known limits".

Half of the pictures are the whole 224 px scene shrunk to the ViT's size (what stages 1-3 see) and
half a native-resolution crop of it (objects as large, in patches, as stage 4 shows them at twice
the size): the ViT learns both scales. Every picture is new; crops come from the run seed and step.
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
from ..model.vision import VisionTower
from .common import adamw, lr_at, set_lr
from .heads import patch_labels, patch_owner

COLOURS, SIZES = list(W.COLOURS), list(W.SIZES)


@dataclass
class DenseSettings:
    steps: int = 4000  # 0 skips the phase (the ViT then starts the BLIP-2 phase from random weights)
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 30
    weight_decay: float = 0.05
    crop_share: float = 0.5  # share of pictures that are native-resolution crops (stage 4's scale)
    grad_clip: float = 1.0
    box_weight: float = 0.0  # the per-patch box loss (0: left out, as in the shipped ViT; measured at 5)


class DenseHeads(nn.Module):
    """Linear read-outs of the patch tokens (thrown away after the phase)."""

    def __init__(self, width: int, box: bool = False):
        super().__init__()
        self.sizes = (len(COLOURS) + 1, len(W.SHAPES) + 1)
        self.patch = nn.Linear(width, sum(self.sizes))
        self.object = nn.Linear(width, len(COLOURS) + len(W.SHAPES) + len(SIZES))
        self.box = nn.Linear(width, 4) if box else None


@dataclass
class View:
    """One training picture: pixels and its objects in view coordinates (0..1)."""
    pixels: torch.Tensor
    boxes: torch.Tensor  # (n, 4) x1, y1, x2, y2, clipped to the view
    centres: torch.Tensor  # (n, 2) x, y; outside 0..1 when the centre is out of view
    colour: torch.Tensor
    shape: torch.Tensor
    size: torch.Tensor


def make_view(scene: W.Scene, img_size: int, crop: random.Random | None) -> View:
    """The scene as stages 1-3 see it (crop=None) or a native-resolution img_size crop at a random place."""
    image = open_image(encode_image(scene.image, "jpg"))
    x0 = y0 = 0
    span_x, span_y = scene.width, scene.height
    if crop is not None:
        x0, y0 = crop.randint(0, scene.width - img_size), crop.randint(0, scene.height - img_size)
        image = image.crop((x0, y0, x0 + img_size, y0 + img_size))
        span_x = span_y = img_size
    objs = scene.objects
    raw = torch.tensor([[(o.bbox[0] - x0) / span_x, (o.bbox[1] - y0) / span_y, (o.bbox[2] - x0) / span_x,
                         (o.bbox[3] - y0) / span_y] for o in objs], dtype=torch.float32)
    return View(pixels=preprocess(image, img_size), boxes=raw.clamp(0, 1),
                centres=torch.stack([(raw[:, 0] + raw[:, 2]) / 2, (raw[:, 1] + raw[:, 3]) / 2], dim=1),
                colour=torch.tensor([COLOURS.index(o.colour) for o in objs]),
                shape=torch.tensor([W.SHAPES.index(o.kind) for o in objs]),
                size=torch.tensor([SIZES.index(o.size) for o in objs]))


def centre_patch(centre: torch.Tensor, grid: int) -> int | None:
    """Row-major index of the patch under a centre (x, y on 0..1), None when it is out of view."""
    x, y = centre.tolist()
    if not (0 <= x < 1 and 0 <= y < 1):
        return None
    return int(y * grid) * grid + int(x * grid)


def view_labels(view: View, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch colour labels (0 = background) and centre-patch shape labels (-100 = not asked)."""
    colour, shape = patch_labels(view.boxes, view.colour, view.shape, grid)
    shape = torch.where(shape > 0, torch.full_like(shape, -100), shape)
    for c, s in zip(view.centres, view.shape):
        k = centre_patch(c, grid)
        if k is not None:
            shape[k] = s + 1
    return colour, shape


def box_mask(box: torch.Tensor, grid: int) -> torch.Tensor:
    """(grid * grid,) bool: patches whose centre lies inside the box (at least the one nearest its centre)."""
    mid = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    inside_x = (mid >= box[0]) & (mid <= box[2])
    inside_y = (mid >= box[1]) & (mid <= box[3])
    mask = (inside_y[:, None] & inside_x[None, :]).flatten()
    if not mask.any():
        cx, cy = ((box[0] + box[2]) / 2).clamp(0, 0.999), ((box[1] + box[3]) / 2).clamp(0, 0.999)
        mask[int(cy * grid) * grid + int(cx * grid)] = True
    return mask


def dense_loss(heads: DenseHeads, tokens: torch.Tensor, views: list[View], grid: int) -> dict[str, torch.Tensor]:
    """tokens: (B, grid * grid, width) patch tokens (no CLS)."""
    labels = [view_labels(v, grid) for v in views]
    colour_logits, shape_logits = heads.patch(tokens).split(heads.sizes, dim=-1)
    patch = (F.cross_entropy(colour_logits.flatten(0, 1), torch.stack([c for c, _ in labels]).flatten())
             + F.cross_entropy(shape_logits.flatten(0, 1), torch.stack([s for _, s in labels]).flatten(),
                               ignore_index=-100))
    pooled, targets = [], []
    for b, v in enumerate(views):
        for i in range(len(v.shape)):
            if centre_patch(v.centres[i], grid) is not None:
                pooled.append(tokens[b][box_mask(v.boxes[i], grid)].mean(0))
                targets.append((v.colour[i], v.shape[i], v.size[i]))
    nc, ns = len(COLOURS), len(W.SHAPES)
    logits = heads.object(torch.stack(pooled))
    obj = (F.cross_entropy(logits[:, :nc], torch.stack([t[0] for t in targets]))
           + F.cross_entropy(logits[:, nc:nc + ns], torch.stack([t[1] for t in targets]))
           + F.cross_entropy(logits[:, nc + ns:], torch.stack([t[2] for t in targets])))
    losses = {"patch": patch, "object": obj}
    if heads.box is not None:  # L1 between every object patch's box and its object's
        predicted = heads.box(tokens).sigmoid()
        owners = [patch_owner(v.boxes, grid) for v in views]
        boxes = torch.cat([predicted[b][o >= 0] for b, o in enumerate(owners)])
        true_boxes = torch.cat([v.boxes[o[o >= 0]] for v, o in zip(views, owners)])
        losses["box"] = F.l1_loss(boxes, true_boxes) if len(boxes) else predicted.sum() * 0
    return losses


def training_views(seed: int, step: int, s: DenseSettings, img_size: int, render_size: int = 224) -> list[View]:
    views = []
    for i in range(s.batch):
        scene_seed = W.derive_seed(seed, "pretrain/dense", step, i)
        rng = random.Random(scene_seed)
        crop = rng if rng.random() < s.crop_share else None
        views.append(make_view(W.make_scene(scene_seed, render_size), img_size, crop))
    return views


def train_dense(cfg: TinyGPTVConfig, s: DenseSettings, seed: int, on_step=None,
                device: str = "cpu") -> tuple[VisionTower, list[dict]]:
    """A ViT (with ln_vision) trained from scratch on dense labels; returns it and the per-step losses."""
    vision = VisionTower(cfg.vision).to(device)
    heads = DenseHeads(cfg.vision.width, box=s.box_weight > 0).to(device)
    model = nn.ModuleDict({"vision": vision, "heads": heads}).train()
    opt = adamw(model, s.lr, s.weight_decay)
    grid = cfg.vision.img_size // cfg.vision.patch_size
    history = []
    for step in range(s.steps):
        views = training_views(seed, step, s, cfg.vision.img_size)
        pixels = torch.stack([v.pixels for v in views]).to(device)
        set_lr(opt, lr_at(step, s.steps, s.lr, s.warmup))
        tokens = vision(pixels)[:, 1:].cpu()  # the labels are built on the CPU
        losses = dense_loss(heads, tokens, views, grid)
        loss = losses["patch"] + losses["object"] + s.box_weight * losses.get("box", 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        history.append({"loss": round(loss.item(), 5), **{k: round(v.item(), 5) for k, v in losses.items()}})
        if on_step is not None:
            on_step(history[-1])
    return vision.cpu().eval(), history

