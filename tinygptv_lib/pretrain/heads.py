"""The helpers that teach the ViT + Q-Former, and are thrown away afterwards.

BLIP-2 pretrained its Q-Former with a BERT text branch that shares the Q-Former's layers. Our
Q-Former (like TinyGPT-V's) has no text branch, so two small separate text towers stand in:

- `TextEncoder`: a bidirectional transformer over the caption; its first token is the text's
  embedding for the image-text contrastive loss (ITC).
- `CaptionDecoder`: a causal transformer that reads the 32 query outputs as a prefix and writes
  the text (image-grounded text generation, ITG). This is what makes the queries keep details.

Two more helpers that BLIP-2 does not have (see `vision_stage.py` for why):

- `SlotHead`: DETR-style set prediction, one object per query, read linearly (queries matched to
  objects on the predictions, or each tied to a fixed place, `anchor_points`).
- `PatchHead`: the colour and shape under every ViT patch token, read linearly.

Both read a *compact* vocabulary: the few hundred Phi-2 token ids the shapes world uses (row 0 is
padding, 1 starts a text, 2 ends it, 3 stands for any id outside the list, 4 starts a scene
sheet instead of a description). A 51,200-row softmax for a throw-away decoder would cost far
more than the towers being taught.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PAD, START, END, UNK, SHEET = 0, 1, 2, 3, 4
SPECIALS = 5


class CompactVocab:
    """Phi-2 token ids <-> rows of the small embedding tables."""

    def __init__(self, token_ids: list[int]):
        self.token_ids = sorted(set(int(t) for t in token_ids))
        self.row = {t: SPECIALS + i for i, t in enumerate(self.token_ids)}

    def __len__(self) -> int:
        return SPECIALS + len(self.token_ids)

    def encode(self, phi_ids: list[int]) -> list[int]:
        return [self.row.get(t, UNK) for t in phi_ids]

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(self.token_ids, dtype=torch.long)


def pad_rows(rows: list[list[int]], max_len: int) -> torch.Tensor:
    """Right-pad (and cut) lists of ids to one (B, T) tensor filled with PAD."""
    T = min(max_len, max(len(r) for r in rows))
    out = torch.full((len(rows), T), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        r = r[:T]
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _embedding(rows: int, width: int) -> nn.Embedding:
    """GPT-style small init: the decoder's output layer is this table too (N(0, 1) logits would explode)."""
    emb = nn.Embedding(rows, width)
    nn.init.normal_(emb.weight, std=0.02)
    return emb


def _layer(width: int, heads: int) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                      activation="gelu", batch_first=True, norm_first=True)


class TextEncoder(nn.Module):
    """ids (B, T) -> one embedding per text (B, width): the output at the START token."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, max_len: int):
        super().__init__()
        self.embed = _embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(1, max_len + 1, width))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.TransformerEncoder(_layer(width, heads), layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = F.pad(ids, (1, 0), value=START)
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        x = self.blocks(x, src_key_padding_mask=ids == PAD)
        return self.norm(x[:, 0])


def prefix_causal_mask(n_prefix: int, n_text: int, device=None) -> torch.Tensor:
    """True where attention is blocked: the prefix (queries) sees all of itself and no text; each
    text token sees the prefix and the text before it."""
    n = n_prefix + n_text
    allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    allowed[:n_prefix, :n_prefix] = True
    return ~allowed


class CaptionDecoder(nn.Module):
    """(queries (B, 32, q_width), ids (B, T)) -> logits (B, T - 1) for ids[:, 1:].

    ids[:, 0] says what to write (START: a description, SHEET: a scene sheet); it is read, not predicted.
    """

    def __init__(self, vocab_size: int, query_width: int, width: int, layers: int, heads: int, max_len: int):
        super().__init__()
        self.from_queries = nn.Linear(query_width, width)
        self.embed = _embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(1, max_len + 1, width))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.TransformerEncoder(_layer(width, heads), layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        inputs = ids[:, :-1]
        text = self.embed(inputs) + self.pos[:, : inputs.shape[1]]
        x = torch.cat([self.from_queries(queries), text], dim=1)
        q = queries.shape[1]
        pad = torch.cat([torch.zeros(ids.shape[0], q, dtype=torch.bool, device=ids.device), inputs == PAD], dim=1)
        x = self.blocks(x, mask=prefix_causal_mask(q, inputs.shape[1], ids.device), src_key_padding_mask=pad)
        return self.norm(x[:, q:]) @ self.embed.weight.T  # tied output embedding


def itc_logits(image_feats: torch.Tensor, text_feats: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """BLIP-2's image-text similarity: the best of the 32 queries for each text, over temperature.

    image_feats (B, Q, E) and text_feats (N, E), both L2-normalised -> (B, N).
    """
    sims = torch.einsum("bqe,ne->bnq", image_feats, text_feats)
    return sims.max(dim=-1).values / temp


def itc_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch: picture i belongs with text i."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def caption_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the caption decoder on the real (non-padding) tokens after the first."""
    targets = ids[:, 1:]
    keep = targets != PAD
    return F.cross_entropy(logits[keep], targets[keep])


# --------------------------------------------------------------------------- object slots (DETR-style)


class SlotHead(nn.Module):
    """Reads each query output on its own, linearly: is it an object, its colour, shape, size and box.

    Linear on purpose: in the later stages a linear projection is all that stands between the frozen
    queries and Phi, so what this head can read, the projection can pass on.
    """

    def __init__(self, query_width: int, n_colours: int, n_shapes: int, n_sizes: int):
        super().__init__()
        self.sizes = (1, n_colours, n_shapes, n_sizes, 4)
        self.proj = nn.Linear(query_width, sum(self.sizes))

    def forward(self, queries: torch.Tensor) -> dict[str, torch.Tensor]:
        obj, colour, shape, size, box = self.proj(queries).split(self.sizes, dim=-1)
        return {"object": obj.squeeze(-1), "colour": colour, "shape": shape, "size": size, "box": box.sigmoid()}


def match_greedy(cost: torch.Tensor) -> list[tuple[int, int]]:
    """(query, object) pairs for a (queries, objects) cost matrix: the cheapest pair first, repeatedly.

    DETR uses the optimal (Hungarian) matching; with at most five objects per picture the greedy one
    is nearly always the same and needs no extra package.
    """
    cost = cost.detach().clone()
    pairs = []
    for _ in range(min(cost.shape)):
        flat = int(cost.argmin())
        q, o = divmod(flat, cost.shape[1])
        pairs.append((q, o))
        cost[q, :] = float("inf")
        cost[:, o] = float("inf")
    return pairs


def anchor_points(n: int) -> torch.Tensor:
    """(n, 2) fixed places (x, y on 0..1), one per query: the n cells of the smallest square grid
    that has n cells besides its four corners, nearest the middle first, listed row by row.

    32 queries: a 6 x 6 grid less its corners. Far corners hold objects least often (an object's
    centre is at least half its size from the edge).
    """
    side = 1
    while side * side - 4 < n:
        side += 1
    mid = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    cells = torch.stack([mid.repeat(side), mid.repeat_interleave(side)], dim=1)  # row-major (x, y)
    keep = (cells - 0.5).norm(dim=1).argsort(stable=True)[:n].sort().values
    return cells[keep]


def slot_loss(pred: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]], box_weight: float = 5.0,
              anchors: torch.Tensor | None = None):
    """Set-prediction loss: match queries to objects, then classify and place the matched ones;
    every query also says whether it holds an object (so the number of objects can be read off).

    anchors (Q, 2): each object goes to the free query whose place is nearest its box centre, a
    matching that does not depend on the predictions; None: DETR's matching on the predictions
    (measured on the nano towers: the queries' colour read-out 0.55 with it, 0.94 with anchors once the
    ViT's tokens know their place, see `dense_stage.py`).
    """
    B, Q = pred["object"].shape
    is_object = torch.zeros(B, Q, device=pred["object"].device)
    matched_logits = {k: [] for k in ("colour", "shape", "size")}
    matched_labels = {k: [] for k in ("colour", "shape", "size")}
    boxes, true_boxes = [], []
    for b, t in enumerate(targets):
        if len(t["box"]) == 0:
            continue
        if anchors is not None:
            cost = torch.cdist(anchors.to(t["box"]), (t["box"][:, :2] + t["box"][:, 2:]) / 2)
        else:
            probs = {k: pred[k][b].softmax(-1) for k in ("colour", "shape", "size")}
            cost = -sum(probs[k][:, t[k]] for k in probs) + box_weight * torch.cdist(pred["box"][b], t["box"], p=1) / 4
        for q, o in match_greedy(cost):
            is_object[b, q] = 1.0
            for k in matched_logits:
                matched_logits[k].append(pred[k][b, q])
                matched_labels[k].append(t[k][o])
            boxes.append(pred["box"][b, q])
            true_boxes.append(t["box"][o])
    loss = F.binary_cross_entropy_with_logits(pred["object"], is_object)
    for k in matched_logits:
        loss = loss + F.cross_entropy(torch.stack(matched_logits[k]), torch.stack(matched_labels[k]))
    return loss + box_weight * F.l1_loss(torch.stack(boxes), torch.stack(true_boxes))


# --------------------------------------------------------------------------- patch labels (dense, on the ViT)


def patch_owner(boxes: torch.Tensor, grid: int, min_cover: float = 0.25) -> torch.Tensor:
    """(grid * grid,) index of the object each patch shows, -1 for background: the last-drawn object
    (the one on top) whose box covers at least `min_cover` of the patch. boxes: (n, 4) on 0..1."""
    edges = torch.arange(grid + 1, dtype=torch.float32) / grid
    x1, x2 = edges[:-1].repeat(grid), edges[1:].repeat(grid)  # row-major, like the ViT's patches
    y1, y2 = edges[:-1].repeat_interleave(grid), edges[1:].repeat_interleave(grid)
    owner = torch.full((grid * grid,), -1, dtype=torch.long)
    for i, box in enumerate(boxes):
        w = (torch.minimum(x2, box[2]) - torch.maximum(x1, box[0])).clamp(min=0)
        h = (torch.minimum(y2, box[3]) - torch.maximum(y1, box[1])).clamp(min=0)
        owner[w * h * grid * grid >= min_cover] = i
    return owner


def patch_labels(boxes: torch.Tensor, colours: torch.Tensor, shapes: torch.Tensor, grid: int,
                 min_cover: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """(colour, shape) label of every patch of a grid x grid image, 0 = background, for the object
    `patch_owner` gives it. colours, shapes: (n,) class indices -> two (grid * grid,) tensors."""
    owner = patch_owner(boxes, grid, min_cover)
    shown = owner >= 0
    colour = torch.zeros(grid * grid, dtype=torch.long)
    shape = torch.zeros(grid * grid, dtype=torch.long)
    colour[shown] = colours[owner[shown]] + 1
    shape[shown] = shapes[owner[shown]] + 1
    return colour, shape


class PatchHead(nn.Module):
    """Reads each ViT patch token linearly: the colour and shape of the object under it (or none)."""

    def __init__(self, width: int, n_colours: int, n_shapes: int):
        super().__init__()
        self.sizes = (n_colours + 1, n_shapes + 1)
        self.proj = nn.Linear(width, sum(self.sizes))

    def forward(self, patch_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(patch_tokens).split(self.sizes, dim=-1)


def patch_loss(head: PatchHead, patch_tokens: torch.Tensor, colour: torch.Tensor, shape: torch.Tensor):
    colour_logits, shape_logits = head(patch_tokens)
    return (F.cross_entropy(colour_logits.flatten(0, 1), colour.flatten())
            + F.cross_entropy(shape_logits.flatten(0, 1), shape.flatten()))
