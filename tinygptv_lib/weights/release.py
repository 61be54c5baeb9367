"""The released TinyGPT-V checkpoints (`TinyGPT-V_for_Stage{1..4}.pth`) and the whole model from them.

A released checkpoint is a pickled dict with "model" (only what the stage trained, plus a buffer),
"optimizer", "config", "scaler" and "epoch". Its "model" keys, and ours:
    llama_proj.{weight,bias}                      -> projection.proj1.*   (768 -> 4096)
    llama_proj2.{weight,bias}                     -> projection.proj2.*   (4096 -> 2560)
    llama_model.base_model.model.<phi name>       -> phi.<phi name>       (saved with PEFT LoRA)
    llama_model.<phi name>                        -> phi.<phi name>       (saved without LoRA)
  where <phi name> is e.g. model.layers.{i}.self_attn.query_key_value.lora_A.weight (PEFT 0.2) or
  ...lora_A.default.weight (newer PEFT) -> ...lora_A.default.weight; the q/k LayerNorm, input
  LayerNorm and post RMSNorm weights of every layer, and model.final_layernorm.weight.
  Ignored: the buffer Qformer.bert.embeddings.position_ids. If a checkpoint also holds Q-Former
  weights (the first stage-4 release trained the Q-Former by mistake), they load through the
  LAVIS BLIP-2 mapping, so that the released model is reproduced as it was.
Our attention is fused exactly like the original's, so the fused LoRA (A: r x 2560,
B: 7680 x r) maps 1:1. A checkpoint with LoRA needs a model with LoRA: one built with
`stage=None` gets LoRA added here; one built for stage 1 is refused.
"""
from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Mapping

import torch
from torch import nn

from ..model.phi import norm_weight_names
from .blip2 import LAVIS_RULES
from .common import (LoadReport, Mapped, WeightLoadError, _set_param, _tied_groups, apply_rules, apply_state_dict,
                     resolve_source)
from .eva import map_eva
from .phi2 import ADDED_NORM, adapt_to_lora, identity_for_unset_added_norms

RELEASE_RULES = [
    (r"llama_proj\.(weight|bias)", "projection.proj1.\\1"),
    (r"llama_proj2\.(weight|bias)", "projection.proj2.\\1"),
    (r"llama_model\..*rotary_emb\.(inv_freq|cos_cached|sin_cached)", None),  # recomputed, never trained
    (r"llama_model\.base_model\.model\.(.+)", "phi.\\1"),
    (r"llama_model\.(.+)", "phi.\\1"),
]
_BLIP2_PARTS = ("Qformer.", "query_tokens", "ln_vision.")
_OLD_PEFT = re.compile(r"(.+\.lora_[AB])\.weight")


def map_release(sd: Mapping[str, torch.Tensor], vision_cfg) -> Mapped:
    """Map the "model" dict of a released TinyGPT-V checkpoint to our names."""
    blip2 = {k: v for k, v in sd.items() if k.startswith(_BLIP2_PARTS)}
    vision = {k: v for k, v in sd.items() if k.startswith("visual_encoder.")}
    rest = {k: v for k, v in sd.items() if k not in blip2 and k not in vision}
    mapped = apply_rules(rest, RELEASE_RULES)
    for key in list(mapped.tensors):
        m = _OLD_PEFT.fullmatch(key)
        if m:  # PEFT 0.2 wrote lora_A.weight; PEFT now names the adapter: lora_A.default.weight
            mapped.rename(key, f"{m.group(1)}.default.weight")
    mapped.merge(apply_rules(blip2, LAVIS_RULES))
    if vision:
        mapped.merge(map_eva(vision, vision_cfg, "lavis", "visual_encoder."))
    return mapped


def _load_release_sd(model, sd: Mapping[str, torch.Tensor], name: str, *, add_lora: bool,
                     assign: bool | None) -> LoadReport:
    mapped = map_release(sd, model.cfg.vision)
    has_lora = any(".lora_" in k for k in mapped.tensors)
    if has_lora and not model.has_lora:
        if model.stage == 1:
            raise WeightLoadError(f"{name} carries LoRA weights (a stage 2-4 checkpoint), but the model was "
                                  "built for stage 1, which trains without LoRA; build it with stage=2..4 "
                                  "(or stage=None)", source=name)
        if not add_lora:
            raise WeightLoadError(f"{name} carries LoRA weights but the model has no LoRA; call "
                                  "model.add_lora() first or pass add_lora=True", source=name)
        model.add_lora()
    target = model.state_dict()
    adapt_to_lora(mapped, target)
    required = [k for k in target if k.startswith("projection.")]
    required += ["phi." + n for n in norm_weight_names(model.phi)]
    if has_lora:
        required += [k for k in target if k.startswith("phi.") and ".lora_" in k]
    return apply_state_dict(model, mapped, name, required=required, assign=assign)


def load_release_checkpoint(model, source, *, add_lora: bool = True, assign: bool | None = None) -> LoadReport:
    """Load a released `TinyGPT-V_for_StageN.pth` (or an in-memory checkpoint dict) into `model`.

    Requires both projections and every trained norm weight, plus all LoRA weights when the
    checkpoint has LoRA. Everything else (ViT, Q-Former, Phi-2 base) is left as it is: load it with
    `load_eva_vit`, `load_blip2_qformer` and `load_phi2`, or use `build_from_release`.
    """
    sd, name = resolve_source(source)
    return _load_release_sd(model, sd, name, add_lora=add_lora, assign=assign)


def load_minigpt4_projection(model, source, *, assign: bool | None = None) -> LoadReport:
    """Initialise `projection.proj1` from MiniGPT-4's `llama_proj` (768 -> 4096, Vicuna-7B), as
    TinyGPT-V's stage 1 does; every other key of the MiniGPT-4 checkpoint is ignored."""
    sd, name = resolve_source(source)
    mapped = apply_rules(sd, [(r"llama_proj\.(weight|bias)", "projection.proj1.\\1"), (r".+", None)])
    return apply_state_dict(model, mapped, name, required=["projection.proj1.weight", "projection.proj1.bias"],
                            assign=assign)


# ----------------------------------------------------------------------------------- whole model
def _finish(model, loaded: set[str]) -> None:
    """After loading a meta-built model: give what no file provides its defined initial value
    (LoRA not in the checkpoint: PEFT's init, B = 0; the EVA k_bias buffers: zeros; the rotary
    frequencies: recomputed), and fail if any other tensor was never loaded."""
    home = model.phi.get_input_embeddings().weight.device
    loaded = set(loaded)
    for group in _tied_groups(model):  # a tied parameter is loaded under any of its names
        if loaded.intersection(group):
            loaded.update(group)
    never = []
    for name, p in list(model.named_parameters()):
        if name in loaded or ADDED_NORM.fullmatch(name):  # added norms: loaded, or identity from load_phi2
            continue
        if ".lora_A." in name or ".lora_B." in name:
            t = torch.empty(p.shape, dtype=p.dtype, device=home)
            if ".lora_A." in name:
                nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # PEFT's default initialisation
            else:
                nn.init.zeros_(t)
            _set_param(model, name, nn.Parameter(t, requires_grad=p.requires_grad))
        else:
            never.append(name)
    if never:
        raise WeightLoadError("these parameters were provided by none of the sources:\n  - " + "\n  - ".join(never),
                              missing=never)
    if home.type == "meta":
        return
    for name, _ in list(model.named_buffers()):
        buf = model.get_buffer(name)  # fresh: a rebuilt module replaces several buffers at once
        if buf.device.type != "meta":
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if leaf == "k_bias":  # EVA's key bias: a fixed zero, not stored in checkpoints
            setattr(owner, leaf, torch.zeros(buf.shape, dtype=buf.dtype, device=home))
        elif leaf in ("inv_freq", "original_inv_freq") and owner_name.endswith("rotary_emb"):
            with torch.device(home):
                rebuilt = type(owner)(owner.config)
            parent_name, _, attr = owner_name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, rebuilt)
        else:
            raise WeightLoadError(f"buffer {name} is still on the meta device after loading")


def build_from_release(stage_pth, phi2_dir, eva_path, blip2_path, preset="full", *, stage: int | None = None,
                       img_size: int | None = None, device=None, dtype: torch.dtype | None = None,
                       phi2_config: Mapping | None = None):
    """Build the complete TinyGPT-V from its four public sources (on a machine with internet and,
    for a usable speed, a GPU). Nothing is allocated for the random initialisation: the model is
    built on the meta device and every tensor is filled from the files.

    Downloads (about 12 GB in all):
      stage_pth  - Hugging Face `Tyrannosaurus/TinyGPT-V`: TinyGPT-V_for_Stage1.pth ... Stage4.pth
                   (e.g. `huggingface-cli download Tyrannosaurus/TinyGPT-V TinyGPT-V_for_Stage4.pth`)
      phi2_dir   - Hugging Face `microsoft/phi-2` (config.json, model-0000{1,2}-of-00002.safetensors,
                   model.safetensors.index.json), e.g. `huggingface-cli download microsoft/phi-2 --local-dir phi-2`
      eva_path   - LAVIS EVA ViT-g:
                   https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth
      blip2_path - LAVIS BLIP-2 (Q-Former, query tokens, ln_vision):
                   https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/blip2_pretrained_flant5xxl.pth
                   (a Hugging Face `Salesforce/blip2-*` folder works too; its LLM is never read)
    Any source may also be an in-memory state dict (for `phi2_dir` pass `phi2_config` then).

    stage: 1..4; by default read from the file name ("Stage4"), else 2 if the checkpoint has LoRA, 1 if not.
    img_size: default 224, and 448 for a full-size stage-4 checkpoint (stage 4 trained at 448 px; the
        position embedding is resampled bicubically).
    device: where the finished model goes (default: CPU, where the files are read).
    dtype: the dtype of every parameter (default float32: about 16 GB at full size). Phi-2's files
        are float16 and LAVIS' ViT mostly so; ln_vision and the RMSNorms compute in fp32 whatever
        the storage. For the original's policy (frozen weights fp16, trained ones fp32) build with
        device=None, call `model.cast_frozen(torch.float16)` (if your model version has it), then
        move the model to the GPU.
    The model comes back in training mode with the stage's freeze policy; call `.eval()` for inference.
    """
    from ..config import TinyGPTVConfig, get_config
    from ..model.tinygptv import build_model
    from .blip2 import load_blip2_qformer
    from .eva import load_eva_vit
    from .phi2 import load_phi2

    release_sd, release_name = resolve_source(stage_pth)
    has_lora = any(".lora_" in k for k in release_sd)
    if stage is None:
        m = re.search(r"stage[_\s-]*([1-4])", os.path.basename(release_name), re.IGNORECASE)
        stage = int(m.group(1)) if m else (2 if has_lora else 1)
    cfg = get_config(preset) if isinstance(preset, str) else copy.deepcopy(preset)
    if not isinstance(cfg, TinyGPTVConfig):
        raise TypeError(f"preset must be a preset name or a TinyGPTVConfig, got {type(preset).__name__}")
    if img_size is None and stage == 4 and cfg.preset == "full":
        img_size = 448
    if img_size is not None:
        cfg.vision.img_size = img_size
    model = build_model(cfg, stage=stage, device="meta")
    if dtype is not None:
        model.to(dtype)  # free on the meta device; the loaders cast every tensor to it
    reports = [
        load_blip2_qformer(model, blip2_path, include_vision=False, assign=True),
        load_eva_vit(model, eva_path, assign=True),
        load_phi2(model, phi2_dir, config=phi2_config, assign=True),
        _load_release_sd(model, release_sd, release_name, add_lora=False, assign=True),
    ]
    loaded = set().union(*(r.loaded for r in reports))
    _finish(model, loaded)
    if device is not None and torch.device(device).type != "meta":
        model.to(device)
    return model
