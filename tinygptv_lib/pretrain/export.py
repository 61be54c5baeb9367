"""Writing the pretrained towers in the layouts the real full-size weights come in.

The nano backbones must load through the very loaders that read the real files, so they are
written in the real layouts (fp16 storage; the loaders cast to the model's dtype):

    eva_vit_nano.safetensors        LAVIS `eva_vit_g.pth` names: cls_token, pos_embed, patch_embed.proj,
                                    blocks.{i}.{norm1, attn.qkv, attn.q_bias, attn.v_bias, attn.proj, norm2, mlp.fc1, mlp.fc2}
    blip2_qformer_nano.safetensors  LAVIS BLIP-2 names: query_tokens, ln_vision, Qformer.bert.embeddings.LayerNorm,
                                    Qformer.bert.encoder.layer.{i}.{attention,crossattention}.self.{query,key,value}, ...
                                    and BLIP-2's ITC parts vision_proj, text_proj, temp (the loader skips them)
    phi-2-nano/                     a `microsoft/phi-2` folder: config.json + model.safetensors with split
                                    q_proj / k_proj / v_proj (lm_head.weight left out: tied to embed_tokens)
    pretraining_heads.safetensors   the throw-away teachers (text encoder, caption decoder, slot head) and the
                                    compact vocabulary, kept for evaluation and for looking inside the queries
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import TinyGPTVConfig
from ..weights.nano import BLIP2_FILE, EVA_FILE, PHI_DIR
from ..weights.phi2 import split_qkv

HEADS_FILE = "pretraining_heads.safetensors"
STORE_DTYPE = torch.float16


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Floating tensors as fp16, integer tensors as they are. One metadata entry only: safetensors
    writes several in no fixed order, and the same run must give the same bytes."""
    out = {k: (v.detach().to(STORE_DTYPE) if v.is_floating_point() else v.detach()).contiguous().cpu()
           for k, v in tensors.items()}
    save_file(out, str(path), metadata={"format": "pt"})


def eva_state(vision) -> dict[str, torch.Tensor]:
    """timm's Eva names are LAVIS' eva_vit_g names already (see weights/eva.py)."""
    return dict(vision.encoder.state_dict())


_QF_ATTN = re.compile(r"(encoder\.layer\.\d+\.(?:attention|crossattention))\.attention\.(query|key|value)\.(.+)")


def blip2_state(vision, qformer, contrastive=None) -> dict[str, torch.Tensor]:
    """Our Q-Former, query tokens and ln_vision under LAVIS BLIP-2 names (the inverse of weights/blip2.py)."""
    out = {"query_tokens": qformer.query_tokens.data}
    for k, v in vision.ln_vision.state_dict().items():
        out[f"ln_vision.{k}"] = v
    for k, v in qformer.model.state_dict().items():
        if k.startswith("layernorm."):
            out["Qformer.bert.embeddings.LayerNorm." + k[len("layernorm."):]] = v
            continue
        m = _QF_ATTN.fullmatch(k)
        out["Qformer.bert." + (f"{m.group(1)}.self.{m.group(2)}.{m.group(3)}" if m else k)] = v
    if contrastive is not None:  # BLIP-2 keeps these in the same checkpoint; our loader skips them
        for k, v in contrastive.vision_proj.state_dict().items():
            out[f"vision_proj.{k}"] = v
        for k, v in contrastive.text_proj.state_dict().items():
            out[f"text_proj.{k}"] = v
        out["temp"] = contrastive.temp.data.reshape(())
    return out


def phi2_state(phi, num_heads: int) -> dict[str, torch.Tensor]:
    """transformers' Phi names with split q/k/v, as in today's microsoft/phi-2 files.

    Left out: lm_head.weight (tied to the input embedding) and TinyGPT-V's added norms, which were
    kept at identity (Phi-2 has none; the loader creates them so).
    """
    out = {}
    for k, v in phi.state_dict().items():
        if k == "lm_head.weight" or re.search(r"(q_layernorm|k_layernorm|post_layernorm)\.", k):
            continue
        m = re.fullmatch(r"(model\.layers\.\d+\.self_attn)\.query_key_value\.(weight|bias)", k)
        if m:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), split_qkv(v, num_heads)):
                out[f"{m.group(1)}.{name}.{m.group(2)}"] = part
        else:
            out[k] = v
    return out


def phi2_config(cfg: TinyGPTVConfig) -> dict:
    """config.json in microsoft/phi-2's fields, with the nano numbers."""
    p = cfg.phi
    return {
        "architectures": ["PhiForCausalLM"], "model_type": "phi",
        "vocab_size": p.vocab_size, "hidden_size": p.hidden_size, "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_layers, "num_attention_heads": p.num_heads, "num_key_value_heads": p.num_heads,
        "hidden_act": "gelu_new", "max_position_embeddings": p.max_position_embeddings,
        "initializer_range": 0.02, "layer_norm_eps": p.layer_norm_eps,
        "partial_rotary_factor": p.partial_rotary_factor, "rope_theta": p.rope_theta,
        "qk_layernorm": True,  # trained with TinyGPT-V's QK-norm in place (weights 1, biases 0)
        "tie_word_embeddings": p.tie_word_embeddings,
        "bos_token_id": 50256, "eos_token_id": 50256,
        "resid_pdrop": 0.1, "embd_pdrop": 0.0, "attention_dropout": 0.0,
        "torch_dtype": "float16", "use_cache": True,
    }


def heads_state(model, vocab) -> dict[str, torch.Tensor]:
    out = {"vocab_ids": vocab.as_tensor()}
    for prefix, module in (("text_encoder.", model.contrastive.text_encoder), ("caption_decoder.", model.decoder),
                           ("slot_head.", model.slots)):
        out.update({prefix + k: v for k, v in module.state_dict().items()})
    return out


def write_backbones(out: Path, cfg: TinyGPTVConfig, vision_model, phi, vocab) -> dict[str, int]:
    """Write every file; returns {file: bytes}."""
    out.mkdir(parents=True, exist_ok=True)
    (out / PHI_DIR).mkdir(exist_ok=True)
    save_tensors(eva_state(vision_model.vision), out / EVA_FILE)
    save_tensors(blip2_state(vision_model.vision, vision_model.qformer, vision_model.contrastive), out / BLIP2_FILE)
    save_tensors(phi2_state(phi, cfg.phi.num_heads), out / PHI_DIR / "model.safetensors")
    (out / PHI_DIR / "config.json").write_text(json.dumps(phi2_config(cfg), indent=2) + "\n")
    save_tensors(heads_state(vision_model, vocab), out / HEADS_FILE)
    files = [EVA_FILE, BLIP2_FILE, f"{PHI_DIR}/model.safetensors", f"{PHI_DIR}/config.json", HEADS_FILE]
    return {f: (out / f).stat().st_size for f in files}
