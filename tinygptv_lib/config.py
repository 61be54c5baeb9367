"""One configuration object selects everything: `get_config("full")` or `get_config("nano")`.

`full` is the real TinyGPT-V (EVA ViT-g/14 -> BLIP-2 Q-Former -> two projections -> Phi-2).
`nano` is the same classes with small numbers so that the whole course trains on a laptop CPU.
Every nano number sits next to its full-size value in the comments below.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class VisionConfig:
    """EVA ViT (timm's `Eva` class) with its last block dropped, plus `ln_vision`."""

    img_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39  # EVA ViT-g has 40 blocks; BLIP-2 drops the last (penultimate features)
    num_heads: int = 16
    mlp_hidden: int = 6144  # ratio 4.3637 of 1408
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:  # patches + CLS
        return self.num_patches + 1


@dataclass
class QFormerConfig:
    """BLIP-2 Q-Former without its text branch (transformers' `Blip2QFormerModel`)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2  # cross-attention to the image in layers 0, 2, 4, ...
    num_query_tokens: int = 32
    layer_norm_eps: float = 1e-12


@dataclass
class PhiConfig:
    """Phi-2 plus TinyGPT-V's norms (see `model/phi.py`)."""

    hidden_size: int = 2560
    num_layers: int = 32
    num_heads: int = 32  # head dim 80
    intermediate_size: int = 10240
    vocab_size: int = 51200  # tokenizer has 50,295 entries; rows padded to 51,200
    partial_rotary_factor: float = 0.4  # rotary on 32 of 80 head dims
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    post_norm_eps: float = 1e-6  # TinyGPT-V's RMSNorm after the attention output
    resid_pdrop: float = 0.1  # Phi-2's residual dropout
    tie_word_embeddings: bool = False
    attn_implementation: str = "sdpa"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class LoraConfig:
    """LoRA on Phi's attention (fused query_key_value and dense), stages 2-4 only."""

    r: int = 64
    alpha: int = 16  # scaling alpha / r = 0.25
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query_key_value", "dense")


@dataclass
class TinyGPTVConfig:
    preset: str = "full"
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    proj_hidden: int = 4096  # llama_proj: 768 -> 4096 (MiniGPT-4's Vicuna width), then 4096 -> 2560
    phi: PhiConfig = field(default_factory=PhiConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    pad_token_id: int = 50256
    image_placeholder: str = "<ImageHere>"
    seed: int = 42

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TinyGPTVConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config field(s) {sorted(unknown)}; expected some of {sorted(known)}")
        sub = {"vision": VisionConfig, "qformer": QFormerConfig, "phi": PhiConfig, "lora": LoraConfig}
        kwargs = {}
        for k, v in d.items():
            if k in sub and isinstance(v, dict):
                sub_known = {f.name for f in dataclasses.fields(sub[k])}
                bad = set(v) - sub_known
                if bad:
                    raise ValueError(f"unknown field(s) {sorted(bad)} in config section '{k}'")
                if "target_modules" in v:
                    v = {**v, "target_modules": tuple(v["target_modules"])}
                v = sub[k](**v)
            kwargs[k] = v
        return cls(**kwargs)


def _full() -> TinyGPTVConfig:
    return TinyGPTVConfig(preset="full")


def _nano() -> TinyGPTVConfig:
    return TinyGPTVConfig(
        preset="nano",
        vision=VisionConfig(
            img_size=112,  # full: 224 (448 in stage 4)
            patch_size=14,  # full: 14
            width=192,  # full: 1408
            depth=6,  # full: 39
            num_heads=3,  # full: 16 (head dim 64 here, 88 there)
            mlp_hidden=768,  # full: 6144
        ),
        qformer=QFormerConfig(
            hidden_size=192,  # full: 768
            num_layers=4,  # full: 12
            num_heads=4,  # full: 12
            intermediate_size=768,  # full: 3072
            cross_attention_frequency=2,  # full: 2
            num_query_tokens=32,  # full: 32 (kept: the sequence layout is the same)
        ),
        proj_hidden=512,  # full: 4096
        phi=PhiConfig(
            hidden_size=160,  # full: 2560
            num_layers=4,  # full: 32
            num_heads=4,  # full: 32 (head dim 40 here, 80 there; rotary on 16 / 32 dims)
            intermediate_size=640,  # full: 10240
            vocab_size=51200,  # full: 51200 (the same real tokenizer)
            max_position_embeddings=2048,  # full: 2048
            tie_word_embeddings=True,  # full: False (tied here so the shipped LM stays small)
        ),
        lora=LoraConfig(r=16, alpha=4, dropout=0.05),  # full: r 64, alpha 16 (same 0.25 scaling)
    )


PRESETS = {"full": _full, "nano": _nano}


def get_config(preset: str = "nano") -> TinyGPTVConfig:
    """A fresh config for a preset name ("full" or "nano")."""
    try:
        return PRESETS[preset]()
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}") from None
