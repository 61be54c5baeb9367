"""Pretraining the nano backbones that TinyGPT-V then keeps frozen.

TinyGPT-V froze towers that were pretrained elsewhere: EVA-CLIP's ViT, BLIP-2's Q-Former and
Phi-2. The nano preset must not freeze random towers, so this package pretrains its own on the
shapes world, in one reproducible command (about an hour on a 2-core laptop):

    python -m tinygptv_lib.pretrain --out tinygptv_lib/assets/nano_backbones --seed 0

    texts.py           every text used: captions, scene sheets, and LM documents in the stage layouts
    heads.py           the throw-away teachers: text encoder (ITC), caption decoder (ITG), slot head
    dense_stage.py     first, the ViT alone on dense labels (patch colour, centre shape, box-pooled object)
    vision_stage.py    ViT + Q-Former with BLIP-2's first-stage losses (+ object slots)
    language_stage.py  the nano Phi as a causal LM
    seeing_stage.py    Phi's third phase: the towers' queries in the image slot (`--part seeing`)
    evaluate.py        retrieval, perplexity, probes of what the frozen queries know, sheet reading
    export.py          writing the real full-size layouts (LAVIS EVA, LAVIS BLIP-2, microsoft/phi-2)
    run.py, cli.py     the one command, and `register(subparsers)` for the `tinygptv` CLI
"""
from .run import PretrainSettings, load_heads, measure, pretrain

__all__ = ["PretrainSettings", "load_heads", "measure", "pretrain"]
