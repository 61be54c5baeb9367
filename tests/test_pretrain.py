"""The pretrained nano backbones: they load through the real loaders, they know the shapes world,
and the code that made them is deterministic and learns."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors import safe_open

from tinygptv_lib.config import PhiConfig, QFormerConfig, VisionConfig, get_config
from tinygptv_lib.model.tinygptv import build_model
from tinygptv_lib.pretrain import PretrainSettings, load_heads, pretrain
from tinygptv_lib.pretrain import evaluate as E
from tinygptv_lib.pretrain.cli import register
from tinygptv_lib.pretrain.language_stage import LanguageSettings, heldout_documents, train_language
from tinygptv_lib.pretrain.vision_stage import (VisionSettings, build_vocab, heldout_scenes, scene_pixels,
                                                train_vision)
from tinygptv_lib.tokenizer import load_tokenizer
from tinygptv_lib.weights import NANO_BACKBONES, load_nano_backbones
from tinygptv_lib.weights.phi2 import ADDED_NORM

MB = 1024 * 1024


def test_shipped_files_are_in_the_real_layouts_and_small():
    files = [p for p in NANO_BACKBONES.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * MB
    assert max(p.stat().st_size for p in files) <= 25 * MB
    keys = {}
    for name in ("eva_vit_nano.safetensors", "blip2_qformer_nano.safetensors", "phi-2-nano/model.safetensors"):
        with safe_open(str(NANO_BACKBONES / name), "pt") as f:
            keys[name] = set(f.keys())
    assert {"cls_token", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.attn.q_bias"} <= keys["eva_vit_nano.safetensors"]
    assert {"query_tokens", "ln_vision.weight", "Qformer.bert.embeddings.LayerNorm.weight",
            "Qformer.bert.encoder.layer.0.crossattention.self.query.weight"} <= keys["blip2_qformer_nano.safetensors"]
    phi = keys["phi-2-nano/model.safetensors"]
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.bias"} <= phi
    assert not any("query_key_value" in k for k in phi)
    quality = json.loads((NANO_BACKBONES / "quality.json").read_text())
    assert {"retrieval", "perplexity", "steps", "seconds", "seed", "torch_version"} <= set(quality)


def test_shipped_backbones_load_completely_and_change_the_weights():
    torch.manual_seed(0)
    model = build_model("nano", stage=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reports = load_nano_backbones(model)
    loaded = {k for r in reports for k in r.loaded}
    wanted = {k for k in before if k.startswith(("vision.", "qformer.", "phi."))
              and not ADDED_NORM.fullmatch(k) and k != "phi.lm_head.weight"}  # lm_head is tied to embed_tokens
    assert wanted <= loaded, sorted(wanted - loaded)[:5]
    after = model.state_dict()
    for key in ("vision.encoder.patch_embed.proj.weight", "vision.ln_vision.weight", "qformer.query_tokens",
                "qformer.model.encoder.layer.0.crossattention.attention.key.weight",
                "phi.model.embed_tokens.weight", "phi.model.layers.0.self_attn.query_key_value.weight"):
        assert not torch.equal(before[key], after[key]), key
    assert torch.equal(after["projection.proj1.weight"], before["projection.proj1.weight"])  # trained later
    assert model.phi.lm_head.weight is model.phi.model.embed_tokens.weight


def test_shipped_towers_retrieve_held_out_captions_far_above_chance():
    heads, vocab = load_heads(NANO_BACKBONES)
    scenes = heldout_scenes(50)
    pixels = torch.stack([scene_pixels(s, get_config("nano").vision.img_size) for s in scenes])
    r = E.retrieval(heads.queries, heads.contrastive, load_tokenizer(), vocab, scenes, pixels)
    assert r["chance"] == 1 / 50
    assert r["image_to_text_top1"] >= 10 * r["chance"], r


def test_shipped_phi_has_a_low_held_out_perplexity():
    docs = heldout_documents(load_tokenizer(), 24, LanguageSettings())
    torch.manual_seed(0)
    random_model = build_model("nano", stage=None)
    model = build_model("nano", stage=None)
    load_nano_backbones(model)
    ppl, random_ppl = E.perplexity(model.phi.eval(), docs), E.perplexity(random_model.phi.eval(), docs)
    assert random_ppl > 10_000
    assert ppl < 10 and ppl < random_ppl / 1000, (ppl, random_ppl)


def _tiny_config():
    cfg = get_config("nano")
    cfg.vision = VisionConfig(img_size=28, patch_size=14, width=32, depth=1, num_heads=2, mlp_hidden=64)
    cfg.qformer = QFormerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    cfg.proj_hidden = 32
    cfg.phi = PhiConfig(hidden_size=40, num_layers=1, num_heads=1, intermediate_size=80, tie_word_embeddings=True)
    return cfg


def _tiny_settings(steps: int = 4) -> PretrainSettings:
    vision = VisionSettings(steps=steps, batch=4, lr=2e-3, warmup=2, embed_dim=16, text_width=32, text_layers=1,
                            text_heads=2, decoder_width=32, decoder_layers=1, decoder_heads=2)
    return PretrainSettings(vision, LanguageSettings(steps=steps, batch=4, warmup=2, lr=3e-3),
                            eval_images=8, eval_documents=4)


def test_tiny_pretraining_is_deterministic_and_its_losses_fall():
    cfg, s, tok = _tiny_config(), _tiny_settings(steps=10), load_tokenizer()
    vocab = build_vocab(tok, n_scenes=50)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        vision, vision_history = train_vision(cfg, s.vision, 3, tok, vocab)
        torch.manual_seed(0)
        phi, language_history = train_language(cfg, s.language, 3, tok)
        runs.append((vision.state_dict(), phi.state_dict(), vision_history, language_history))
    (v1, p1, vh, lh), (v2, p2, _, _) = runs
    assert all(torch.equal(v1[k], v2[k]) for k in v1) and all(torch.equal(p1[k], p2[k]) for k in p1)
    assert sum(h["loss"] for h in vh[-3:]) / 3 < vh[0]["loss"]
    assert sum(h["loss"] for h in lh[-3:]) / 3 < lh[0]["loss"]


def test_tiny_pretrain_command_writes_files_that_load_and_reproduce(tmp_path):
    cfg = _tiny_config()
    q1 = pretrain(tmp_path / "a", seed=1, cfg=cfg, settings=_tiny_settings(), progress=False)
    q2 = pretrain(tmp_path / "b", seed=1, cfg=cfg, settings=_tiny_settings(), progress=False)
    for key in ("retrieval", "perplexity", "probes", "training_loss"):
        assert q1[key] == q2[key]
    for name in ("eva_vit_nano.safetensors", "blip2_qformer_nano.safetensors", "phi-2-nano/model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert q1["retrieval"]["chance"] == 1 / 8 and q1["seed"] == 1
    model = build_model(cfg, stage=2)  # with LoRA: the Phi base weights go under .base_layer
    load_nano_backbones(model, tmp_path / "a")


def test_register_adds_a_pretrain_subcommand():
    parser = argparse.ArgumentParser(prog="tinygptv")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pretrain", "--out", "somewhere", "--seed", "3"])
    assert args.command == "pretrain" and args.out == "somewhere" and args.seed == 3 and callable(args.func)


def test_loading_into_a_model_of_other_numbers_fails_clearly():
    from tinygptv_lib.weights import WeightLoadError

    with pytest.raises(WeightLoadError):
        load_nano_backbones(build_model(_tiny_config(), stage=None))
