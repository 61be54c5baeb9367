"""The BLIP-2 Q-Former: 32 learned queries read the image through cross-attention.

transformers' `Blip2QFormerModel` is exactly BLIP-2's query branch (self-attention over the
queries, cross-attention to the image features every 2nd layer, a feed-forward per layer); the
text branch that BLIP-2 used for its own pre-training is not built, as in TinyGPT-V.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from ..config import QFormerConfig


def build_qformer_config(cfg: QFormerConfig, encoder_width: int) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        cross_attention_frequency=cfg.cross_attention_frequency,
        encoder_hidden_size=encoder_width,
        layer_norm_eps=cfg.layer_norm_eps,
    )


class QFormer(nn.Module):
    """image features (B, N, encoder_width) -> query outputs (B, num_query_tokens, hidden)."""

    def __init__(self, cfg: QFormerConfig, encoder_width: int):
        super().__init__()
        self.cfg = cfg
        self.model = Blip2QFormerModel(build_qformer_config(cfg, encoder_width))
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.hidden_size))
        nn.init.normal_(self.query_tokens, std=0.02)  # BLIP-2's initialiser

    def forward(self, image_feats: torch.Tensor, output_attentions: bool = False):
        queries = self.query_tokens.expand(image_feats.shape[0], -1, -1)
        image_mask = torch.ones(image_feats.shape[:-1], dtype=torch.long, device=image_feats.device)
        out = self.model(
            query_embeds=queries,
            encoder_hidden_states=image_feats,
            encoder_attention_mask=image_mask,
            output_attentions=output_attentions,
            return_dict=True,
        )
        if output_attentions:
            return out.last_hidden_state, out
        return out.last_hidden_state


@torch.no_grad()
def cross_attention_maps(qformer: QFormer, image_feats: torch.Tensor) -> dict[int, torch.Tensor]:
    """Where each query looks: {layer index: weights (B, heads, num_queries, image tokens)}.

    Runs the Q-Former once and recomputes softmax(q k^T / sqrt(d)) from the inputs of every
    cross-attention (SDPA does not hand its weights back). The image mask is all ones, as in
    `QFormer.forward`, so no masking is needed. Each row sums to 1 over the image tokens.
    """
    maps: dict[int, torch.Tensor] = {}

    def hook_for(idx: int):
        def hook(module, args, kwargs, output):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            image = kwargs["encoder_hidden_states"]
            d = module.attention_head_size
            q = module.query(hidden).unflatten(-1, (-1, d)).transpose(1, 2)
            k = module.key(image).unflatten(-1, (-1, d)).transpose(1, 2)
            maps[idx] = torch.softmax((q @ k.transpose(-1, -2)) * d ** -0.5, dim=-1)
        return hook

    handles = [layer.crossattention.attention.register_forward_hook(hook_for(i), with_kwargs=True)
               for i, layer in enumerate(qformer.model.encoder.layer) if layer.has_cross_attention]
    try:
        qformer(image_feats)
    finally:
        for h in handles:
            h.remove()
    return maps
