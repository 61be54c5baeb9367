"""The memory planner: exact parameter and weight bytes of the full model (checked against the
reference's numbers and against `cast_frozen` on the meta device), and its per-token activation
list checked against what autograd really keeps for one Phi layer."""
import pytest
import torch

from tinygptv_lib import memory_plan as M
from tinygptv_lib.config import get_config
from tinygptv_lib.model.tinygptv import build_model


def test_trainable_counts_are_the_released_ones():
    assert M.param_counts(1).trainable == 13_809_664
    for stage in (2, 3, 4):
        assert M.param_counts(stage).trainable == 45_266_944
    # the released checkpoints: trained params x 12 bytes (fp32 weights + two AdamW moments)
    assert round(M.param_counts(1).trainable * 12 / 1e6) == 166
    assert round(M.param_counts(2).trainable * 12 / 1e6) == 543  # "544 MB" on the hub (rounded up)


def test_component_totals():
    comps = {k: (total, trained) for k, total, trained in M.param_counts(2).by_component}
    assert comps["Phi-2"][0] == 2_779_683_840
    assert comps["vision encoder (EVA ViT)"][0] + comps["ln_vision"][0] == 985_897_344
    assert comps["Q-Former + query tokens"] == (105_162_240, 0)
    assert comps["proj1 (llama_proj)"] == (3_149_824, 3_149_824)
    assert comps["proj2 (llama_proj2)"] == (10_488_320, 10_488_320)
    assert comps["LoRA (Phi attention)"] == (31_457_280, 31_457_280)
    assert comps["Phi-2"][1] + comps["Phi: TinyGPT-V's added norms"][1] == 171_520  # norm weights


@pytest.mark.parametrize("stage,img,dtype", [(1, 224, torch.float16), (2, 224, torch.bfloat16),
                                             (4, 448, torch.float16), (2, 224, torch.float32)])
def test_weight_bytes_follow_cast_frozen(stage, img, dtype):
    model = build_model("full", stage=stage, device="meta")
    if img != 224:
        model.vision.set_image_size(img)
    model.cast_frozen(dtype)
    exact = sum(p.numel() * p.element_size() for p in model.parameters())
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    assert M.weight_bytes(stage, precision, img) == exact
    assert M.param_counts(stage, img).total == sum(p.numel() for p in model.parameters())
    state = M.training_state_bytes(stage, img)
    assert state == {"gradients": 4 * M.param_counts(stage).trainable, "AdamW moments": 8 * M.param_counts(stage).trainable}


def test_fp32_activation_items_match_autograd_on_a_small_layer():
    """Build one real Phi layer with LoRA (head dim 80 as Phi-2), count the bytes autograd saves
    (parameters excluded, each storage once) and compare with the plan's fp32 list. On the CPU the
    four dropout masks are fp32 (4 bytes) where CUDA's are bool (1 byte)."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

    from tinygptv_lib.model.phi import TinyGPTVPhiDecoderLayer, build_hf_phi_config

    cfg = get_config("full")
    cfg.phi.hidden_size, cfg.phi.num_heads, cfg.phi.intermediate_size = 160, 2, 640
    cfg.lora.r = 16
    hf = build_hf_phi_config(cfg.phi)
    layer = TinyGPTVPhiDecoderLayer(hf, 0)
    inject_adapter_in_model(LoraConfig(r=16, lora_alpha=4, lora_dropout=0.05,
                                       target_modules=["query_key_value", "dense"]), layer)
    for n, p in layer.named_parameters():
        p.requires_grad_("lora_" in n or n.endswith("layernorm.weight"))
    layer.train()
    B, T = 2, 24
    x = torch.randn(B, T, 160, requires_grad=True)
    cos, sin = PhiRotaryEmbedding(hf)(x, torch.arange(T)[None])
    params = {p.data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and t.numel() > B * T:  # per-token tensors; skip weights and row statistics
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, position_embeddings=(cos, sin), attention_mask=None)
    measured = sum(seen.values()) / (B * T)
    dims = M.Dims.full()
    dims.d, dims.inter, dims.heads, dims.lora_r = 160, 640, 2, 16
    planned = sum(b for name, b in M.phi_layer_saved(dims, "fp32", lora=True) if "log-sum-exp" not in name)
    cpu_masks = 4 * 3 * 160  # four masks, 3 bytes more each per hidden unit on the CPU
    assert measured == pytest.approx(planned + cpu_masks, rel=0.02)


def test_plan_fits_a_t4_with_fp16_and_checkpointing():
    for stage in (1, 2, 3, 4):
        p = M.plan_step(stage, "fp16", True)
        assert p.peak_bytes <= M.usable_bytes(), (stage, p.peak_gib)
        assert p.parts["weights"] == M.weight_bytes(stage, "fp16", p.img)
    assert M.plan_step(2, "fp16", False).peak_bytes > M.plan_step(2, "fp16", True).peak_bytes
    assert M.max_batch(2, "fp16", False) < 64
    assert "fp16/bf16" in M.advice(M.plan_step(1, "fp32", True), False, 0)
    assert sum(M.plan_inference().values()) < 8 * M.GiB
    table = M.plan_table()
    assert table.count("\n| ") == 1 + 4 * 2 * 3 * 2  # header + every stage x size x precision x checkpointing
