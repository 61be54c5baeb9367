"""Faster CPU kernels for the layers a TinyGPT-V training step spends its time in.

**Frozen linear layers through oneDNN.**

Every big matrix product of a TinyGPT-V training step belongs to a *frozen* layer: the ViT, the
Q-Former, Phi's own weights under LoRA and the vocabulary head. On the CPU, torch's `F.linear`
hands them to the BLAS (MKL) and, for a layer with a bias, first copies the bias into the output.
oneDNN's linear primitive (`torch.ops.mkldnn._linear_pointwise`, the kernel `torch.compile` uses for
CPU linears) adds the bias inside the product and was 6-15 % faster on our shapes (fp32, 2-core
AMD EPYC; `benchmarks/compare_train.py`), so a frozen layer uses it when it can:

- the weight (and bias) do not require a gradient, the tensors are fp32 on the CPU, and no autocast
  is active; anything else (a GPU, fp16/bf16, a trained layer) takes `F.linear` unchanged;
- with an input that requires a gradient (Phi's layers: the gradient flows back to LoRA and the
  projections), the backward pass is the same primitive on the transposed weight: grad @ W.

The arithmetic is the same product and sum, so results agree with `F.linear` to float rounding
(tests/test_fast_cpu.py).

**Dropout from one uniform draw.** On the CPU, `F.dropout` draws its mask with `bernoulli_`, which
took twice as long as `torch.rand` on our machine; Phi's residual dropout and LoRA's input dropout
run four times a layer. `FastDropout` keeps an element where a uniform draw u in [0, 1) has
u >= p (probability 1 - p, as `bernoulli_(1 - p)`), scales by 1 / (1 - p), and backward multiplies
by the same mask: forward and backward together took 1.2 ms instead of 2.5 ms on a (8, 79, 512)
tensor. The masks come from torch's CPU generator, so a seeded run repeats itself; they are not the
masks `F.dropout` would draw. Off the CPU it is `F.dropout`.

`use_fast_cpu_layers(module)` turns every plain `nn.Linear` inside a module into a `FastLinear` and
every plain `nn.Dropout` into a `FastDropout`, in place: same parameters, same state dict, only
`forward` differs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ONEDNN = None  # the oneDNN linear op, or False where this torch build has none (looked up once)


def _onednn_linear():
    global _ONEDNN
    if _ONEDNN is None:
        op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
        ok = op is not None and torch.backends.mkldnn.is_available()
        if ok:
            try:  # a build can list the op and still lack a CPU kernel for it
                ok = torch.equal(op(torch.ones(2, 3), torch.ones(4, 3), torch.ones(4), "none", [], ""),
                                 torch.full((2, 4), 4.0))
            except Exception:  # noqa: BLE001 (any failure of the probe means: use F.linear)
                ok = False
        _ONEDNN = op if ok else False
    return _ONEDNN


def _plain(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _onednn_linear()(x, weight, bias, "none", [], "")


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b with W and b frozen: backward returns only d x = d y W."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return _plain(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return _plain(grad, weight.t(), None), None, None


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where the oneDNN path is taken: fp32 CPU tensors, no autocast, the op available."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and bool(_onednn_linear()))


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through oneDNN when the weight and bias are frozen (see above)."""
    if weight.requires_grad or (bias is not None and bias.requires_grad) or not onednn_applies(x, weight):
        return F.linear(x, weight, bias)
    if x.requires_grad and torch.is_grad_enabled():
        return _FrozenLinear.apply(x, weight, bias)
    return _plain(x, weight, bias)


def frozen_matmul_t(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight for a frozen (out, in) weight, x (N, out): the input gradient of a linear layer."""
    if onednn_applies(x, weight) and not (x.requires_grad and torch.is_grad_enabled()):
        return _plain(x, weight.t(), None)
    return x @ weight


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)`, its mask drawn with one `torch.rand` on the CPU (see above)."""
    if not training or p == 0.0 or x.device.type != "cpu" or not x.is_floating_point():
        return F.dropout(x, p, training)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    mask = torch.rand(x.shape, dtype=x.dtype, device=x.device).ge_(p).div_(1.0 - p)
    return x * mask


class FastDropout(nn.Dropout):
    """`nn.Dropout` whose mask, on the CPU, comes from `fast_dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return F.dropout(x, self.p, self.training, inplace=True)
        return fast_dropout(x, self.p, self.training)


class FastLinear(nn.Linear):
    """`nn.Linear` whose forward goes through `frozen_linear` (oneDNN on the CPU when frozen)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self.weight, self.bias)


def use_fast_cpu_layers(module: nn.Module) -> nn.Module:
    """Turn every plain `nn.Linear` / `nn.Dropout` inside `module` into `FastLinear` / `FastDropout`,
    in place (no copies; subclasses and other layers are left alone)."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = FastLinear
        elif type(m) is nn.Dropout:
            m.__class__ = FastDropout
    return module
