"""Loading real weights into TinyGPT-V: one loader per source layout.

    load_eva_vit(model, "eva_vit_g.pth")                       # EVA ViT-g (LAVIS or HF BLIP-2 layout)
    load_blip2_qformer(model, "blip2_pretrained_flant5xxl.pth")  # Q-Former, query tokens, ln_vision
    load_phi2(model, "phi-2/")                                  # microsoft/phi-2 folder, q/k/v fused
    load_release_checkpoint(model, "TinyGPT-V_for_Stage4.pth")  # projections, norms, LoRA
    model = build_from_release(stage_pth, phi2_dir, eva_path, blip2_path)  # all four at once

Every loader checks everything before it changes anything and raises one `WeightLoadError`
naming the source and listing every missing key, unexpected key and shape mismatch. Pickles are
only ever opened weights-only; one that would run code raises `UnsafeCheckpointError`.
"""
from .blip2 import load_blip2_qformer, map_blip2
from .common import (
    LoadReport,
    Mapped,
    UnsafeCheckpointError,
    WeightLoadError,
    apply_state_dict,
    read_checkpoint,
    read_state_dict,
)
from .eva import load_eva_vit, map_eva, resample_pos_embed
from .nano import NANO_BACKBONES, load_nano_backbones  # noqa: F401  (the shipped nano towers)
from .phi2 import check_phi2_config, fuse_qkv, load_phi2, map_phi2, split_qkv
from .release import build_from_release, load_minigpt4_projection, load_release_checkpoint, map_release

__all__ = [
    "LoadReport",
    "Mapped",
    "UnsafeCheckpointError",
    "WeightLoadError",
    "apply_state_dict",
    "build_from_release",
    "check_phi2_config",
    "fuse_qkv",
    "load_blip2_qformer",
    "load_eva_vit",
    "load_minigpt4_projection",
    "load_phi2",
    "load_release_checkpoint",
    "map_blip2",
    "map_eva",
    "map_phi2",
    "map_release",
    "read_checkpoint",
    "read_state_dict",
    "resample_pos_embed",
    "split_qkv",
]
