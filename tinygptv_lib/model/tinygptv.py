"""TinyGPT-V assembled: image -> EVA ViT -> ln_vision -> Q-Former -> two projections -> Phi-2.

The 32 projected query outputs replace the `<ImageHere>` slots of the prompt (see `sequence.py`);
Phi-2 (with TinyGPT-V's norms, and LoRA from stage 2 on) reads the spliced sequence. In training
the vocabulary projection runs only at positions that have a target (a 51,200-row head on every
image and prompt position would be wasted work), and Phi stops at the last position that predicts
one (see `loss.py` for the loss itself).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..config import TinyGPTVConfig
from .fast_cpu import use_fast_cpu_layers
from .loss import target_cross_entropy
from .phi import build_phi, norm_weight_names
from .projection import Projection
from .qformer import QFormer
from .sequence import IGNORE, IMAGE_SLOT, TextBatch
from .vision import VisionTower

STAGES = (1, 2, 3, 4)


class TinyGPTV(nn.Module):
    def __init__(self, cfg: TinyGPTVConfig, stage: int | None = None):
        super().__init__()
        self.cfg = cfg = copy.deepcopy(cfg)  # the model owns its config (set_image_size updates it)
        self.vision = VisionTower(cfg.vision)
        self.qformer = QFormer(cfg.qformer, encoder_width=cfg.vision.width)
        self.projection = Projection(cfg.qformer.hidden_size, cfg.proj_hidden, cfg.phi.hidden_size)
        self.phi = build_phi(cfg.phi)
        use_fast_cpu_layers(self)  # frozen linears through oneDNN, cheaper dropout masks on the CPU (fast_cpu.py)
        self.stage: int | None = None
        if stage is not None:
            self.set_stage(stage)

    # ----------------------------------------------------------------- stages and freezing
    @property
    def has_lora(self) -> bool:
        return any("lora_" in n for n, _ in self.phi.named_parameters())

    def add_lora(self) -> None:
        """Wrap Phi's fused query_key_value and dense with LoRA (peft), in place. B starts at 0."""
        if self.has_lora:
            return
        from peft import LoraConfig, inject_adapter_in_model

        lc = self.cfg.lora
        peft_cfg = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias="none",
                              target_modules=list(lc.target_modules))
        inject_adapter_in_model(peft_cfg, self.phi)  # Phi only: the Q-Former also has `dense` layers
        use_fast_cpu_layers(self.phi)  # LoRA's own input dropout and layers (fast_cpu.py)

    def set_stage(self, stage: int) -> None:
        """The exact freeze policy of TinyGPT-V for a stage.

        Trainable in every stage: both projections and the weights (not biases) of Phi's q/k
        LayerNorms, post RMSNorms, input LayerNorms and final LayerNorm. Stages 2-4 add LoRA
        (the paper's stage 1 has none; the original code added it there by accident). The ViT,
        ln_vision and Q-Former stay frozen always.
        """
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if stage >= 2:
            self.add_lora()
        elif self.has_lora:
            raise ValueError("stage 1 trains without LoRA, but this model already carries LoRA weights; "
                             "build a fresh model for stage 1")
        self.requires_grad_(False)
        self.projection.requires_grad_(True)
        trainable = set(norm_weight_names(self.phi))
        for name, p in self.phi.named_parameters():
            if name in trainable or "lora_" in name:
                p.requires_grad_(True)
        self.stage = stage

    def train(self, mode: bool = True) -> "TinyGPTV":
        """The frozen towers (ViT, ln_vision, Q-Former) stay in eval mode: no dropout, as in the original."""
        super().train(mode)
        self.vision.eval()
        self.qformer.eval()
        return self

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def cast_frozen(self, dtype: torch.dtype) -> "TinyGPTV":
        """Store frozen weights in `dtype` (fp16/bf16 on a GPU); trainable weights and norms stay fp32.

        The original keeps the ViT in fp16, Phi-2 in fp16, and trains its norms and LoRA in fp32;
        ln_vision and the RMSNorm compute in fp32 whatever their input.
        """
        from .phi import RMSNorm

        norm_params = {id(p) for m in self.modules() if isinstance(m, (nn.LayerNorm, RMSNorm))
                       for p in m.parameters(recurse=False)}  # norms stay fp32 (weight and bias alike)
        for p in self.parameters():
            keep = p.requires_grad or id(p) in norm_params
            p.data = p.data.to(torch.float32 if keep else dtype)
        return self

    def enable_gradient_checkpointing(self) -> None:
        kwargs = {"use_reentrant": False}
        if hasattr(self.phi, "activation_checkpointing_enable"):  # transformers >= 5.x name
            self.phi.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.phi.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.vision.encoder.set_grad_checkpointing(True)

    # ----------------------------------------------------------------- forward
    def encode_queries(self, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen part: pixels -> ViT -> ln_vision -> Q-Former outputs (B, num_query_tokens, qformer_hidden).

        With frozen towers and no augmentation these can be computed once per image and cached.
        """
        towers_train = any(p.requires_grad for p in self.qformer.parameters()) or any(
            p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and towers_train):  # frozen: no graph kept
            return self.qformer(self.vision(pixels))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) -> image embeddings in Phi's space (B, num_query_tokens, phi_hidden)."""
        return self.project(self.encode_queries(pixels))

    def project(self, queries: torch.Tensor) -> torch.Tensor:
        return self.projection(queries.to(self.projection.proj1.weight.dtype))

    def embed(self, batch: TextBatch, pixels: torch.Tensor | None = None,
              image_embeds: torch.Tensor | None = None, queries: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the image embeddings spliced into the IMAGE_SLOT positions."""
        ids = batch.input_ids
        slots = ids == IMAGE_SLOT
        embed_tokens = self.phi.get_input_embeddings()
        embeds = embed_tokens(ids.masked_fill(slots, self.cfg.pad_token_id))
        n_img = int(batch.has_image.sum())
        if n_img == 0:
            return embeds
        if image_embeds is None and queries is not None:
            image_embeds = self.project(queries)
        if image_embeds is None:
            if pixels is None:
                raise ValueError(f"{n_img} sample(s) have an image placeholder but no pixels were given")
            image_embeds = self.encode_images(pixels)
        q = self.cfg.qformer.num_query_tokens
        if image_embeds.shape[0] != n_img or image_embeds.shape[1] != q:
            raise ValueError(f"{n_img} sample(s) with an image need {n_img} x {q} image embeddings, "
                             f"got {tuple(image_embeds.shape[:2])}")
        embeds = embeds.clone()
        embeds[slots] = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)
        return embeds

    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        """Phi's final hidden states (B, T, width); with `positions` (1-D, ascending) only at those
        positions (B, len(positions), width): its last layer runs its queries, MLP and dense there."""
        extra = {} if positions is None else {"last_layer_positions": positions}
        out = self.phi.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False, **extra)
        return out.last_hidden_state

    def forward(self, batch: TextBatch, pixels: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None, queries: torch.Tensor | None = None,
                reduction: str = "mean") -> dict:
        """Training loss over the answer tokens ("mean", or "sum" for exact multi-batch averaging).

        Logits are computed only where a target exists.
        """
        targets = batch.targets[:, 1:]
        where = targets != IGNORE  # position t predicts token t + 1
        predicting = where.any(0).nonzero().squeeze(1)  # positions that predict a target in some row
        if predicting.numel() == 0:
            raise ValueError("the batch has no target tokens (every answer is empty or cut away)")
        # Causal attention: positions after the last one that predicts a target change no loss term,
        # so Phi does not run them (at least the final token of the longest row, all its padding);
        # and its last layer's output is needed only at the predicting positions.
        keep = int(predicting[-1]) + 1
        embeds = self.embed(batch, pixels, image_embeds, queries)
        positions = predicting if predicting.numel() < keep else None
        hidden = self.hidden_states(embeds[:, :keep], batch.attention_mask[:, :keep], positions)
        cols = predicting if positions is not None else slice(0, keep)
        where = where[:, cols]
        loss = target_cross_entropy(hidden[where], self.phi.lm_head, targets[:, cols][where], reduction)
        return {"loss": loss, "num_targets": int(where.sum())}

    def full_logits(self, batch: TextBatch, pixels: torch.Tensor | None = None,
                    image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at every position (for inspection and evaluation by loss ranking)."""
        embeds = self.embed(batch, pixels, image_embeds)
        return self.phi.lm_head(self.hidden_states(embeds, batch.attention_mask))


def build_model(cfg_or_preset: TinyGPTVConfig | str = "nano", stage: int | None = 1,
                device: str | torch.device | None = None) -> TinyGPTV:
    """Build TinyGPT-V for a preset (random weights; see `tinygptv_lib.weights` to load real ones).

    `device="meta"` builds the full-size model without allocating memory (for counting and plans).
    """
    from ..config import get_config

    cfg = get_config(cfg_or_preset) if isinstance(cfg_or_preset, str) else cfg_or_preset
    if device is None:
        return TinyGPTV(cfg, stage=stage)
    with torch.device(device):
        return TinyGPTV(cfg, stage=stage)
