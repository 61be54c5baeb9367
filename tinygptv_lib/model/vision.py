"""The vision encoder: an EVA ViT (timm's `Eva` class) without its last block, then `ln_vision`.

TinyGPT-V (like BLIP-2 and MiniGPT-4) takes EVA-CLIP ViT-g/14, drops the 40th block so that the
Q-Former reads penultimate-layer features, and has no final norm inside the ViT: the separate
`ln_vision` LayerNorm (trained with the Q-Former in BLIP-2) plays that role and runs in fp32.
"""
from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.eva import Eva
from torch import nn

from ..config import VisionConfig


def build_vision_encoder(cfg: VisionConfig) -> Eva:
    """timm's EVA with our numbers; returns every token (CLS first), no pooling, no head, no norm."""
    return Eva(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_hidden / cfg.width,
        qkv_bias=True,  # EVA: q and v biases, k bias fixed at zero
        num_classes=0,
        global_pool="",
        use_post_transformer_norm=False,
        use_fc_norm=False,
    )


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (BLIP-2's `ln_vision` under fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                                       self.bias.float(), self.eps)
        return out.to(x.dtype)


class VisionTower(nn.Module):
    """pixels (B, 3, H, W) -> image features (B, 1 + (H/14)*(W/14), width), ln_vision applied."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = build_vision_encoder(cfg)
        self.ln_vision = LayerNormFp32(cfg.width, eps=1e-5)  # BLIP-2 uses the default eps here

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        expected = (3, self.cfg.img_size, self.cfg.img_size)
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"pixels must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                             f"got {tuple(pixels.shape)}")
        feats = self.encoder.forward_features(pixels)
        return self.ln_vision(feats)

    def set_image_size(self, img_size: int) -> None:
        """Switch resolution (stage 4 goes 224 -> 448): bicubic resampling of the position grid."""
        old = self.cfg.img_size
        if img_size == old:
            return
        if img_size % self.cfg.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {self.cfg.patch_size}")
        grid = img_size // self.cfg.patch_size
        enc = self.encoder
        new_pos = resample_abs_pos_embed(
            enc.pos_embed.data, new_size=(grid, grid), num_prefix_tokens=1, interpolation="bicubic",
            antialias=False,
        )
        enc.pos_embed = nn.Parameter(new_pos, requires_grad=enc.pos_embed.requires_grad)
        enc.patch_embed.set_input_size(img_size=(img_size, img_size))
        self.cfg.img_size = img_size
