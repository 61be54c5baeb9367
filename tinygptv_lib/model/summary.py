"""Parameter counts per component, frozen vs trainable (the `tinygptv params` table)."""
from __future__ import annotations

from torch import nn

_ADDED_NORMS = ("q_layernorm", "k_layernorm", "post_layernorm")


def component_of(name: str) -> str:
    """Which component a parameter name of `TinyGPTV` belongs to."""
    if name.startswith("vision.encoder."):
        return "vision encoder (EVA ViT)"
    if name.startswith("vision.ln_vision."):
        return "ln_vision"
    if name.startswith("qformer."):
        return "Q-Former + query tokens"
    if name.startswith("projection.proj1."):
        return "proj1 (llama_proj)"
    if name.startswith("projection.proj2."):
        return "proj2 (llama_proj2)"
    if name.startswith("phi."):
        if "lora_" in name:
            return "LoRA (Phi attention)"
        if any(k in name for k in _ADDED_NORMS):
            return "Phi: TinyGPT-V's added norms"
        return "Phi-2"
    return "other"


ORDER = ["vision encoder (EVA ViT)", "ln_vision", "Q-Former + query tokens", "proj1 (llama_proj)",
         "proj2 (llama_proj2)", "Phi-2", "Phi: TinyGPT-V's added norms", "LoRA (Phi attention)", "other"]


def parameter_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """{component: {"total": n, "trainable": n}}; shared (tied) parameters are counted once."""
    counts: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():  # named_parameters() yields each tensor once
        c = counts.setdefault(component_of(name), {"total": 0, "trainable": 0})
        c["total"] += p.numel()
        if p.requires_grad:
            c["trainable"] += p.numel()
    return {k: counts[k] for k in ORDER if k in counts}


def parameter_table(model: nn.Module) -> str:
    counts = parameter_counts(model)
    w = max(len(k) for k in counts) + 2
    lines = [f"{'component':<{w}}{'total':>15}{'trainable':>15}{'frozen':>15}"]
    for k, c in counts.items():
        lines.append(f"{k:<{w}}{c['total']:>15,}{c['trainable']:>15,}{c['total'] - c['trainable']:>15,}")
    total = sum(c["total"] for c in counts.values())
    trainable = sum(c["trainable"] for c in counts.values())
    lines.append(f"trainable {trainable} total {total}")
    return "\n".join(lines)
