"""The training loss: vocabulary projection + cross-entropy at the target positions only.

`target_cross_entropy(hidden, lm_head, targets)` equals
`F.cross_entropy(lm_head(hidden).float(), targets)`. In fp32 training (the CPU path) it also finds
the gradient with respect to `hidden` during the forward pass, one vocabulary chunk at a time
(an online softmax, `_HeadCrossEntropy`): softmax - one_hot is never held for the whole vocabulary,
the (targets x 51,200) logits are not kept for backward, and there is no separate log-softmax
output, zero-filled gradient or log-softmax backward pass over them. Same arithmetic: results agree
with the plain path to float rounding (tests/test_loss.py).
Under autocast (fp16/bf16 on a GPU) or when the head itself is trained it takes the plain path, so
mixed-precision numerics (the grad scaler's scaling of the logits' gradient) are untouched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fast_cpu import frozen_linear, frozen_matmul_t


CHUNK_BYTES = 8 << 20  # logits of one vocabulary chunk: at most this many bytes (at least 1,024 columns)


class _HeadCrossEntropy(torch.autograd.Function):
    """loss = reduce(logsumexp(h W^T + b) - (h W^T + b)[target]); d loss / d h found in forward.

    The vocabulary is taken in chunks of columns whose logits fit in `CHUNK_BYTES`, with a running
    maximum m, sum s = sum exp(z - m) and product a = sum exp(z - m) W, both rescaled by
    exp(m_old - m_new) when the maximum rises (the online softmax). At the end
    logsumexp = m + log s, z[target_i] = h_i . W[target_i] + b[target_i] and
    d loss_i / d h_i = a_i / s_i - W[target_i]. A chunk's buffer is reused
    from the allocator's free lists instead of one (N x 51,200) allocation that the OS maps fresh
    each step, and no full-vocabulary division or scatter is needed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mean: bool):
        n, vocab = hidden.shape[0], weight.shape[0]
        if n and (int(targets.min()) < 0 or int(targets.max()) >= vocab):  # as F.cross_entropy refuses them
            raise ValueError(f"target ids must lie in [0, {vocab}), got {int(targets.min())}..{int(targets.max())}")
        cols = max(1024, CHUNK_BYTES // (4 * max(n, 1)))
        top = torch.full((n, 1), float("-inf"), dtype=hidden.dtype, device=hidden.device)
        total = torch.zeros_like(top)
        acc = torch.zeros_like(hidden)
        for lo in range(0, vocab, cols):
            hi = min(lo + cols, vocab)
            w = weight[lo:hi]
            z = frozen_linear(hidden, w, None if bias is None else bias[lo:hi])  # (N, cols) (fast_cpu.py)
            new_top = torch.maximum(top, z.amax(dim=-1, keepdim=True))
            rescale = (top - new_top).exp_()  # 0 on the first chunk (exp(-inf))
            e = z.sub_(new_top).exp_()  # in place: exp(z - max)
            total.mul_(rescale).add_(e.sum(dim=-1, keepdim=True))
            acc.mul_(rescale).add_(frozen_matmul_t(e, w))
            top = new_top
            del z, e
        w_target = weight[targets]  # the target rows: z[target] = h . W[target] + b[target]
        picked = (hidden * w_target).sum(-1) + (0.0 if bias is None else bias[targets])
        losses = (top + total.log()).squeeze(1) - picked  # logsumexp(z) - z[target]
        loss = losses.mean() if mean else losses.sum()
        grad_hidden = acc.div_(total).sub_(w_target)  # softmax @ W - one_hot @ W
        ctx.save_for_backward(grad_hidden)
        ctx.scale = 1.0 / targets.numel() if mean else 1.0
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * (grad_loss * ctx.scale), None, None, None, None


def target_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                         reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of `head(hidden)` (N, vocab) against `targets` (N,), mean or sum."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    fused = (hidden.requires_grad and hidden.dtype == torch.float32 and head.weight.dtype == torch.float32
             and not head.weight.requires_grad and (head.bias is None or not head.bias.requires_grad)
             and not torch.is_autocast_enabled(hidden.device.type))
    if not fused:
        return F.cross_entropy(head(hidden).float(), targets, reduction=reduction)
    return _HeadCrossEntropy.apply(hidden, head.weight, head.bias, targets, reduction == "mean")
