"""The assembled model: exact parameter counts, freezing, forward/loss, splicing, Phi's norms."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tinygptv_lib.config import TinyGPTVConfig, get_config
from tinygptv_lib.model.sequence import IGNORE, IMAGE_SLOT, build_batch, build_prompt_batch, tokenize_prompt
from tinygptv_lib.model.summary import parameter_counts
from tinygptv_lib.model.tinygptv import build_model
from tinygptv_lib.tokenizer import load_tokenizer

FULL_TRAINABLE = {1: 13_809_664, 2: 45_266_944, 3: 45_266_944, 4: 45_266_944}

# Component sizes from the reference (section 1): ViT without its final norm, ln_vision, Q-Former with
# queries, both projections, Phi-2, TinyGPT-V's added norms (q/k LayerNorm weight+bias, RMSNorm), LoRA.
REF = {
    "vision encoder (EVA ViT)": 985_897_344 - 2 * 1408,  # timm's 39-block count includes a final norm
    "ln_vision": 2_816,
    "Q-Former + query tokens": 105_162_240,
    "proj1 (llama_proj)": 3_149_824,
    "proj2 (llama_proj2)": 10_488_320,
    "Phi-2": 2_779_683_840,
    "Phi: TinyGPT-V's added norms": 32 * (2 * (80 + 80) + 2560),
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_full_size_trainable_counts_are_exact(stage):
    model = build_model("full", stage=stage, device="meta")
    counts = parameter_counts(model)
    trainable = sum(c["trainable"] for c in counts.values())
    assert trainable == FULL_TRAINABLE[stage]
    expected = dict(REF)
    if stage >= 2:
        expected["LoRA (Phi attention)"] = 31_457_280
    assert {k: c["total"] for k, c in counts.items()} == expected
    # ViT, ln_vision and Q-Former frozen always
    for frozen in ("vision encoder (EVA ViT)", "ln_vision", "Q-Former + query tokens"):
        assert counts[frozen]["trainable"] == 0


def test_presets_use_the_same_classes():
    nano, full = build_model("nano", stage=2), build_model("full", stage=2, device="meta")
    kinds = lambda m: [type(x).__name__ for x in m.modules()]  # noqa: E731
    assert set(kinds(nano)) == set(kinds(full))


def test_config_round_trip_and_errors():
    cfg = get_config("nano")
    assert TinyGPTVConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_config("huge")
    with pytest.raises(ValueError, match="bogus"):
        TinyGPTVConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    bad = get_config("nano")
    bad.phi.num_heads = 5  # head dim 32: 0.4 x 32 = 12.8 rotary dims
    with pytest.raises(ValueError, match="rotary dims"):
        build_model(bad)


def test_stage_one_has_no_lora_and_refuses_to_drop_it():
    m = build_model("nano", stage=1)
    assert not m.has_lora
    m.set_stage(2)
    assert m.has_lora
    with pytest.raises(ValueError, match="stage 1 trains without LoRA"):
        m.set_stage(1)
    with pytest.raises(ValueError, match="stage must be one of"):
        m.set_stage(5)


def test_new_norms_start_as_identity():
    m = build_model("nano", stage=1)
    for layer in m.phi.model.layers:
        for ln in (layer.self_attn.q_layernorm, layer.self_attn.k_layernorm):
            assert torch.equal(ln.weight, torch.ones_like(ln.weight))
            assert torch.equal(ln.bias, torch.zeros_like(ln.bias))
            assert not ln.bias.requires_grad and ln.weight.requires_grad
        assert torch.equal(layer.post_layernorm.weight, torch.ones_like(layer.post_layernorm.weight))


def _batch(tok, cfg, n=4):
    prompts = ["<Img><ImageHere></Img> What colour is the circle?"] * (n - 1) + ["Write one word."]
    answers = ["red", "a blue square", "three", "hello"][:n]
    return build_batch(tok, prompts, answers, num_query_tokens=cfg.qformer.num_query_tokens, end_sym="###",
                       max_txt_len=160)


def test_sequence_layout(tok):
    cfg = get_config("nano")
    b = _batch(tok, cfg)
    assert (b.input_ids[:, 0] == 50256).all()  # BOS
    slots = (b.input_ids == IMAGE_SLOT).sum(1).tolist()
    assert slots == [32, 32, 32, 0]
    assert b.has_image.tolist() == [True, True, True, False]
    for i, ans in enumerate(["red", "a blue square", "three", "hello"]):
        tgt = b.targets[i][b.targets[i] != IGNORE].tolist()
        assert tok.decode(tgt) == ans + "###"
        # right padding: everything after the last real token is masked and ignored
        n = int(b.attention_mask[i].sum())
        assert b.attention_mask[i, :n].all() and not b.attention_mask[i, n:].any()
        assert (b.targets[i, n:] == IGNORE).all()
        # the answer comes last among the real tokens
        assert b.targets[i, n - 1] != IGNORE


def test_prompt_errors_and_truncation(tok):
    with pytest.raises(ValueError, match="2 '<ImageHere>' markers"):
        tokenize_prompt(tok, "<ImageHere> and <ImageHere>", 32)
    long_prompt = "<Img><ImageHere></Img> " + "word " * 100
    with pytest.warns(UserWarning, match="truncated"):
        ids = tokenize_prompt(tok, long_prompt, 32, max_prompt_len=50)
    assert len(ids) == 50 and ids.count(IMAGE_SLOT) == 32
    g = build_prompt_batch(tok, ["<ImageHere> hi", "<ImageHere> a much longer prompt here"], num_query_tokens=32)
    assert g.attention_mask[0, 0] == 0 and g.attention_mask[:, -1].all()  # left padding


def test_image_embeddings_land_in_the_slots(tok):
    cfg = get_config("nano")
    m = build_model(cfg, stage=1).eval()
    b = _batch(tok, cfg)
    img = torch.randn(3, 32, cfg.phi.hidden_size)
    emb = m.embed(b, image_embeds=img)
    for i in range(3):
        assert torch.equal(emb[i][b.input_ids[i] == IMAGE_SLOT], img[i])
    text = b.input_ids[3][: int(b.attention_mask[3].sum())]
    assert torch.equal(emb[3][: len(text)], m.phi.get_input_embeddings()(text))
    with pytest.raises(ValueError, match="need 3 x 32 image embeddings"):
        m.embed(b, image_embeds=img[:2])
    with pytest.raises(ValueError, match="no pixels"):
        m.embed(b)


def test_loss_on_target_positions_equals_full_cross_entropy(tok):
    cfg = get_config("nano")
    m = build_model(cfg, stage=2).eval()
    b = _batch(tok, cfg)
    pixels = torch.randn(3, 3, cfg.vision.img_size, cfg.vision.img_size)
    out = m(b, pixels)
    logits = m.full_logits(b, pixels)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b.targets[:, 1:].reshape(-1),
                          ignore_index=IGNORE)
    assert torch.allclose(out["loss"], ref, atol=1e-5)
    assert out["num_targets"] == int((b.targets != IGNORE).sum())


def test_training_loss_gradients_equal_the_full_computation(tok):
    """The training path (Phi's last layer only at predicting positions, the chunked loss, the
    oneDNN linears) gives the gradients of cross-entropy over full logits, for every trained tensor."""
    cfg = get_config("nano")
    torch.manual_seed(0)
    m = build_model(cfg, stage=2).eval()  # eval: no dropout, so both passes see the same function
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)  # LoRA in play
    b = _batch(tok, cfg)  # rows of different lengths: padding, targets at different positions
    pixels = torch.randn(3, 3, cfg.vision.img_size, cfg.vision.img_size)  # the fourth row is text only
    trained = [p for p in m.parameters() if p.requires_grad]
    loss = m(b, pixels)["loss"]
    grads = torch.autograd.grad(loss, trained)
    logits = m.full_logits(b, pixels)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b.targets[:, 1:].reshape(-1),
                          ignore_index=IGNORE)
    ref_grads = torch.autograd.grad(ref, trained)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_only_trainable_parameters_get_gradients(tok):
    cfg = get_config("nano")
    m = build_model(cfg, stage=2).train()
    b = _batch(tok, cfg)
    m(b, torch.randn(3, 3, cfg.vision.img_size, cfg.vision.img_size))["loss"].backward()
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # LoRA B starts at zero, so in the very first step only B (not A) receives gradient
    lora_b = [p for n, p in m.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad.abs().sum() > 0 for p in lora_b)


def test_fresh_lora_does_not_change_the_output(tok):
    cfg = get_config("nano")
    m1 = build_model(cfg, stage=1).eval()
    m2 = copy.deepcopy(m1)
    m2.set_stage(2)
    b = _batch(tok, cfg)
    px = torch.randn(3, 3, cfg.vision.img_size, cfg.vision.img_size)
    assert torch.allclose(m1(b, px)["loss"], m2(b, px)["loss"], atol=1e-6)


def test_kv_cache_and_sdpa_match_uncached_eager():
    cfg = get_config("nano")
    m = build_model(cfg, stage=2).eval()
    ids = torch.randint(0, 50000, (2, 12))
    full = m.phi(input_ids=ids).logits
    first = m.phi(input_ids=ids[:, :7], use_cache=True)
    rest = m.phi(input_ids=ids[:, 7:], cache=first.cache, use_cache=True)
    assert torch.allclose(full[:, 7:], rest.logits, atol=1e-5)
    m.phi.config._attn_implementation = "eager"
    eager = m.phi(input_ids=ids).logits
    assert torch.allclose(full, eager, atol=1e-5)


def test_post_layernorm_is_on_the_attention_branch_only():
    cfg = get_config("nano")
    m = build_model(cfg, stage=1).eval()
    layer = m.phi.model.layers[0]
    x = torch.randn(1, 5, cfg.phi.hidden_size)
    pos = torch.arange(5)[None]
    pe = m.phi.model.rotary_emb(x, pos)
    base = layer(x, position_embeddings=pe)
    with torch.no_grad():
        layer.post_layernorm.weight.mul_(2.0)
    doubled = layer(x, position_embeddings=pe)
    h = layer.input_layernorm(x)
    attn, _ = layer.self_attn(h, position_embeddings=pe)
    # doubling the RMSNorm weight adds exactly one more normalised attention branch
    rms = attn * torch.rsqrt(attn.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(doubled - base, rms, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tok):
    cfg = get_config("nano")
    cfg.phi.num_layers = 2
    m = build_model(cfg, stage=2)
    m.phi.config.resid_pdrop = 0.0
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    m.train()
    assert m.phi.training and not m.vision.training and not m.qformer.training  # frozen towers: eval
    b = _batch(tok, cfg)
    px = torch.randn(3, 3, cfg.vision.img_size, cfg.vision.img_size)

    def grads(model):
        model.zero_grad()
        model(b, px)["loss"].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    g1 = grads(m)
    m.enable_gradient_checkpointing()
    g2 = grads(m)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-5), n


def test_image_size_switch_resamples_the_position_grid():
    cfg = get_config("nano")
    m = build_model(cfg, stage=4).eval()
    m.vision.set_image_size(2 * cfg.vision.img_size)  # 224 -> 448 at full size
    grid = 2 * cfg.vision.img_size // 14
    assert m.vision.encoder.pos_embed.shape[1] == 1 + grid * grid
    out = m.encode_images(torch.randn(1, 3, 2 * cfg.vision.img_size, 2 * cfg.vision.img_size))
    assert out.shape == (1, 32, cfg.phi.hidden_size)
    with pytest.raises(ValueError, match="pixels must have shape"):
        m.encode_images(torch.randn(1, 3, 100, 100))


def test_tokenizer_is_phi2s():
    tok = load_tokenizer()
    assert len(tok) == 50_295
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok("    ")["input_ids"] == [50284]
    assert tok(" " * 31)["input_ids"] == [50257] and tok("\t" * 9)["input_ids"] == [50287]
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == 50256
    assert tok.decode(tok("A red  circle\n###")["input_ids"]) == "A red  circle\n###"


def test_cli_params_last_line():
    out = subprocess.run([sys.executable, "-m", "tinygptv_lib.cli", "params", "--preset", "full", "--stage", "1"],
                         capture_output=True, text=True, check=True).stdout
    last = out.strip().splitlines()[-1]
    total = sum(REF.values())
    assert last == f"trainable 13809664 total {total}"


def test_bos_embedding_is_a_real_trainable_row():
    # Phi-2's BOS (50256) is also its pad id; an Embedding(padding_idx=50256) would zero the BOS row
    # and block its gradient, and a zero BOS token makes gradients explode through the RMSNorm.
    m = build_model("nano", stage=2)
    emb = m.phi.get_input_embeddings()
    assert emb.padding_idx is None
    assert emb.weight[50256].abs().sum() > 0
    emb.weight.requires_grad_(True)
    m.phi(input_ids=torch.tensor([[50256, 15496, 995]])).logits.sum().backward()
    assert emb.weight.grad[50256].abs().sum() > 0
