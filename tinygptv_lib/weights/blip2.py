"""BLIP-2 weights: Q-Former, query tokens and ln_vision from LAVIS or Hugging Face checkpoints.

LAVIS (`blip2_pretrained_flant5xxl.pth` and its siblings: a dict whose "model" holds):
    Qformer.bert.embeddings.LayerNorm                     -> qformer.model.layernorm
    Qformer.bert.encoder.layer.{i}.attention.self.{query,key,value}
                                                          -> ...layer.{i}.attention.attention.*
    Qformer.bert.encoder.layer.{i}.attention.output.{dense,LayerNorm}        (same name)
    Qformer.bert.encoder.layer.{i}.crossattention.self.*  -> ...crossattention.attention.*  (even i)
    Qformer.bert.encoder.layer.{i}.crossattention.output.*                    (same name)
    Qformer.bert.encoder.layer.{i}.intermediate_query.dense, .output_query.{dense,LayerNorm} (same)
    query_tokens                                          -> qformer.query_tokens
    ln_vision                                             -> vision.ln_vision
    visual_encoder.* (if present)                         -> vision.encoder.* (see `eva.py`)
  Knowingly ignored: the Q-Former's text branch, which TinyGPT-V never runs (word / position
  embeddings, the position_ids buffer, each layer's `intermediate` and `output` used by text tokens,
  `Qformer.cls.*`); BLIP-2's own heads (`vision_proj`, `text_proj`, `itm_head`, `temp`); the LLM
  bridge and LLM of the checkpoint's BLIP-2 variant (`t5_proj`, `opt_proj`, `llm_proj`,
  `t5_model.*`, `opt_model.*`, `llm_model.*`).

Hugging Face (`Blip2ForConditionalGeneration`, e.g. `Salesforce/blip2-opt-2.7b`):
    qformer.{layernorm, encoder.*} -> qformer.model.* (the names are transformers' own, ours too);
    query_tokens -> qformer.query_tokens; vision_model.post_layernorm -> vision.ln_vision;
    vision_model.* -> vision.encoder.* (if wanted). Ignored: language_model.*, language_projection.*
    (and the retrieval heads / text embeddings of `Blip2ForImageTextRetrieval`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .common import LoadReport, Mapped, WeightLoadError, apply_rules, apply_state_dict, resolve_source
from .eva import ENCODER, LN_VISION, map_eva

_L = r"Qformer\.bert\.encoder\.layer\.(\d+)\."
_Q = "qformer.model.encoder.layer.\\1."
LAVIS_RULES = [
    (r"query_tokens", "qformer.query_tokens"),
    (r"ln_vision\.(weight|bias)", LN_VISION + "\\1"),
    (r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", "qformer.model.layernorm.\\1"),
    (_L + r"(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)", _Q + "\\2.attention.\\3.\\4"),
    (_L + r"(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)", _Q + "\\2.output.\\3.\\4"),
    (_L + r"intermediate_query\.dense\.(weight|bias)", _Q + "intermediate_query.dense.\\2"),
    (_L + r"output_query\.(dense|LayerNorm)\.(weight|bias)", _Q + "output_query.\\2.\\3"),
    # ignored: the text branch, BLIP-2's own heads, the bridge to and the weights of its LLM
    (r"Qformer\.bert\.embeddings\.(word_embeddings\.weight|position_embeddings\.weight|position_ids)", None),
    (_L + r"(intermediate|output)\..+", None),
    (r"Qformer\.cls\..+", None),
    (r"(vision_proj|text_proj|itm_head|t5_proj|opt_proj|llm_proj)\.(weight|bias)", None),
    (r"temp", None),
    (r"(t5_model|opt_model|llm_model)\..+", None),
]
HF_RULES = [
    (r"query_tokens", "qformer.query_tokens"),
    (r"vision_model\.post_layernorm\.(weight|bias)", LN_VISION + "\\1"),
    (r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\..+", None),  # text branch, if a file has it
    (r"qformer\.((layernorm|encoder)\..+)", "qformer.model.\\1"),
    (r"(language_model|language_projection)\..+", None),
    (r"(embeddings|vision_projection|text_projection|itm_head)\..+", None),  # Blip2ForImageTextRetrieval
    (r"qformer\.embeddings\..+", None),
]


def map_blip2(sd: Mapping[str, torch.Tensor], vision_cfg, include_vision: bool = True) -> Mapped:
    """Map a LAVIS or Hugging Face BLIP-2 state dict (the layout is detected) to our names."""
    layout = detect_blip2_layout(sd)
    vision_prefix = "visual_encoder." if layout == "lavis" else "vision_model."
    vision = {k: v for k, v in sd.items() if k.startswith(vision_prefix)
              and not k.startswith("vision_model.post_layernorm.")}
    rest = {k: v for k, v in sd.items() if k not in vision}
    mapped = apply_rules(rest, LAVIS_RULES if layout == "lavis" else HF_RULES)
    if vision:
        if include_vision:
            mapped.merge(map_eva(vision, vision_cfg, layout, vision_prefix))
        else:
            mapped.ignored += list(vision)
    return mapped


def detect_blip2_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith("Qformer.") for k in keys):
        return "lavis"
    if any(k.startswith("qformer.") for k in keys):
        return "hf"
    raise ValueError("no Q-Former weights: expected keys starting with 'Qformer.' (LAVIS) or 'qformer.' "
                     "(Hugging Face)")


def load_blip2_qformer(model, source, *, include_vision: bool = True, assign: bool | None = None) -> LoadReport:
    """Load the Q-Former, the query tokens and ln_vision of `model` from a BLIP-2 checkpoint.

    `source`: a LAVIS `.pth` (e.g. blip2_pretrained_flant5xxl.pth), a Hugging Face BLIP-2 file or
    folder, or an in-memory state dict. If the checkpoint also holds the ViT and `include_vision`
    is true, the ViT is loaded too (and must then be complete). The LLM weights of a Hugging Face
    folder are never read.
    """
    def keep(k: str) -> bool:
        if k.startswith(("language_model.", "t5_model.", "opt_model.", "llm_model.")):
            return False
        return include_vision or not (k.startswith("visual_encoder.") or (
            k.startswith("vision_model.") and not k.startswith("vision_model.post_layernorm.")))

    not_read: list[str] = []
    sd, name = resolve_source(source, keep=keep, skipped=not_read)
    try:
        mapped = map_blip2(sd, model.cfg.vision, include_vision)
    except ValueError as e:
        raise WeightLoadError(f"{name}: {e}", source=name) from None
    mapped.ignored += not_read  # the LLM (and, if not wanted, the ViT): never read
    target = model.state_dict()
    required = [k for k in target if k.startswith(("qformer.", LN_VISION))]
    if any(k.startswith(ENCODER) for k in mapped.tensors):
        required += [k for k in target if k.startswith(ENCODER)]
    return apply_state_dict(model, mapped, name, required=required, assign=assign)
