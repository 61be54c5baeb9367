"""EVA ViT-g weights: LAVIS' `eva_vit_g.pth` and Hugging Face's `Blip2VisionModel` layout.

LAVIS `eva_vit_g.pth` (flat dict, names as timm's `Eva`):
    cls_token, pos_embed [1, 1+16*16, 1408], patch_embed.proj.{weight,bias},
    blocks.{i}.{norm1, attn.qkv.weight, attn.q_bias, attn.v_bias, attn.proj, norm2, mlp.fc1, mlp.fc2}
    for i in 0..39. Both LAVIS and timm split the fused qkv output as (3, heads, head_dim) and use
    the bias (q_bias, 0, v_bias), so the tensors load 1:1.
Knowingly ignored (LAVIS' own loader drops them too, with `strict=False`):
    - blocks.{i} for i >= depth: the 40th block (BLIP-2 reads penultimate-layer features);
    - norm.*, fc_norm.*, head.*: the full ViT's final norm and classifier, unused (ln_vision, which
      comes with the Q-Former, plays the final norm's role);
    - mask_token and *.relative_position_index: pre-training leftovers that compute nothing here.
    Anything else (a relative position bias table, layer-scale gammas, ...) would change what the
    ViT computes, so it is an error rather than silently dropped.
The position embedding is resampled bicubically (align_corners=False, no antialias, in fp32, as
LAVIS' `interpolate_pos_embed`) when the model's image size differs: 16x16 -> 32x32 for 448 px.

Hugging Face `Blip2VisionModel` (`vision_model.` prefix in `Blip2ForConditionalGeneration`):
    embeddings.class_embedding, embeddings.patch_embedding, embeddings.position_embedding,
    encoder.layers.{i}.{layer_norm1, self_attn.qkv.weight, self_attn.q_bias, self_attn.v_bias,
    self_attn.projection, layer_norm2, mlp.fc1, mlp.fc2}, post_layernorm (= BLIP-2's ln_vision).
    transformers 5 saves one `self_attn.qkv.bias` instead of q_bias / v_bias: its q and v thirds
    are used; its k third is dropped, which is exact: a key bias adds the same number to every
    attention logit of a query, and softmax cancels it.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..config import VisionConfig
from .common import LoadReport, Mapped, apply_state_dict, resolve_source

ENCODER = "vision.encoder."
LN_VISION = "vision.ln_vision."

_BLOCK_PARTS_LAVIS = {p: p for p in (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.proj.weight",
    "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
    "mlp.fc2.bias")}
_BLOCK_PARTS_HF = {
    "layer_norm1.weight": "norm1.weight", "layer_norm1.bias": "norm1.bias",
    "self_attn.qkv.weight": "attn.qkv.weight", "self_attn.q_bias": "attn.q_bias",
    "self_attn.v_bias": "attn.v_bias", "self_attn.projection.weight": "attn.proj.weight",
    "self_attn.projection.bias": "attn.proj.bias", "layer_norm2.weight": "norm2.weight",
    "layer_norm2.bias": "norm2.bias", "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_LAYOUTS = {
    # layout: (block regex, block part table, fused-bias part, {top-level source name: our name}, ignored regex)
    "lavis": (re.compile(r"blocks\.(\d+)\.(.+)"), _BLOCK_PARTS_LAVIS, "attn.qkv.bias",
              {"cls_token": "cls_token", "pos_embed": "pos_embed", "patch_embed.proj.weight": "patch_embed.proj.weight",
               "patch_embed.proj.bias": "patch_embed.proj.bias"},
              re.compile(r"(norm|fc_norm|head)\.(weight|bias)|mask_token|(.+\.)?relative_position_index")),
    "hf": (re.compile(r"encoder\.layers\.(\d+)\.(.+)"), _BLOCK_PARTS_HF, "self_attn.qkv.bias",
           {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
            "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
            "embeddings.patch_embedding.bias": "patch_embed.proj.bias"},
           re.compile(r"embeddings\.position_ids")),
}


def resample_pos_embed(pos_embed: torch.Tensor, grid: int, where: str = "pos_embed") -> torch.Tensor:
    """[1, 1 + g*g, W] -> [1, 1 + grid*grid, W]: the CLS entry kept, the g x g grid resized bicubically."""
    n = pos_embed.shape[1] - 1
    old = math.isqrt(n)
    if old * old != n:
        raise ValueError(f"{where}: {n} position entries after the CLS token are not a square grid")
    if old == grid:
        return pos_embed
    cls_pos, patches = pos_embed[:, :1], pos_embed[:, 1:]
    width = pos_embed.shape[-1]
    patches = patches.float().reshape(1, old, old, width).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, width)
    return torch.cat([cls_pos.float(), patches], dim=1)


def map_eva(sd: Mapping[str, torch.Tensor], cfg: VisionConfig, layout: str = "lavis", prefix: str = "") -> Mapped:
    """Map EVA ViT keys under `prefix` (layout 'lavis' or 'hf') to `vision.encoder.*`.

    Blocks at or beyond `cfg.depth` are ignored; the position grid is resampled to
    `cfg.img_size // cfg.patch_size`. With layout 'hf', `post_layernorm` maps to `vision.ln_vision`.
    """
    block_re, parts, fused_bias, top, ignore_re = _LAYOUTS[layout]
    grid = cfg.img_size // cfg.patch_size
    out = Mapped()
    for key, t in sd.items():
        if not key.startswith(prefix):
            out.unmapped.append(key)
            continue
        k = key[len(prefix):]
        m = block_re.fullmatch(k)
        if m:
            i, part = int(m.group(1)), m.group(2)
            if i >= cfg.depth:
                out.ignored.append(key)  # the dropped last block(s)
            elif part in parts:
                out.put(f"{ENCODER}blocks.{i}.{parts[part]}", t, key)
            elif part == fused_bias:  # one bias for q, k, v: keep q and v, drop k (softmax cancels it)
                q, _, v = t.chunk(3)
                out.put(f"{ENCODER}blocks.{i}.attn.q_bias", q, f"{key}[0:W]")
                out.put(f"{ENCODER}blocks.{i}.attn.v_bias", v, f"{key}[2W:3W]")
                out.ignored.append(f"{key}[W:2W] (key bias: no effect under softmax)")
            else:
                out.unmapped.append(key)
        elif k in top:
            if top[k] == "pos_embed":
                try:
                    t = resample_pos_embed(t, grid, key)
                except ValueError as e:
                    out.problems.append(str(e))
                    continue
            out.put(ENCODER + top[k], t, key)
        elif layout == "hf" and k in ("post_layernorm.weight", "post_layernorm.bias"):
            out.put(LN_VISION + k.split(".")[-1], t, key)
        elif ignore_re.fullmatch(k):
            out.ignored.append(key)
        else:
            out.unmapped.append(key)
    return out


def detect_vision_layout(keys) -> tuple[str, str]:
    """(layout, prefix) of the EVA weights among `keys`."""
    keys = list(keys)
    if any(k.startswith("vision_model.") for k in keys):
        return "hf", "vision_model."
    if any(k.startswith("visual_encoder.") for k in keys):
        return "lavis", "visual_encoder."
    if any(k.startswith("embeddings.") or k.startswith("encoder.layers.") for k in keys):
        return "hf", ""
    return "lavis", ""


_OTHER_PARTS = ("language_model.", "language_projection.", "qformer.", "Qformer.", "query_tokens", "t5_model.",
                "opt_model.", "llm_model.")


def load_eva_vit(model, source, *, assign: bool | None = None) -> LoadReport:
    """Load the EVA ViT of `model` (`vision.encoder.*`) from LAVIS `eva_vit_g.pth`, from a
    Hugging Face BLIP-2 file or folder (`vision_model.*`, whose `post_layernorm` also fills
    `vision.ln_vision`), or from a LAVIS BLIP-2 checkpoint that contains `visual_encoder.*`.

    `source` is a path or an in-memory state dict. Every `vision.encoder` tensor must be provided.
    """
    not_read: list[str] = []
    sd, name = resolve_source(source, keep=lambda k: not k.startswith(_OTHER_PARTS), skipped=not_read)
    layout, prefix = detect_vision_layout(sd)
    outside = [k for k in sd if not k.startswith(prefix)] if prefix else []
    mapped = map_eva({k: v for k, v in sd.items() if k not in set(outside)}, model.cfg.vision, layout, prefix)
    mapped.ignored += outside + not_read  # other parts of a bigger checkpoint: loaded by their own loaders
    required = [k for k in model.state_dict() if k.startswith(ENCODER)]
    return apply_state_dict(model, mapped, name, required=required, assign=assign)
