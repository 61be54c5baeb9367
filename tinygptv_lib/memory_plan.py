"""GPU memory plan of full-size TinyGPT-V per stage and precision, without a GPU.

Weights are counted exactly from the model built on the meta device, with the storage rule of
`TinyGPTV.cast_frozen`: trained parameters and every norm stay fp32, the other frozen weights take
the run's precision. AdamW keeps two fp32 moments per trained parameter, and the gradients are fp32.

Activations are estimated per token from what autograd keeps for backward in one Phi-2 layer. The
lists below were read off a full-width layer run under CUDA's autocast rules (fake tensors, so no
GPU needed): frozen linear layers keep nothing of their inputs (no weight gradient), so what stays
is the inputs of the norms, the LoRA branches, the attention (flash / memory-efficient kernels:
q, k, v, output and a log-sum-exp) and the GELU. The frozen ViT and Q-Former run without a graph:
they only need one block's working set at a time. The vocabulary head runs at target positions
only, but under autocast its fp16 logits, their fp32 copy and the log-softmax make ~14 bytes per
target and vocabulary row. Estimates, not measurements: `benchmarks/gpu_full_step.py` measures the
same steps on a GPU and prints both.

    from tinygptv_lib.memory_plan import plan_table
    print(plan_table())       # markdown: every stage x precision x checkpointing, 224 and 448 px
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

GiB = 2 ** 30
PRECISIONS = ("fp32", "bf16", "fp16")
# The original recipe (TINYGPTV_REFERENCE.md 3): image size, batch, and our longest sequence per
# stage: tokens per row = BOS + 32 image slots + prompt text + answer (max_txt_len), targets = the
# answer tokens (the worst case: every token after the prompt is an answer).
REFERENCE = {  # stage: (img, batch, tokens per row, targets per row)
    1: (224, 64, 1 + 32 + 32, 32),
    2: (224, 64, 1 + 32 + 32, 32),
    3: (224, 6, 1 + 32 + 32 + 160, 160),
    4: (448, 3, 1 + 32 + 64 + 1024, 1024),
}
T4_GIB = 15.0  # a "16 GB" T4 shows 15,360 MiB; ~0.3 GiB of it goes to the CUDA context
CONTEXT_GIB = 0.3
MARGIN = 0.9  # plan to 90% of what is left: allocator fragmentation and the estimate's error


@dataclass
class Dims:
    """The full-size widths the activation estimates need (from `get_config('full')`)."""

    vit_width: int
    vit_mlp: int
    vit_heads: int
    patch: int
    qf_width: int
    qf_layers: int
    queries: int
    proj_hidden: int
    d: int
    inter: int
    layers: int
    heads: int
    vocab: int
    lora_r: int

    @classmethod
    def full(cls) -> "Dims":
        from .config import get_config

        c = get_config("full")
        return cls(c.vision.width, c.vision.mlp_hidden, c.vision.num_heads, c.vision.patch_size,
                   c.qformer.hidden_size, c.qformer.num_layers, c.qformer.num_query_tokens, c.proj_hidden,
                   c.phi.hidden_size, c.phi.intermediate_size, c.phi.num_layers, c.phi.num_heads,
                   c.phi.vocab_size, c.lora.r)


# ----------------------------------------------------------------------------- weights (exact)


@dataclass(frozen=True)
class ParamCounts:
    trainable: int
    frozen_norms: int  # LayerNorm / RMSNorm weights and biases that are not trained: kept fp32
    frozen_other: int  # cast to the run's precision
    by_component: tuple  # ((component, total, trainable), ...)

    @property
    def total(self) -> int:
        return self.trainable + self.frozen_norms + self.frozen_other


@functools.lru_cache(maxsize=None)
def _stage2_params() -> tuple:
    """(name, numel, trainable, is_norm) of every parameter of the full stage-2 model on the meta device."""
    from torch import nn

    from .model.phi import RMSNorm
    from .model.tinygptv import build_model

    model = build_model("full", stage=2, device="meta")
    norms = {id(p) for m in model.modules() if isinstance(m, (nn.LayerNorm, RMSNorm))
             for p in m.parameters(recurse=False)}
    return tuple((n, p.numel(), p.requires_grad, id(p) in norms) for n, p in model.named_parameters())


def param_counts(stage: int, img: int = 224) -> ParamCounts:
    """Exact parameter counts of the full model for a stage: one meta-device build (no memory, a few
    seconds, then cached). Stage 1 is the same model without the LoRA weights; 448 px adds position
    embeddings (32 x 32 grid instead of 16 x 16)."""
    from .config import get_config
    from .model.summary import component_of

    vision = get_config("full").vision
    if stage not in REFERENCE:
        raise ValueError(f"stage must be one of {tuple(REFERENCE)}, got {stage!r}")
    trainable = frozen_norms = frozen_other = 0
    comps: dict[str, list[int]] = {}
    for name, n, train, norm in _stage2_params():
        if stage == 1 and "lora_" in name:
            continue
        if name == "vision.encoder.pos_embed":
            n = (1 + (img // vision.patch_size) ** 2) * (n // vision.num_tokens)
        c = comps.setdefault(component_of(name), [0, 0])
        c[0] += n
        if train:
            trainable += n
            c[1] += n
        elif norm:
            frozen_norms += n
        else:
            frozen_other += n
    return ParamCounts(trainable, frozen_norms, frozen_other, tuple((k, v[0], v[1]) for k, v in comps.items()))


def dtype_bytes(precision: str) -> int:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return 4 if precision == "fp32" else 2


def weight_bytes(stage: int, precision: str, img: int = 224) -> int:
    """Bytes of all parameters as `cast_frozen(precision)` stores them."""
    c = param_counts(stage, img)
    return 4 * (c.trainable + c.frozen_norms) + dtype_bytes(precision) * c.frozen_other


def training_state_bytes(stage: int, img: int = 224) -> dict[str, int]:
    """fp32 gradients and AdamW's two fp32 moments of the trained parameters."""
    n = param_counts(stage, img).trainable
    return {"gradients": 4 * n, "AdamW moments": 8 * n}


# ----------------------------------------------------------------------------- activations (estimated)


def phi_layer_saved(dims: Dims, precision: str, lora: bool) -> list[tuple[str, float]]:
    """Bytes that autograd keeps per token for one Phi-2 layer, item by item."""
    d, inter, r, h = dims.d, dims.inter, dims.lora_r, dims.heads
    if precision == "fp32":
        items = [("input LayerNorm: its input", 4 * d),
                 ("fused qkv output (q/k LayerNorm inputs, v)", 12 * d),
                 ("attention: rotated q, k and output", 12 * d), ("attention: log-sum-exp", 4 * h),
                 ("RMSNorm: input and normalised", 8 * d), ("two residual dropout masks", 2 * d),
                 ("GELU input", 4 * inter)]
        lora_items = [("LoRA (qkv, dense): dropout masks, lora_A and lora_B inputs", 2 * (d + 4 * d + 4 * r))]
    else:  # autocast: matmuls in 16 bits, norms in fp32
        items = [("input LayerNorm: its input cast to fp32", 4 * d),
                 ("q/k LayerNorm inputs cast to fp32", 8 * d),
                 ("attention: q, k, v, output (16-bit)", 8 * d), ("attention: log-sum-exp", 4 * h),
                 ("RMSNorm: input and normalised (fp32)", 8 * d), ("two residual dropout masks", 2 * d),
                 ("GELU input (16-bit)", 2 * inter)]
        lora_items = [("LoRA (qkv, dense): dropout masks, lora_A and lora_B inputs", 2 * (d + 2 * d + 2 * r))]
    return items + (lora_items if lora else [])


def vit_block_working_set(dims: Dims, precision: str) -> float:
    """Bytes per image token alive inside one frozen ViT block (no graph): residual, norm output,
    qkv, attention output and the MLP's hidden layer before and after its GELU."""
    a = dtype_bytes(precision)
    w, mlp = dims.vit_width, dims.vit_mlp
    return w * (a + 4 + 4 + 3 * a + 2 * a) + 2 * a * mlp  # LN in fp32 under autocast


@dataclass
class Plan:
    stage: int
    precision: str
    checkpointing: bool
    img: int
    batch: int
    tokens: int  # per row
    targets: int  # per row
    parts: dict = field(default_factory=dict)  # name -> bytes (resident + the peak phase)
    phase: str = ""

    @property
    def peak_bytes(self) -> float:
        return sum(self.parts.values())

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB


def plan_step(stage: int, precision: str, checkpointing: bool, img: int | None = None, batch: int | None = None,
              tokens: int | None = None, targets: int | None = None, dims: Dims | None = None) -> Plan:
    """Peak memory of one training step: weights + AdamW state + the largest of three phases
    (frozen towers; the language model's backward with the head; the optimizer step)."""
    ref_img, ref_batch, ref_tokens, ref_targets = REFERENCE[stage]
    img, batch = img or ref_img, batch or ref_batch
    tokens, targets = tokens or ref_tokens, targets if targets is not None else ref_targets
    dims = dims or Dims.full()
    a = dtype_bytes(precision)
    n_tok, n_tgt = batch * tokens, batch * targets
    vit_tokens = batch * (1 + (img // dims.patch) ** 2)
    state = training_state_bytes(stage, img)

    per_layer = sum(b for _, b in phi_layer_saved(dims, precision, lora=stage >= 2)) * n_tok
    if checkpointing:  # each layer keeps its input; backward re-runs one layer at a time
        saved = dims.layers * a * dims.d * n_tok + per_layer
    else:
        saved = dims.layers * per_layer
    saved += n_tok * dims.d * (2 * a + 4)  # input embeddings (and their spliced copy), final hidden states
    backward_transient = per_layer + 3 * 4 * dims.d * n_tok  # one layer's gradients + the hidden-state gradients
    head = (14 if precision != "fp32" else 4) * dims.vocab * n_tgt  # fp32: loss.py frees the logits in forward
    lm = saved + max(backward_transient, head) + state["gradients"]

    # one ViT block at a time, then ln_vision's output and one cross-attention's keys and values
    towers = vit_tokens * (vit_block_working_set(dims, precision) + a * dims.vit_width + 2 * a * dims.qf_width)
    optimizer = state["gradients"] + 2 * 4 * param_counts(stage, img).trainable  # foreach AdamW temporaries

    phases = {"frozen towers (ViT, Q-Former)": towers, "language model backward + head": lm,
              "optimizer step": optimizer}
    phase = max(phases, key=phases.get)
    parts = {"weights": weight_bytes(stage, precision, img), "AdamW moments": state["AdamW moments"],
             phase: phases[phase]}
    return Plan(stage, precision, checkpointing, img, batch, tokens, targets, parts, phase)


def usable_bytes(total_gib: float = T4_GIB) -> float:
    return (total_gib - CONTEXT_GIB) * MARGIN * GiB


def max_batch(stage: int, precision: str, checkpointing: bool, img: int | None = None,
              budget_gib: float = T4_GIB, limit: int | None = None) -> int:
    """The largest batch (up to the reference batch) whose planned peak fits the card; 0 if none."""
    limit = limit or REFERENCE[stage][1]
    best = 0
    for b in range(1, limit + 1):
        if plan_step(stage, precision, checkpointing, img=img, batch=b).peak_bytes <= usable_bytes(budget_gib):
            best = b
        else:
            break
    return best


def plan_inference(precision: str = "fp16", img: int = 448, batch: int = 1, prompt_tokens: int = 64,
                   new_tokens: int = 512, dims: Dims | None = None) -> dict[str, float]:
    """fp16 chat: every weight in 16 bits (`.half()`), the KV cache, one ViT block's working set and
    the last position's logits."""
    dims = dims or Dims.full()
    a = dtype_bytes(precision)
    c = param_counts(4, img)
    vit_tokens = batch * (1 + (img // dims.patch) ** 2)
    seq = prompt_tokens + new_tokens
    return {"weights": a * c.total,
            "KV cache": 2 * dims.layers * batch * seq * dims.d * a,
            "ViT working set": vit_tokens * vit_block_working_set(dims, precision),
            "logits and one layer's activations": batch * (4 * dims.vocab + seq * dims.heads * 4
                                                           + prompt_tokens * (3 * dims.d + dims.inter) * a)}


# ----------------------------------------------------------------------------- tables


def plan_rows(budget_gib: float = T4_GIB, stages=(1, 2, 3, 4)) -> list[dict]:
    rows = []
    usable = usable_bytes(budget_gib)
    for stage in stages:
        for img in (224, 448):
            for precision in PRECISIONS:
                for ckpt in (True, False):
                    p = plan_step(stage, precision, ckpt, img=img)
                    fits = p.peak_bytes <= usable
                    mb = p.batch if fits else max_batch(stage, precision, ckpt, img=img, budget_gib=budget_gib)
                    rows.append({"stage": stage, "img": img, "precision": precision, "checkpointing": ckpt,
                                 "batch": p.batch, "tokens": p.tokens, "peak_gib": p.peak_gib,
                                 "weights_gib": p.parts["weights"] / GiB, "phase": p.phase, "fits": fits,
                                 "max_batch": mb, "advice": advice(p, fits, mb)})
    return rows


def advice(p: Plan, fits: bool, mb: int) -> str:
    if fits:
        return ""
    if p.parts["weights"] + p.parts["AdamW moments"] > usable_bytes():
        return "weights alone exceed the card: store frozen weights in fp16/bf16"
    accum = -(-p.batch // mb) if mb else 0
    if mb:
        extra = "" if p.checkpointing else "; or turn on gradient checkpointing"
        return f"micro-batch {mb} x {accum} accumulation steps (same effective batch {p.batch}){extra}"
    return "does not fit even at batch 1: turn on gradient checkpointing" if not p.checkpointing else \
        "does not fit at batch 1: shorten max_txt_len"


def plan_table(budget_gib: float = T4_GIB, stages=(1, 2, 3, 4)) -> str:
    """Markdown table of every stage x image size x precision x checkpointing at the reference batch."""
    usable = usable_bytes(budget_gib) / GiB
    lines = [f"Planned peak GPU memory of a full-size training step at the reference batch (budget: a "
             f"{budget_gib:g} GiB card less {CONTEXT_GIB} GiB CUDA context, planned to {MARGIN:.0%}: "
             f"{usable:.1f} GiB)", "",
             "| stage | image | batch x tokens | precision | checkpointing | weights GiB | peak GiB | largest phase "
             "| fits | largest batch that fits | what would make it fit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in plan_rows(budget_gib, stages):
        lines.append(f"| {r['stage']} | {r['img']} | {r['batch']} x {r['tokens']} | {r['precision']} | "
                     f"{'yes' if r['checkpointing'] else 'no'} | {r['weights_gib']:.1f} | {r['peak_gib']:.1f} | "
                     f"{r['phase']} | {'yes' if r['fits'] else 'no'} | {r['max_batch']} | {r['advice']} |")
    inf = plan_inference()
    total = sum(inf.values()) / GiB
    lines += ["", f"fp16 inference, 448 px, batch 1, 64 prompt + 512 new tokens: {total:.2f} GiB "
              f"({', '.join(f'{k} {v / GiB:.2f}' for k, v in inf.items())})"]
    return "\n".join(lines)


if __name__ == "__main__":
    print(plan_table())
