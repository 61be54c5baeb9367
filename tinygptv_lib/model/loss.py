"""The training loss: vocabulary projection + cross-entropy at the target positions only.

`target_cross_entropy(hidden, lm_head, targets)` equals
`F.cross_entropy(lm_head(hidden).float(), targets)`. In fp32 training (the CPU path) it also finds
the gradient with respect to `hidden` during the forward pass: the logits buffer is turned, in
place, into softmax - one_hot (max, exp, sum, divide), multiplied by the head's weight, and freed.
So the (targets x 51,200) logits are not kept for backward, and there is no separate log-softmax
output, zero-filled gradient or log-softmax backward pass over them. Same arithmetic: results agree
with the plain path to float rounding (tests/test_loss.py).
Under autocast (fp16/bf16 on a GPU) or when the head itself is trained it takes the plain path, so
mixed-precision numerics (the grad scaler's scaling of the logits' gradient) are untouched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _HeadCrossEntropy(torch.autograd.Function):
    """loss = reduce(logsumexp(h W^T + b) - (h W^T + b)[target]); d loss / d h found in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mean: bool):
        logits = F.linear(hidden, weight, bias)  # (N, V), fp32
        picked = logits.gather(1, targets[:, None]).squeeze(1)
        top = logits.amax(dim=-1, keepdim=True)
        probs = logits.sub_(top).exp_()  # in place: exp(z - max), as logsumexp computes it
        total = probs.sum(dim=-1, keepdim=True)
        losses = (top + total.log()).squeeze(1) - picked  # logsumexp(z) - z[target]
        loss = losses.mean() if mean else losses.sum()
        # softmax - one_hot, in place in the logits buffer: the gradient of the summed loss
        probs.div_(total)
        probs.scatter_add_(1, targets[:, None], torch.full_like(total, -1.0))
        grad_hidden = probs @ weight
        del logits, probs
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
