"""The CPU kernels of model/fast_cpu.py compute what the plain torch layers compute."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinygptv_lib.model import fast_cpu as fc


@pytest.fixture
def layer():
    torch.manual_seed(0)
    lin = nn.Linear(48, 80)
    lin.requires_grad_(False)
    return lin


def test_frozen_linear_matches_f_linear_value_and_input_gradient(layer):
    x = torch.randn(3, 7, 48, requires_grad=True)
    g = torch.randn(3, 7, 80)
    fast = fc.frozen_linear(x, layer.weight, layer.bias)
    (gx_fast,) = torch.autograd.grad(fast, x, g)
    plain = F.linear(x, layer.weight, layer.bias)
    (gx_plain,) = torch.autograd.grad(plain, x, g)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_fast, gx_plain, rtol=1e-5, atol=1e-5)
    if fc.onednn_applies(x, layer.weight):  # the fast path was really taken (this torch has oneDNN)
        assert type(fast.grad_fn).__name__.startswith("_FrozenLinear")
    with torch.no_grad():
        torch.testing.assert_close(fc.frozen_linear(x, layer.weight, None), F.linear(x, layer.weight),
                                   rtol=1e-5, atol=1e-5)


def test_trained_weights_and_other_dtypes_take_f_linear(layer):
    layer.weight.requires_grad_(True)
    x = torch.randn(4, 48)
    out = fc.frozen_linear(x, layer.weight, layer.bias)
    out.sum().backward()
    assert layer.weight.grad is not None  # the plain path trains the weight
    layer.weight.requires_grad_(False)
    assert not fc.onednn_applies(x.double(), layer.weight)
    out64 = fc.frozen_linear(x.double(), layer.weight.double(), layer.bias.double())
    assert out64.dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fc.onednn_applies(x, layer.weight)
        assert fc.frozen_linear(x, layer.weight, layer.bias).dtype == torch.bfloat16


def test_frozen_matmul_t_is_the_input_gradient(layer):
    grad = torch.randn(6, 80)
    torch.testing.assert_close(fc.frozen_matmul_t(grad, layer.weight), grad @ layer.weight, rtol=1e-5, atol=1e-5)


def test_fast_dropout_keeps_one_minus_p_scales_and_backprops_through_the_same_mask():
    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    y = fc.fast_dropout(x, 0.1)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005  # 4.6 standard deviations
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(gx != 0, kept)
    assert torch.equal(fc.fast_dropout(x, 0.1, training=False), x)
    torch.manual_seed(5)
    a = fc.fast_dropout(x, 0.3)
    torch.manual_seed(5)
    assert torch.equal(a, fc.fast_dropout(x, 0.3))  # seeded: the same mask again
    with pytest.raises(ValueError, match="dropout probability"):
        fc.fast_dropout(x, 1.0)


def test_use_fast_cpu_layers_swaps_classes_and_keeps_the_state_dict():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.GELU(), nn.Linear(16, 4))
    net.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(5, 8)
    ref = net.eval()(x)
    fc.use_fast_cpu_layers(net)
    assert [type(m) for m in net] == [fc.FastLinear, fc.FastDropout, nn.GELU, fc.FastLinear]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)
    net.train()
    assert (net[1](torch.ones(10_000)) == 0).any()  # dropout still drops in training


def test_model_uses_them_and_lora_wraps_a_fast_base_layer():
    from tinygptv_lib.model.tinygptv import build_model

    m = build_model("nano", stage=2)
    assert not any(type(mod) is nn.Linear for mod in m.modules())
    assert not any(type(mod) is nn.Dropout for mod in m.modules())
    qkv = m.phi.model.layers[0].self_attn.query_key_value
    assert isinstance(qkv.base_layer, fc.FastLinear) and isinstance(qkv.lora_dropout["default"], fc.FastDropout)
