"""Shared pieces of the CPU benchmarks: the two sizes, our model and the transformers BLIP-2 peer
built at identical dimensions, identical batches, alternating timers, torch.mm's rate, FLOP and
peak-memory counters.

The peer is what a user would write without this course: transformers' `Blip2ForConditionalGeneration`
with a `PhiConfig` text model (it builds `PhiForCausalLM`) and peft LoRA on the language model.
"""
from __future__ import annotations

import gc
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from tinygptv_lib.config import LoraConfig, PhiConfig, QFormerConfig, TinyGPTVConfig, VisionConfig  # noqa: E402
from tinygptv_lib.model.sequence import IGNORE, IMAGE_SLOT, TextBatch  # noqa: E402

BOS = 50256


def image_token(s: "Size") -> int:
    """The peer's image placeholder id: the first padded vocabulary row (50,295, unused by the tokenizer)."""
    return 50295 if s.vocab > 50295 else s.vocab - 1


@dataclass(frozen=True)
class Size:
    """Dimensions shared by both models. Phi: head dim 64 with partial rotary factor 0.5 (32 rotary
    dims, as Phi-2's 0.4 x 80): Phi-2's own 0.4 needs a head dim that is a multiple of 5, and the
    widths 256 and 512 of the measured baseline have none."""

    name: str
    img: int = 224
    patch: int = 14
    vit_width: int = 192
    vit_layers: int = 6
    vit_heads: int = 3
    qf_width: int = 192
    qf_layers: int = 4
    qf_heads: int = 4
    proj_hidden: int = 512  # ours only: llama_proj's width (the peer has one projection)
    phi_width: int = 256
    phi_layers: int = 4
    phi_heads: int = 4
    rotary: float = 0.5
    vocab: int = 51200
    lora_r: int = 16
    queries: int = 32

    def describe(self) -> str:
        return (f"{self.name}: vision {self.img} px/{self.patch}, width {self.vit_width} x {self.vit_layers} layers; "
                f"Q-Former {self.qf_width} x {self.qf_layers}, {self.queries} queries; Phi {self.phi_width} x "
                f"{self.phi_layers} layers, {self.phi_heads} heads (head dim {self.phi_width // self.phi_heads}, "
                f"rotary {self.rotary}), vocab {self.vocab}; LoRA r={self.lora_r}")


SIZES = {
    "nano": Size("nano"),
    "larger": Size("larger", vit_width=384, vit_layers=8, vit_heads=6, qf_width=384, qf_layers=6, qf_heads=6,
                   proj_hidden=1024, phi_width=512, phi_layers=8, phi_heads=8),
    # smoke: tiny, for tests that only prove the scripts run
    "smoke": Size("smoke", img=56, vit_width=32, vit_layers=1, vit_heads=2, qf_width=32, qf_layers=2, qf_heads=2,
                  proj_hidden=32, phi_width=64, phi_layers=1, phi_heads=1, lora_r=4),
}


def set_threads(n: int | None) -> int:
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


# ----------------------------------------------------------------------------- the two models


def our_config(s: Size) -> TinyGPTVConfig:
    return TinyGPTVConfig(
        preset="bench-" + s.name,
        vision=VisionConfig(img_size=s.img, patch_size=s.patch, width=s.vit_width, depth=s.vit_layers,
                            num_heads=s.vit_heads, mlp_hidden=4 * s.vit_width),
        qformer=QFormerConfig(hidden_size=s.qf_width, num_layers=s.qf_layers, num_heads=s.qf_heads,
                              intermediate_size=4 * s.qf_width, num_query_tokens=s.queries),
        proj_hidden=s.proj_hidden,
        phi=PhiConfig(hidden_size=s.phi_width, num_layers=s.phi_layers, num_heads=s.phi_heads,
                      intermediate_size=4 * s.phi_width, vocab_size=s.vocab, partial_rotary_factor=s.rotary,
                      tie_word_embeddings=False),
        lora=LoraConfig(r=s.lora_r, alpha=s.lora_r // 4, dropout=0.05),
    )


def build_ours(s: Size, stage: int = 2, seed: int = 0):
    from tinygptv_lib.model.tinygptv import TinyGPTV

    torch.manual_seed(seed)
    model = TinyGPTV(our_config(s), stage=stage)
    return model


def build_peer(s: Size, seed: int = 0, lora: bool = True):
    """Blip2ForConditionalGeneration + PhiForCausalLM (stock Phi with its own qk_layernorm option on),
    peft LoRA on the language model's q/k/v/dense only, frozen towers, trainable projection and
    LM norm weights (the same trainable set as ours, save our extra RMSNorms and second projection)."""
    from transformers import Blip2Config
    from transformers import PhiConfig as HFPhiConfig
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(seed)
    text = HFPhiConfig(vocab_size=s.vocab, hidden_size=s.phi_width, intermediate_size=4 * s.phi_width,
                       num_hidden_layers=s.phi_layers, num_attention_heads=s.phi_heads,
                       num_key_value_heads=s.phi_heads, resid_pdrop=0.1, embd_pdrop=0.0, attention_dropout=0.0,
                       hidden_act="gelu_new", qk_layernorm=True, tie_word_embeddings=False,
                       bos_token_id=BOS, eos_token_id=BOS, pad_token_id=None,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                        "partial_rotary_factor": s.rotary})
    cfg = Blip2Config(
        vision_config=dict(hidden_size=s.vit_width, intermediate_size=4 * s.vit_width,
                           num_hidden_layers=s.vit_layers, num_attention_heads=s.vit_heads, image_size=s.img,
                           patch_size=s.patch),
        qformer_config=dict(hidden_size=s.qf_width, num_hidden_layers=s.qf_layers, num_attention_heads=s.qf_heads,
                            intermediate_size=4 * s.qf_width, encoder_hidden_size=s.vit_width),
        text_config=text.to_dict(),
        num_query_tokens=s.queries,
        image_token_index=image_token(s),  # unset, the placeholders are never found
    )
    cfg.text_config.rope_parameters = text.rope_parameters
    model = Blip2ForConditionalGeneration(cfg)
    model.requires_grad_(False)
    if lora:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        # a plain ["q_proj", ..., "dense"] list would also wrap the Q-Former's `dense` layers
        pc = PeftLoraConfig(r=s.lora_r, lora_alpha=s.lora_r // 4, lora_dropout=0.05, bias="none",
                            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|dense)")
        model = get_peft_model(model, pc)
    inner = peer_inner(model)
    inner.language_projection.requires_grad_(True)
    for n, p in inner.language_model.named_parameters():
        if "layernorm" in n and n.endswith("weight"):
            p.requires_grad_(True)
    return model


def peer_inner(model):
    """The Blip2ForConditionalGeneration inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def set_train(model, peer: bool) -> None:
    """Training mode with the frozen towers in eval mode (no dropout there), for both models alike."""
    model.train()
    if peer:
        inner = peer_inner(model)
        inner.vision_model.eval()
        inner.qformer.eval()


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- identical batches


@dataclass
class StepBatch:
    ours: TextBatch
    peer_ids: torch.Tensor
    peer_mask: torch.Tensor
    peer_labels: torch.Tensor
    pixels: torch.Tensor
    num_targets: int


def make_step_batch(s: Size, batch: int, prompt_len: int = 16, answer_len: int = 32, seed: int = 0) -> StepBatch:
    """[32 image tokens][prompt_len prompt tokens, BOS first][answer_len answer tokens], no padding.

    Ours marks the image positions IMAGE_SLOT; the peer marks them with its image token. The
    answer tokens are the targets: position t predicts token t + 1 in both models."""
    g = torch.Generator().manual_seed(seed)
    T = s.queries + prompt_len + answer_len
    text = torch.randint(0, min(50000, s.vocab - 1), (batch, T), generator=g)
    text[:, s.queries] = BOS
    ours_ids = text.clone()
    ours_ids[:, : s.queries] = IMAGE_SLOT
    peer_ids = text.clone()
    peer_ids[:, : s.queries] = image_token(s)
    targets = torch.full_like(text, IGNORE)
    targets[:, T - answer_len:] = text[:, T - answer_len:]
    mask = torch.ones_like(text)
    ours = TextBatch(ours_ids, mask, targets, torch.ones(batch, dtype=torch.bool))
    pixels = torch.randn(batch, 3, s.img, s.img, generator=g)
    return StepBatch(ours, peer_ids, mask, targets.clone(), pixels, batch * answer_len)


def ours_loss(model, b: StepBatch) -> torch.Tensor:
    return model(b.ours, b.pixels)["loss"]


def peer_loss(model, b: StepBatch) -> torch.Tensor:
    return model(pixel_values=b.pixels, input_ids=b.peer_ids, attention_mask=b.peer_mask, labels=b.peer_labels).loss


def train_step(model, loss_fn, b: StepBatch, opt) -> float:
    loss = loss_fn(model, b)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


# ----------------------------------------------------------------------------- measuring


def alternate(fns: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each callable `repeats` times, interleaved (a, b, c, a, b, c, ...), after `warmup` rounds,
    so that a neighbour's load on a shared machine falls on all of them alike. Seconds per call."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for i in range(repeats):
        order = list(fns) if i % 2 == 0 else list(fns)[::-1]
        for k in order:
            gc.collect()
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def mm_rate_fn(n: int = 1024):
    """A callable doing one fp32 n x n torch.mm (2 n^3 FLOPs) and its FLOP count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)

    def f():
        for _ in range(4):
            torch.mm(a, b, out=out)

    return f, 4 * 2 * n ** 3


def _register_cpu_sdpa_flops() -> None:
    """torch's FLOP counter knows the CUDA SDPA kernels; count the CPU flash kernel the same way."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in fc.flop_registry:
        return

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    onednn_linear = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if onednn_linear is not None:  # our frozen linears (tinygptv_lib/model/fast_cpu.py)
        @fc.register_flop_formula(onednn_linear)
        def _linear(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
            return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


def count_flops(fn) -> int:
    """FLOPs that `fn()` executes (matmuls, convolutions, attention; forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa_flops()
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def peak_tensor_bytes(fn) -> int:
    """Peak of CPU tensor memory allocated during `fn()` above what was allocated before it (bytes),
    from the profiler's allocation records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    recs = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    recs.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in recs:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def machine_line() -> str:
    import platform

    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}; {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}; torch {torch.__version__}, "
            f"transformers {transformers.__version__}; load average {load:.2f} at start")
