"""Weight loaders: fake sources with the real key names and layouts, checked numerically.

No real weights can be downloaded here, so every source is a small (or, on the meta device,
full-size) state dict written in the real file formats: LAVIS `.pth` dicts with "model", a Phi-2
folder with config.json, safetensors shards and an index, and a released TinyGPT-V stage checkpoint
with optimizer state. The loaded model must compute what the source layout computes.
"""
import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
from conftest import EvilPickle
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from tinygptv_lib.config import LoraConfig, PhiConfig, QFormerConfig, VisionConfig, get_config
from tinygptv_lib.model.fast_cpu import use_fast_cpu_layers
from tinygptv_lib.model.qformer import build_qformer_config
from tinygptv_lib.model.tinygptv import build_model
from tinygptv_lib.model.vision import build_vision_encoder
from tinygptv_lib.weights import (
    UnsafeCheckpointError,
    WeightLoadError,
    build_from_release,
    fuse_qkv,
    load_blip2_qformer,
    load_eva_vit,
    load_minigpt4_projection,
    load_phi2,
    load_release_checkpoint,
    read_state_dict,
    split_qkv,
)

# ----------------------------------------------------------------------------------- sizes
HID, LAYERS, HEADS, HD, INTER, ROT = 80, 2, 2, 40, 160, 16  # Phi: head dim 40, rotary 16
VOCAB = 50304  # our Phi config pads with id 50256, so the vocabulary must hold it
W, VDEPTH, VHEADS, VMLP = 32, 2, 2, 64  # ViT (the source has one block more)
QH, QLAYERS, QINTER, NQ = 32, 2, 64, 4  # Q-Former
PROJ, R, ALPHA = 48, 4, 2


def tiny_cfg(img_size: int = 28):
    cfg = get_config("nano")
    cfg.vision = VisionConfig(img_size=img_size, patch_size=14, width=W, depth=VDEPTH, num_heads=VHEADS,
                              mlp_hidden=VMLP)
    cfg.qformer = QFormerConfig(hidden_size=QH, num_layers=QLAYERS, num_heads=2, intermediate_size=QINTER,
                                num_query_tokens=NQ)
    cfg.proj_hidden = PROJ
    cfg.phi = PhiConfig(hidden_size=HID, num_layers=LAYERS, num_heads=HEADS, intermediate_size=INTER,
                        vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False)
    cfg.lora = LoraConfig(r=R, alpha=ALPHA, dropout=0.05)
    return cfg


def phi2_config_json(hidden=HID, layers=LAYERS, heads=HEADS, inter=INTER, vocab=VOCAB):
    """A config.json with the fields microsoft/phi-2's has (numbers scaled down)."""
    return {"architectures": ["PhiForCausalLM"], "model_type": "phi", "hidden_size": hidden,
            "intermediate_size": inter, "num_attention_heads": heads, "num_hidden_layers": layers,
            "num_key_value_heads": heads, "vocab_size": vocab, "partial_rotary_factor": 0.4,
            "rope_theta": 10000.0, "layer_norm_eps": 1e-5, "hidden_act": "gelu_new",
            "max_position_embeddings": 64, "qk_layernorm": False, "tie_word_embeddings": False,
            "resid_pdrop": 0.1, "embd_pdrop": 0.0, "attention_dropout": 0.0, "bos_token_id": 1,
            "eos_token_id": 1, "torch_dtype": "float16"}


# ----------------------------------------------------------------------------------- fake sources
def _w(*shape, device="cpu", scale=0.2):
    return torch.randn(*shape, device=device) * scale


def _norm(n, device="cpu"):
    return 1 + _w(n, device=device, scale=0.1), _w(n, device=device, scale=0.1)


def fake_phi2(hidden=HID, layers=LAYERS, inter=INTER, vocab=VOCAB, device="cpu"):
    """microsoft/phi-2 names: split q_proj / k_proj / v_proj."""
    sd = {"model.embed_tokens.weight": _w(vocab, hidden, device=device, scale=1.0)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "dense"):
            sd[p + f"self_attn.{name}.weight"] = _w(hidden, hidden, device=device)
            sd[p + f"self_attn.{name}.bias"] = _w(hidden, device=device)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = _w(inter, hidden, device=device), _w(inter, device=device)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = _w(hidden, inter, device=device), _w(hidden, device=device)
        sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"] = _norm(hidden, device)
    sd["model.final_layernorm.weight"], sd["model.final_layernorm.bias"] = _norm(hidden, device)
    sd["lm_head.weight"], sd["lm_head.bias"] = _w(vocab, hidden, device=device), _w(vocab, device=device)
    return sd


def fake_lavis_eva(width=W, blocks=VDEPTH + 1, mlp=VMLP, grid=2, device="cpu", extras=True):
    """LAVIS eva_vit_g.pth names: one block more than the model keeps, plus a final norm and head."""
    sd = {"cls_token": _w(1, 1, width, device=device), "pos_embed": _w(1, 1 + grid * grid, width, device=device),
          "patch_embed.proj.weight": _w(width, 3, 14, 14, device=device, scale=0.05),
          "patch_embed.proj.bias": _w(width, device=device)}
    for i in range(blocks):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"], sd[p + "norm1.bias"] = _norm(width, device)
        sd[p + "attn.qkv.weight"] = _w(3 * width, width, device=device)
        sd[p + "attn.q_bias"], sd[p + "attn.v_bias"] = _w(width, device=device), _w(width, device=device)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = _w(width, width, device=device), _w(width, device=device)
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = _norm(width, device)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = _w(mlp, width, device=device), _w(mlp, device=device)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = _w(width, mlp, device=device), _w(width, device=device)
    if extras:  # in the file, unused by BLIP-2: the ViT's own final norm and classifier
        sd["norm.weight"], sd["norm.bias"] = _norm(width, device)
        sd["head.weight"], sd["head.bias"] = _w(10, width, device=device), _w(10, device=device)
    return sd


def fake_lavis_blip2(hidden=QH, layers=QLAYERS, inter=QINTER, enc=W, nq=NQ, device="cpu", text_vocab=100):
    """LAVIS BLIP-2 "model" names, including the text branch and heads that TinyGPT-V never uses."""
    sd = {"query_tokens": _w(1, nq, hidden, device=device, scale=1.0)}
    sd["ln_vision.weight"], sd["ln_vision.bias"] = _norm(enc, device)
    sd["Qformer.bert.embeddings.LayerNorm.weight"], sd["Qformer.bert.embeddings.LayerNorm.bias"] = _norm(hidden, device)
    sd["Qformer.bert.embeddings.word_embeddings.weight"] = _w(text_vocab, hidden, device=device)
    sd["Qformer.bert.embeddings.position_embeddings.weight"] = _w(512, hidden, device=device)
    sd["Qformer.bert.embeddings.position_ids"] = torch.arange(512, device=device).unsqueeze(0)
    for i in range(layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        for att in ("attention", "crossattention") if i % 2 == 0 else ("attention",):
            kv_in = enc if att == "crossattention" else hidden
            for n, fan_in in (("query", hidden), ("key", kv_in), ("value", kv_in)):
                sd[p + f"{att}.self.{n}.weight"], sd[p + f"{att}.self.{n}.bias"] = (
                    _w(hidden, fan_in, device=device), _w(hidden, device=device))
            sd[p + f"{att}.output.dense.weight"] = _w(hidden, hidden, device=device)
            sd[p + f"{att}.output.dense.bias"] = _w(hidden, device=device)
            sd[p + f"{att}.output.LayerNorm.weight"], sd[p + f"{att}.output.LayerNorm.bias"] = _norm(hidden, device)
        for branch in ("", "_query"):  # "" = the text branch (ignored), "_query" = the query branch
            sd[p + f"intermediate{branch}.dense.weight"] = _w(inter, hidden, device=device)
            sd[p + f"intermediate{branch}.dense.bias"] = _w(inter, device=device)
            sd[p + f"output{branch}.dense.weight"] = _w(hidden, inter, device=device)
            sd[p + f"output{branch}.dense.bias"] = _w(hidden, device=device)
            sd[p + f"output{branch}.LayerNorm.weight"], sd[p + f"output{branch}.LayerNorm.bias"] = _norm(hidden, device)
    sd["Qformer.cls.predictions.bias"] = _w(text_vocab, device=device)
    sd["Qformer.cls.predictions.transform.dense.weight"] = _w(hidden, hidden, device=device)
    for head, out in (("vision_proj", 8), ("text_proj", 8), ("itm_head", 2), ("t5_proj", 16)):
        sd[f"{head}.weight"], sd[f"{head}.bias"] = _w(out, hidden, device=device), _w(out, device=device)
    sd["temp"] = torch.tensor(0.07, device=device)
    sd["t5_model.shared.weight"] = _w(20, 16, device=device)
    return sd


def lavis_to_hf_blip2(lavis: dict) -> dict:
    """The same Q-Former in Blip2ForConditionalGeneration's names (written out independently here)."""
    hf = {}
    for k, v in lavis.items():
        if k == "query_tokens":
            hf[k] = v
        elif k.startswith("ln_vision."):
            hf["vision_model.post_layernorm." + k.split(".")[-1]] = v
        elif k.startswith("Qformer.bert.embeddings.LayerNorm."):
            hf["qformer.layernorm." + k.split(".")[-1]] = v
        elif k.startswith("Qformer.bert.encoder.layer."):
            parts = k.split(".")
            rest = ".".join(parts[5:])
            if rest.startswith(("intermediate.", "output.")):
                continue  # the text branch is not in HF's Blip2QFormerModel
            rest = rest.replace("attention.self.", "attention.attention.")
            hf[f"qformer.encoder.layer.{parts[4]}.{rest}"] = v
    hf["language_projection.weight"], hf["language_projection.bias"] = _w(24, QH), _w(24)
    hf["language_model.model.decoder.embed_tokens.weight"] = _w(50, 24)
    return hf


def fake_release(hidden=HID, layers=LAYERS, heads=HEADS, r=R, qdim=QH, proj=PROJ, lora=True, default=False,
                 device="cpu"):
    """A released TinyGPT-V "model" dict: projections, norm weights, fused LoRA, the position_ids buffer."""
    hd = hidden // heads
    pre = "llama_model.base_model.model." if lora else "llama_model."
    ad = ".default" if default else ""
    sd = {"llama_proj.weight": _w(proj, qdim, device=device), "llama_proj.bias": _w(proj, device=device),
          "llama_proj2.weight": _w(hidden, proj, device=device), "llama_proj2.bias": _w(hidden, device=device),
          "Qformer.bert.embeddings.position_ids": torch.arange(512, device=device).unsqueeze(0)}
    for i in range(layers):
        p = f"{pre}model.layers.{i}."
        if lora:
            for mod, out in (("query_key_value", 3 * hidden), ("dense", hidden)):
                sd[p + f"self_attn.{mod}.lora_A{ad}.weight"] = _w(r, hidden, device=device)
                sd[p + f"self_attn.{mod}.lora_B{ad}.weight"] = _w(out, r, device=device)
        sd[p + "self_attn.q_layernorm.weight"] = _norm(hd, device)[0]
        sd[p + "self_attn.k_layernorm.weight"] = _norm(hd, device)[0]
        sd[p + "input_layernorm.weight"] = _norm(hidden, device)[0]
        sd[p + "post_layernorm.weight"] = _norm(hidden, device)[0]
    sd[f"{pre}model.final_layernorm.weight"] = _norm(hidden, device)[0]
    return sd


def release_file_dict(model_sd):
    """The whole released .pth: "model" plus optimizer state, config, scaler and epoch."""
    n = len(model_sd)
    return {"model": model_sd,
            "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                          "param_groups": [{"lr": 1e-4, "weight_decay": 0.05, "params": list(range(n))}]},
            "config": {"model": {"arch": "minigpt4", "image_size": 224}, "run": {"seed": 42}},
            "scaler": {"scale": 65536.0, "growth_factor": 2.0}, "epoch": 3}


def write_phi2_folder(folder, sd, config):
    """config.json + two safetensors shards + model.safetensors.index.json, as on the Hub."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    keys = list(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for shard, ks in shards.items():
        save_file({k: sd[k].half().contiguous() for k in ks}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in ks})
    total = sum(t.numel() * 2 for t in sd.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    torch.manual_seed(1234)
    root = tmp_path_factory.mktemp("weights")
    phi = fake_phi2()
    phi16 = {k: v.half().float() for k, v in phi.items()}  # what the fp16 shards hold
    eva = fake_lavis_eva()
    blip2 = fake_lavis_blip2()
    release = fake_release()
    torch.save(eva, root / "eva_vit_g.pth")
    torch.save({"model": blip2}, root / "blip2_pretrained_flant5xxl.pth")
    torch.save(release_file_dict(release), root / "TinyGPT-V_for_Stage2.pth")
    write_phi2_folder(root / "phi-2", phi, phi2_config_json())
    return {"root": root, "phi": phi16, "eva": eva, "blip2": blip2, "release": release,
            "phi_dir": root / "phi-2", "eva_path": root / "eva_vit_g.pth",
            "blip2_path": root / "blip2_pretrained_flant5xxl.pth", "release_path": root / "TinyGPT-V_for_Stage2.pth"}


# ----------------------------------------------------------------------------------- references
def lavis_vit(sd, pixels, depth, heads, img_size):
    """LAVIS' EVA VisionTransformer forward, written from its layout (fused qkv, bias (q, 0, v))."""
    pos = sd["pos_embed"]
    grid, old = img_size // 14, math.isqrt(pos.shape[1] - 1)
    if grid != old:  # LAVIS' interpolate_pos_embed
        g = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        g = F.interpolate(g, size=(grid, grid), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:, :1], g.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
    x = x.flatten(2).transpose(1, 2)
    b, _, c = x.shape
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1) + pos
    for i in range(depth):
        p = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(x, (c,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        bias = torch.cat([p["attn.q_bias"], torch.zeros_like(p["attn.v_bias"]), p["attn.v_bias"]])
        qkv = F.linear(h, p["attn.qkv.weight"], bias).reshape(b, -1, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + F.linear((att @ v).transpose(1, 2).reshape(b, -1, c), p["attn.proj.weight"], p["attn.proj.bias"])
        h = F.layer_norm(x, (c,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"],
                         p["mlp.fc2.bias"])
    return x


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def reference_attention(x, w_qkv, b_qkv, w_dense, b_dense, q_ln, k_ln, heads, rot, theta=10000.0):
    """TinyGPT-V's attention from raw tensors: fused qkv viewed (heads, 3, head_dim), QK-Norm,
    partial rotary on the first `rot` dims, causal softmax, output projection."""
    bsz, t, hidden = x.shape
    d = hidden // heads
    qkv = (x @ w_qkv.T + b_qkv).view(bsz, t, heads, 3, d)
    q, k, v = (qkv[:, :, :, j].transpose(1, 2) for j in range(3))
    q = F.layer_norm(q, (d,), q_ln, torch.zeros(d), eps=1e-5)
    k = F.layer_norm(k, (d,), k_ln, torch.zeros(d), eps=1e-5)
    inv = 1.0 / theta ** (torch.arange(0, rot, 2).float() / rot)
    ang = torch.outer(torch.arange(t).float(), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    q = torch.cat([q[..., :rot] * cos + _rotate_half(q[..., :rot]) * sin, q[..., rot:]], -1)
    k = torch.cat([k[..., :rot] * cos + _rotate_half(k[..., :rot]) * sin, k[..., rot:]], -1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(bsz, t, hidden)
    return out @ w_dense.T + b_dense


def interleave_by_hand(q, k, v, heads):
    d = q.shape[0] // heads
    return torch.cat([torch.cat([q[h * d:(h + 1) * d], k[h * d:(h + 1) * d], v[h * d:(h + 1) * d]])
                      for h in range(heads)])


# ----------------------------------------------------------------------------------- (a) Phi-2
def test_fuse_qkv_is_per_head_interleaved_and_split_inverts_it():
    q, k, v = torch.randn(6, 5), torch.randn(6, 5), torch.randn(6, 5)
    fused = fuse_qkv(q, k, v, num_heads=3)
    assert torch.equal(fused, interleave_by_hand(q, k, v, 3))
    assert torch.equal(fused.view(3, 3, 2, 5)[1, 2], v[2:4])  # head 1, part v
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, 3), (q, k, v)))
    assert torch.equal(fuse_qkv(q[:, 0], k[:, 0], v[:, 0], 3), interleave_by_hand(q[:, 0], k[:, 0], v[:, 0], 3))


def test_phi2_folder_gives_the_logits_of_stock_transformers_phi(src):
    from transformers import PhiForCausalLM

    stock = PhiForCausalLM.from_pretrained(src["phi_dir"], qk_layernorm=True, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in stock.model.layers:  # the QK-Norm that TinyGPT-V adds, at its identity init
            for ln in (layer.self_attn.q_layernorm, layer.self_attn.k_layernorm):
                ln.weight.fill_(1.0)
                ln.bias.zero_()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        ref = stock(input_ids=ids).logits

    for stage in (1, 2):  # stage 2: LoRA already injected, base weights go to .base_layer
        model = build_model(tiny_cfg(), stage=stage)
        report = load_phi2(model, src["phi_dir"])
        assert len(report.loaded) == 5 + LAYERS * 10  # embed, final LN x2, lm_head x2; 10 per layer
        model.eval()
        attn = model.phi.model.layers[1].self_attn
        base = attn.query_key_value.base_layer if stage == 2 else attn.query_key_value
        p = "model.layers.1.self_attn."
        q, k, v = (src["phi"][p + f"{n}_proj.weight"] for n in "qkv")
        assert torch.equal(base.weight, interleave_by_hand(q, k, v, HEADS))
        for ln in (attn.q_layernorm, attn.k_layernorm):  # not in Phi-2: identity init kept
            assert torch.equal(ln.weight, torch.ones(HD)) and torch.equal(ln.bias, torch.zeros(HD))
        assert torch.equal(model.phi.model.layers[0].post_layernorm.weight, torch.ones(HID))
        for layer in model.phi.model.layers:
            layer.post_layernorm = nn.Identity()  # the one op stock Phi does not have
        with torch.no_grad():
            out = model.phi(input_ids=ids).logits
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_phi2_config_mismatch_names_the_field(src):
    model = build_model(tiny_cfg(), stage=1)
    cfg = json.loads((src["phi_dir"] / "config.json").read_text())
    for field, value in (("hidden_size", 2560), ("num_hidden_layers", 32), ("num_attention_heads", 32),
                         ("vocab_size", 51200)):
        with pytest.raises(WeightLoadError, match=f"'{field}' is {value}"):
            load_phi2(model, src["phi_dir"], config={**cfg, field: value})
    with pytest.raises(WeightLoadError, match="num_key_value_heads"):
        load_phi2(model, src["phi_dir"], config={**cfg, "num_key_value_heads": 1})


def test_phi2_missing_shard_is_named(src, tmp_path):
    folder = tmp_path / "phi-2"
    shutil.copytree(src["phi_dir"], folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightLoadError, match="model-00002-of-00002.safetensors"):
        load_phi2(build_model(tiny_cfg(), stage=1), folder)


# ----------------------------------------------------------------------------------- (b) release
@pytest.mark.parametrize("default", [False, True], ids=["peft0.2-names", "peft-default-names"])
def test_released_fused_lora_computes_the_original_attention(src, tmp_path, default):
    release = fake_release(default=default)
    path = tmp_path / "TinyGPT-V_for_Stage3.pth"
    torch.save(release_file_dict(release), path)
    pre = "llama_model.base_model.model.model.layers.0.self_attn."
    ad = ".default" if default else ""
    x = torch.randn(2, 6, HID)
    pos = torch.arange(6).unsqueeze(0)

    def expected():
        ph, s = src["phi"], ALPHA / R
        p = "model.layers.0.self_attn."
        w_qkv = interleave_by_hand(ph[p + "q_proj.weight"], ph[p + "k_proj.weight"], ph[p + "v_proj.weight"], HEADS)
        b_qkv = interleave_by_hand(ph[p + "q_proj.bias"], ph[p + "k_proj.bias"], ph[p + "v_proj.bias"], HEADS)
        lora = {m: release[pre + f"{m}.lora_B{ad}.weight"] @ release[pre + f"{m}.lora_A{ad}.weight"]
                for m in ("query_key_value", "dense")}
        w_qkv = w_qkv + s * lora["query_key_value"]
        w_dense = ph[p + "dense.weight"] + s * lora["dense"]
        return reference_attention(x, w_qkv, b_qkv, w_dense, ph[p + "dense.bias"],
                                   release[pre + "q_layernorm.weight"], release[pre + "k_layernorm.weight"], HEADS, ROT)

    ref = expected()
    for stage in (2, None):  # None: the model has no LoRA yet; the loader adds it
        model = build_model(tiny_cfg(), stage=stage)
        load_phi2(model, src["phi_dir"])
        report = load_release_checkpoint(model, path)
        assert model.has_lora
        assert "Qformer.bert.embeddings.position_ids" in report.ignored
        model.eval()
        layer = model.phi.model.layers[0]
        with torch.no_grad():
            got, _ = layer.self_attn(x, position_embeddings=model.phi.model.rotary_emb(x, pos))
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        lp = "llama_model.base_model.model.model."
        assert torch.equal(layer.post_layernorm.weight, release[lp + "layers.0.post_layernorm.weight"])
        assert torch.equal(layer.input_layernorm.weight, release[lp + "layers.0.input_layernorm.weight"])
        assert torch.equal(model.phi.model.final_layernorm.weight, release[lp + "final_layernorm.weight"])
        assert torch.equal(model.projection.proj2.weight, release["llama_proj2.weight"])
        if stage == 2:  # loading keeps the stage's freeze policy
            assert model.phi.model.layers[1].self_attn.dense.lora_B.default.weight.requires_grad
            assert not model.phi.model.layers[1].self_attn.dense.base_layer.weight.requires_grad

    with pytest.raises(WeightLoadError, match="stage 1"):
        load_release_checkpoint(build_model(tiny_cfg(), stage=1), path)
    with pytest.raises(WeightLoadError, match="no LoRA"):
        load_release_checkpoint(build_model(tiny_cfg(), stage=None), path, add_lora=False)


def test_other_release_variants_and_minigpt4_projection():
    release = fake_release(lora=False)  # saved without LoRA: llama_model.model.layers...
    model = build_model(tiny_cfg(), stage=1)
    report = load_release_checkpoint(model, release_file_dict(release))
    assert not model.has_lora and len(report.loaded) == 4 + LAYERS * 4 + 1
    assert torch.equal(model.phi.model.layers[1].self_attn.k_layernorm.weight,
                       release["llama_model.model.layers.1.self_attn.k_layernorm.weight"])
    # the same stage-1 checkpoint starts stage 2: the LoRA stays at its initial values
    model2 = build_model(tiny_cfg(), stage=2)
    b_before = model2.phi.model.layers[0].self_attn.dense.lora_B.default.weight.clone()
    load_release_checkpoint(model2, release_file_dict(release))
    assert torch.equal(model2.phi.model.layers[0].self_attn.dense.lora_B.default.weight, b_before)
    # MiniGPT-4's llama_proj initialises proj1
    minigpt4 = {"model": {"llama_proj.weight": torch.randn(PROJ, QH), "llama_proj.bias": torch.randn(PROJ)}}
    load_minigpt4_projection(model, minigpt4)
    assert torch.equal(model.projection.proj1.bias, minigpt4["model"]["llama_proj.bias"])
    # the first stage-4 release also trained the Q-Former: such weights load through the LAVIS names
    key = "Qformer.bert.encoder.layer.0.output_query.dense.weight"
    stage4 = {**fake_release(), key: torch.randn(QH, QINTER)}
    model4 = build_model(tiny_cfg(), stage=4)
    load_release_checkpoint(model4, {"model": stage4})
    assert torch.equal(model4.qformer.model.encoder.layer[0].output_query.dense.weight, stage4[key])
    # a checkpoint that lacks a trained norm is refused
    broken = dict(release)
    del broken["llama_model.model.layers.0.post_layernorm.weight"]
    with pytest.raises(WeightLoadError, match=r"phi\.model\.layers\.0\.post_layernorm\.weight"):
        load_release_checkpoint(build_model(tiny_cfg(), stage=1), {"model": broken})


# ----------------------------------------------------------------------------------- (c) EVA ViT
def test_lavis_eva_drops_the_last_block_and_matches_timm_and_lavis(src):
    pixels = torch.randn(2, 3, 28, 28)
    model = build_model(tiny_cfg(), stage=1)
    report = load_eva_vit(model, src["eva_path"])
    assert sorted(k for k in report.ignored if not k.startswith(f"blocks.{VDEPTH}.")) == [
        "head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert sum(k.startswith(f"blocks.{VDEPTH}.") for k in report.ignored) == 13  # the whole dropped block
    timm_vit = build_vision_encoder(tiny_cfg().vision)
    timm_vit.load_state_dict({k: v for k, v in src["eva"].items()
                              if not k.startswith((f"blocks.{VDEPTH}.", "norm.", "head."))})  # plain, strict
    with torch.no_grad():
        ours = model.vision.encoder.forward_features(pixels)
        torch.testing.assert_close(ours, timm_vit.forward_features(pixels), rtol=1e-5, atol=1e-5)
        use_fast_cpu_layers(timm_vit.requires_grad_(False))  # frozen, with our kernels: bit for bit
        torch.testing.assert_close(ours, timm_vit.forward_features(pixels), rtol=0, atol=0)
        torch.testing.assert_close(ours, lavis_vit(src["eva"], pixels, VDEPTH, VHEADS, 28), rtol=1e-4, atol=1e-5)


def test_lavis_eva_interpolates_the_position_grid_to_twice_the_size(src):
    pixels = torch.randn(1, 3, 56, 56)
    model = build_model(tiny_cfg(img_size=56), stage=1)  # 2x2 grid in the file, 4x4 here (224 -> 448)
    load_eva_vit(model, src["eva_path"])
    assert model.vision.encoder.pos_embed.shape == (1, 17, W)
    small = build_model(tiny_cfg(), stage=1)
    load_eva_vit(small, src["eva_path"])
    small.vision.set_image_size(56)  # the model's own resampling path must agree
    with torch.no_grad():
        ours = model.vision.encoder.forward_features(pixels)
        torch.testing.assert_close(ours, small.vision.encoder.forward_features(pixels), rtol=0, atol=1e-6)
        torch.testing.assert_close(ours, lavis_vit(src["eva"], pixels, VDEPTH, VHEADS, 56), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias_layout", ["hub q_bias/v_bias", "transformers-5 qkv.bias"])
def test_hf_blip2_vision_matches_stock_blip2_vision_model(bias_layout):
    from transformers import Blip2VisionConfig, Blip2VisionModel

    stock = Blip2VisionModel(Blip2VisionConfig(hidden_size=W, intermediate_size=VMLP, num_hidden_layers=VDEPTH,
                                               num_attention_heads=VHEADS, image_size=28, patch_size=14,
                                               layer_norm_eps=1e-6, qkv_bias=True)).eval()
    with torch.no_grad():
        for p in stock.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    sd = {"vision_model." + k: v.clone() for k, v in stock.state_dict().items()}
    if bias_layout.startswith("hub"):
        for i in range(VDEPTH):
            q, k, v = sd.pop(f"vision_model.encoder.layers.{i}.self_attn.qkv.bias").chunk(3)
            sd[f"vision_model.encoder.layers.{i}.self_attn.q_bias"] = q
            sd[f"vision_model.encoder.layers.{i}.self_attn.v_bias"] = v
    else:  # a non-zero key bias: dropped, which is exact because softmax cancels it
        assert stock.encoder.layers[0].self_attn.qkv.bias[W:2 * W].abs().sum() > 0
    sd["language_model.lm_head.weight"] = torch.randn(7, 3)  # other parts of the file are left alone
    model = build_model(tiny_cfg(), stage=1)
    load_eva_vit(model, sd)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = stock(pixel_values=pixels).last_hidden_state  # includes post_layernorm (= ln_vision)
        model.vision.ln_vision.eps = stock.post_layernorm.eps  # BLIP-2's ln_vision eps differs; not a weight
        torch.testing.assert_close(model.vision(pixels), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------- (d) Q-Former
def test_lavis_and_hf_blip2_layouts_give_the_same_qformer(src, tmp_path):
    from transformers import Blip2QFormerModel

    hf = lavis_to_hf_blip2(src["blip2"])
    hf_dir = tmp_path / "blip2-hf"
    hf_dir.mkdir()
    save_file(hf, str(hf_dir / "model.safetensors"))
    lavis_model, hf_model = build_model(tiny_cfg(), stage=1), build_model(tiny_cfg(), stage=1)
    report = load_blip2_qformer(lavis_model, src["blip2_path"])
    for k in ("Qformer.bert.encoder.layer.0.intermediate.dense.weight", "Qformer.cls.predictions.bias",
              "Qformer.bert.embeddings.word_embeddings.weight", "itm_head.weight", "temp", "t5_model.shared.weight"):
        assert k in report.ignored
    load_blip2_qformer(hf_model, hf_dir)

    stock = Blip2QFormerModel(build_qformer_config(tiny_cfg().qformer, W)).eval()
    stock.load_state_dict({k[len("qformer."):]: v for k, v in hf.items() if k.startswith("qformer.")})  # strict
    feats = torch.randn(2, 5, W)
    lavis_model.eval(), hf_model.eval()
    with torch.no_grad():
        a, b = lavis_model.qformer(feats), hf_model.qformer(feats)
        ref = stock(query_embeds=src["blip2"]["query_tokens"].expand(2, -1, -1), encoder_hidden_states=feats,
                    encoder_attention_mask=torch.ones(2, 5, dtype=torch.long)).last_hidden_state
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(lavis_model.vision.ln_vision.weight, src["blip2"]["ln_vision.weight"])
    assert torch.equal(hf_model.vision.ln_vision.bias, src["blip2"]["ln_vision.bias"])
    # a LAVIS BLIP-2 checkpoint that also holds its ViT (visual_encoder.*) fills the ViT too
    with_vit = {**src["blip2"], **{"visual_encoder." + k: v for k, v in src["eva"].items()}}
    both = build_model(tiny_cfg(), stage=1)
    load_blip2_qformer(both, {"model": with_vit})
    assert torch.equal(both.vision.encoder.blocks[1].attn.qkv.weight, src["eva"]["blocks.1.attn.qkv.weight"])


# ----------------------------------------------------------------------------------- (e) errors
def test_mismatches_are_listed_together_and_nothing_changes(src, tmp_path):
    bad = dict(src["eva"])
    del bad["blocks.0.norm1.bias"]  # missing
    bad["blocks.0.attn.relative_position_bias_table"] = torch.zeros(3, 2)  # unexpected (would change the ViT)
    bad["blocks.1.mlp.fc1.weight"] = torch.zeros(VMLP + 1, W)  # wrong shape
    path = tmp_path / "bad_eva.pth"
    torch.save(bad, path)
    model = build_model(tiny_cfg(), stage=1)
    before = model.vision.encoder.blocks[0].attn.qkv.weight.clone()
    with pytest.raises(WeightLoadError) as err:
        load_eva_vit(model, path)
    msg = str(err.value)
    assert str(path) in msg
    assert "vision.encoder.blocks.0.norm1.bias" in msg and "missing" in msg
    assert "blocks.0.attn.relative_position_bias_table" in msg and "unexpected" in msg
    assert f"vision.encoder.blocks.1.mlp.fc1.weight: model expects ({VMLP}, {W}), source has ({VMLP + 1}, {W})" in msg
    assert err.value.missing == ["vision.encoder.blocks.0.norm1.bias"]
    assert len(err.value.unexpected) == 1 and len(err.value.mismatched) == 1
    assert isinstance(err.value, ValueError)
    assert torch.equal(model.vision.encoder.blocks[0].attn.qkv.weight, before)  # checked before loading


# ----------------------------------------------------------------------------------- (f) pickles


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickles_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    zipped = tmp_path / "TinyGPT-V_for_Stage2.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(2)}, "config": EvilPickle(marker)}, zipped)
    legacy = tmp_path / "eva_vit_g.pth"
    legacy.write_bytes(pickle.dumps({"pos_embed": EvilPickle(marker)}))
    model = build_model(tiny_cfg(), stage=1)
    for path, load in ((zipped, lambda p: load_release_checkpoint(model, p)),
                       (legacy, lambda p: load_eva_vit(model, p)), (zipped, read_state_dict)):
        with pytest.raises(UnsafeCheckpointError, match="refused to load") as err:
            load(path)
        assert str(path) in str(err.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------------- (g) full size
PHI2_CONFIG = phi2_config_json(hidden=2560, layers=32, heads=32, inter=10240, vocab=51200)


def test_full_size_release_on_meta_device():
    model = build_model("full", stage=2, device="meta")
    release = fake_release(hidden=2560, layers=32, heads=32, r=64, qdim=768, proj=4096, device="meta")
    lora_b = "llama_model.base_model.model.model.layers.0.self_attn.query_key_value.lora_B.weight"
    assert release[lora_b].shape == (7680, 64)
    report = load_release_checkpoint(model, release_file_dict(release))
    assert len(report.loaded) == 4 + 32 * 8 + 1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(report.loaded)  # the checkpoint holds exactly what stage 2 trains
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == 45_266_944

    wrong = fake_release(hidden=2560, layers=32, heads=32, r=32, qdim=768, proj=4096, device="meta")
    with pytest.raises(WeightLoadError, match=r"model expects \(64, 2560\), source has \(32, 2560\)"):
        load_release_checkpoint(build_model("full", stage=2, device="meta"), {"model": wrong})


def test_full_size_build_from_release_on_meta_device():
    """All four full-size sources (fake, on meta): every tensor of the stage-4 model is accounted for."""
    release = fake_release(hidden=2560, layers=32, heads=32, r=64, qdim=768, proj=4096, device="meta")
    phi = fake_phi2(hidden=2560, layers=32, inter=10240, vocab=51200, device="meta")
    eva = fake_lavis_eva(width=1408, blocks=40, mlp=6144, grid=16, device="meta")
    blip2 = fake_lavis_blip2(hidden=768, layers=12, inter=3072, enc=1408, nq=32, device="meta", text_vocab=30523)
    model = build_from_release(release, phi, eva, blip2, preset="full", stage=4, device="meta", phi2_config=PHI2_CONFIG)
    assert model.stage == 4 and model.cfg.vision.img_size == 448
    assert model.vision.encoder.pos_embed.shape == (1, 1025, 1408)  # 16x16 -> 32x32
    assert len(model.vision.encoder.blocks) == 39
    assert model.phi.model.layers[31].self_attn.query_key_value.base_layer.weight.shape == (7680, 2560)
    reference = build_model("full", stage=4, device="meta")
    reference.vision.set_image_size(448)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 45_266_944


# ----------------------------------------------------------------------------------- end to end
def test_build_from_release_matches_piecewise_loading(src):
    """Meta build + assignment + materialised buffers computes what an eagerly built model computes."""
    built = build_from_release(src["release_path"], src["phi_dir"], src["eva_path"], src["blip2_path"],
                               preset=tiny_cfg())
    assert built.stage == 2 and not any(t.is_meta for t in list(built.parameters()) + list(built.buffers()))
    eager = build_model(tiny_cfg(), stage=2)
    for load, path in ((load_eva_vit, "eva_path"), (load_blip2_qformer, "blip2_path"), (load_phi2, "phi_dir"),
                       (load_release_checkpoint, "release_path")):
        load(eager, src[path])
    built.eval(), eager.eval()
    pixels = torch.randn(1, 3, 28, 28)
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(built.encode_images(pixels), eager.encode_images(pixels), rtol=0, atol=0)
        torch.testing.assert_close(built.phi(input_ids=ids).logits, eager.phi(input_ids=ids).logits, rtol=0, atol=0)
    assert {k: tuple(v.shape) for k, v in built.state_dict().items()} == {
        k: tuple(v.shape) for k, v in eager.state_dict().items()}
    half = build_from_release(src["release_path"], src["phi_dir"], src["eva_path"], src["blip2_path"],
                              preset=tiny_cfg(), dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.phi.model.rotary_emb.inv_freq.dtype == torch.float32  # recomputed, not rounded
    assert torch.equal(half.phi.model.layers[0].mlp.fc1.weight, eager.phi.model.layers[0].mlp.fc1.weight.bfloat16())


def test_train_command_loads_the_given_towers(tmp_path):
    """`tinygptv train --eva/--blip2/--phi2` reach the loaders: a source of the wrong size is refused
    with the loader's listing, and a source of the right layout and size is copied in."""
    from tinygptv_lib.cli import _stage_model
    from tinygptv_lib.weights import WeightLoadError

    path = tmp_path / "eva_tiny.pth"
    torch.save(fake_lavis_eva(), path)
    with pytest.raises(WeightLoadError, match="eva_tiny.pth"):
        _stage_model("nano", 1, eva=str(path))
    # the shipped nano Phi is stored in the microsoft/phi-2 layout: loading it over a re-initialised
    # Phi must bring back exactly the shipped weights
    from tinygptv_lib.weights.nano import NANO_BACKBONES

    phi_dir = Path(NANO_BACKBONES) / "phi-2-nano"
    reference = _stage_model("nano", 1).phi.state_dict()
    torch.manual_seed(123)
    m = _stage_model("nano", 1, phi2=str(phi_dir))
    for k, v in m.phi.state_dict().items():
        assert torch.equal(v, reference[k]), k
