"""Phi-2 weights (Hugging Face `microsoft/phi-2`) into TinyGPT-V's Phi with fused attention.

The folder holds config.json, `model-0000k-of-0000n.safetensors` shards and
`model.safetensors.index.json`. Its names are transformers' Phi:
    model.embed_tokens, model.layers.{i}.self_attn.{q_proj,k_proj,v_proj,dense},
    model.layers.{i}.mlp.{fc1,fc2}, model.layers.{i}.input_layernorm, model.final_layernorm, lm_head.
TinyGPT-V keeps the original fused `query_key_value` (3*hidden outputs), laid out per head:
its rows view as (heads, 3, head_dim), i.e. head h owns rows [q_h; k_h; v_h]. `fuse_qkv` builds
that from the split projections (and `split_qkv` undoes it). A Phi checkpoint that is already
fused (`self_attn.query_key_value`) loads as it is.

TinyGPT-V's added norms (q_layernorm, k_layernorm, post_layernorm) are not in Phi-2: they keep
their identity initialisation (weight 1, bias 0); on a meta-device model they are created so.
In a model that already carries LoRA, the base weights go to `.base_layer.` and the LoRA weights
are left alone.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..config import PhiConfig
from .common import LoadReport, Mapped, WeightLoadError, _set_param, apply_rules, apply_state_dict, resolve_source

ADDED_NORM = re.compile(r"phi\.model\.layers\.\d+\.(self_attn\.[qk]_layernorm\.(weight|bias)|post_layernorm\.weight)")
_L = r"model\.layers\.(\d+)\."
RULES = [
    (r"model\.embed_tokens\.weight", "phi.model.embed_tokens.weight"),
    (r"model\.final_layernorm\.(weight|bias)", "phi.model.final_layernorm.\\1"),
    (r"lm_head\.(weight|bias)", "phi.lm_head.\\1"),
    (_L + r"(self_attn\.(?:dense|query_key_value|q_layernorm|k_layernorm)|mlp\.fc1|mlp\.fc2|input_layernorm)"
          r"\.(weight|bias)", "phi.model.layers.\\1.\\2.\\3"),
    (_L + r"post_layernorm\.weight", "phi.model.layers.\\1.post_layernorm.weight"),
    (r"model\.rotary_emb\.inv_freq|" + _L + r"self_attn\.rotary_emb\.inv_freq", None),  # recomputed buffers
]
_SPLIT = re.compile(_L + r"self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Split q/k/v projections (weights [H*D, in] or biases [H*D]) -> the per-head interleaved
    fused tensor [3*H*D, ...] whose rows view as (H, 3, D)."""
    d = q.shape[0] // num_heads
    rest = tuple(q.shape[1:])
    return torch.stack([t.reshape(num_heads, d, *rest) for t in (q, k, v)], dim=1).reshape(3 * q.shape[0], *rest)


def split_qkv(fused: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `fuse_qkv`."""
    hidden = fused.shape[0] // 3
    rest = tuple(fused.shape[1:])
    parts = fused.reshape(num_heads, 3, hidden // num_heads, *rest).unbind(1)
    return tuple(p.reshape(hidden, *rest) for p in parts)


def map_phi2(sd: Mapping[str, torch.Tensor], cfg: PhiConfig) -> Mapped:
    """Map transformers' Phi names to ours, fusing q/k/v per layer (per-head interleaved)."""
    split: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}

    def claim_split(key: str, tensor: torch.Tensor, out: Mapped) -> bool:
        m = _SPLIT.fullmatch(key)
        if not m:
            return False
        split.setdefault((m.group(1), m.group(3)), {})[m.group(2)[0]] = (key, tensor)
        return True

    out = apply_rules(sd, RULES, fallback=claim_split)
    for (layer, kind), parts in sorted(split.items(), key=lambda kv: (int(kv[0][0]), kv[0][1])):
        target = f"phi.model.layers.{layer}.self_attn.query_key_value.{kind}"
        if set(parts) != {"q", "k", "v"}:
            have = ", ".join(parts[p][0] for p in sorted(parts))
            out.problems.append(f"{target} needs q_proj, k_proj and v_proj {kind}s of layer {layer}; "
                                f"the source has only {have}")
            continue
        q, k, v = (parts[p][1] for p in "qkv")
        if q.shape != k.shape or q.shape != v.shape or q.shape[0] % cfg.num_heads:
            out.problems.append(f"layer {layer}: q/k/v {kind} shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                                f"{tuple(v.shape)} cannot be fused for {cfg.num_heads} heads")
            continue
        out.put(target, fuse_qkv(q, k, v, cfg.num_heads), f"{parts['q'][0]} + k_proj + v_proj")
    return out


_WRAPPED = re.compile(
    r"(phi\.model\.layers\.\d+\.self_attn\.(?:query_key_value|dense))\.(?:base_layer\.)?(weight|bias)")


def adapt_to_lora(mapped: Mapped, target_keys) -> None:
    """Rename base attention weights to `.base_layer.` when the target carries LoRA, and back."""
    target_keys = set(target_keys)
    for key in list(mapped.tensors):
        m = _WRAPPED.fullmatch(key)
        if m:
            wrapped, plain = f"{m.group(1)}.base_layer.{m.group(2)}", f"{m.group(1)}.{m.group(2)}"
            want = wrapped if wrapped in target_keys else plain
            if want != key and want not in mapped.tensors:
                mapped.rename(key, want)


def identity_for_unset_added_norms(model) -> list[str]:
    """Give TinyGPT-V's added norms that are still on the meta device their identity init."""
    done = []
    device = model.phi.get_input_embeddings().weight.device  # where the loaded Phi weights live
    for name, p in list(model.named_parameters()):
        if p.device.type == "meta" and ADDED_NORM.fullmatch(name):
            fill = torch.ones if name.endswith("weight") else torch.zeros
            _set_param(model, name, nn.Parameter(fill(p.shape, dtype=p.dtype, device=device),
                                                 requires_grad=p.requires_grad))
            done.append(name)
    return done


# ----------------------------------------------------------------------------------- config
_FIELDS = (  # (config.json field, our PhiConfig field)
    ("hidden_size", "hidden_size"), ("num_hidden_layers", "num_layers"),
    ("num_attention_heads", "num_heads"), ("vocab_size", "vocab_size"),
    ("intermediate_size", "intermediate_size"),
)


def check_phi2_config(hf: Mapping, cfg: PhiConfig, source: str) -> None:
    """Raise a WeightLoadError naming every config.json field that disagrees with our config."""
    if hf.get("model_type") == "phi-msft" or "n_embd" in hf:
        raise WeightLoadError(f"{source}: this is the pre-2024 'phi-msft' Phi-2 layout (transformer.h.*, "
                              "mixer.Wqkv); download the current microsoft/phi-2 files (split q/k/v, "
                              "model_type 'phi')", source=source)
    problems = []
    for theirs, ours in _FIELDS[:4]:
        if theirs not in hf:
            problems.append(f"config.json has no field '{theirs}'")
    for theirs, ours in _FIELDS:
        if theirs in hf and hf[theirs] != getattr(cfg, ours):
            problems.append(f"config.json field '{theirs}' is {hf[theirs]}, but the model was built with "
                            f"{getattr(cfg, ours)} (PhiConfig.{ours})")
    heads = hf.get("num_attention_heads")
    kv = hf.get("num_key_value_heads")
    if kv is not None and heads is not None and kv != heads:
        problems.append(f"config.json field 'num_key_value_heads' is {kv}, but TinyGPT-V's fused attention "
                        f"needs as many key/value heads as query heads ({heads})")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    for fld, ours in (("partial_rotary_factor", cfg.partial_rotary_factor), ("rope_theta", cfg.rope_theta)):
        val = hf.get(fld, rope.get(fld) if isinstance(rope, Mapping) else None)
        if val is not None and not math.isclose(float(val), float(ours), rel_tol=1e-6):
            problems.append(f"config.json field '{fld}' is {val}, but the model was built with {ours} "
                            f"(PhiConfig.{fld})")
    if problems:
        raise WeightLoadError(f"{source}: the Phi-2 config does not match the model:\n  - "
                              + "\n  - ".join(problems), source=source)


# ----------------------------------------------------------------------------------- loading
def load_phi2(model, source, *, config: Mapping | None = None, check_config: bool = True,
              assign: bool | None = None) -> LoadReport:
    """Load Phi-2 into `model.phi` from a `microsoft/phi-2` folder (or one weights file, or an
    in-memory state dict with `config=` the config.json dict).

    Every Phi-2 tensor of the model must be provided; TinyGPT-V's added norms and LoRA are not
    touched (on a meta-device model the added norms are created as identity).
    """
    if isinstance(source, Mapping):
        sd, name = resolve_source(source)
    else:
        path = Path(source)
        folder = path if path.is_dir() else path.parent
        if config is None and (folder / "config.json").is_file():
            try:
                config = json.loads((folder / "config.json").read_text())
            except ValueError as e:
                raise WeightLoadError(f"{folder / 'config.json'} is not valid JSON: {e}", source=str(folder)) from None
        if config is None and check_config and path.is_dir():
            raise WeightLoadError(f"{path} has no config.json to check against the model "
                                  "(pass check_config=False to skip the check)", source=str(path))
        sd, name = resolve_source(path)
    if check_config and config is not None:
        check_phi2_config(config, model.cfg.phi, name)
    if any(k.startswith("transformer.") for k in sd):
        check_phi2_config({"model_type": "phi-msft"}, model.cfg.phi, name)
    mapped = map_phi2(sd, model.cfg.phi)
    target = model.state_dict()
    adapt_to_lora(mapped, target)
    required = [k for k in target if k.startswith("phi.") and "lora_" not in k and not ADDED_NORM.fullmatch(k)]
    report = apply_state_dict(model, mapped, name, required=required, assign=assign)
    identity_for_unset_added_norms(model)
    return report
