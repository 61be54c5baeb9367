"""The shipped nano backbones: pretrained, frozen towers for the nano preset.

TinyGPT-V starts from towers that others pretrained (EVA-CLIP's ViT, BLIP-2's Q-Former, Phi-2).
The nano preset does the same with `tinygptv_lib/assets/nano_backbones/`, made by
`python -m tinygptv_lib.pretrain` and written in the real layouts, so they load through the same
loaders as the full-size files:

    load_nano_backbones(model)    # = load_eva_vit + load_blip2_qformer + load_phi2 on the shipped folder
"""
from __future__ import annotations

import os
from pathlib import Path

from .blip2 import load_blip2_qformer
from .common import LoadReport, WeightLoadError
from .eva import load_eva_vit
from .phi2 import load_phi2

NANO_BACKBONES = Path(__file__).resolve().parent.parent / "assets" / "nano_backbones"
EVA_FILE = "eva_vit_nano.safetensors"
BLIP2_FILE = "blip2_qformer_nano.safetensors"
PHI_DIR = "phi-2-nano"


def load_nano_backbones(model, path: str | os.PathLike | None = None) -> list[LoadReport]:
    """Load the pretrained nano ViT, ln_vision + Q-Former + query tokens, and Phi into `model`.

    `path` defaults to the shipped folder. The projections (and LoRA, if any) are not touched: they
    are what TinyGPT-V's stages train. A model whose numbers differ from the backbones' raises a
    `WeightLoadError` that lists every mismatched tensor.
    """
    folder = Path(path) if path is not None else NANO_BACKBONES
    missing = [f for f in (EVA_FILE, BLIP2_FILE, f"{PHI_DIR}/model.safetensors", f"{PHI_DIR}/config.json")
               if not (folder / f).is_file()]
    if missing:
        raise WeightLoadError(f"{folder} lacks {', '.join(missing)}; make the backbones with "
                              f"`python -m tinygptv_lib.pretrain --out {folder}`", source=str(folder))
    return [
        load_eva_vit(model, folder / EVA_FILE),
        load_blip2_qformer(model, folder / BLIP2_FILE, include_vision=False),
        load_phi2(model, folder / PHI_DIR),
    ]
