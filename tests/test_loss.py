"""The fused target-position loss equals the plain cross-entropy, value and gradient."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinygptv_lib.model.loss import target_cross_entropy


@pytest.fixture
def head():
    torch.manual_seed(0)
    h = nn.Linear(32, 500)
    h.requires_grad_(False)  # frozen, as Phi's lm_head in every stage
    return h


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_value_and_gradient_match_cross_entropy(head, reduction):
    hidden = torch.randn(17, 32, requires_grad=True)
    targets = torch.randint(0, 500, (17,))
    fused = target_cross_entropy(hidden, head, targets, reduction)
    (g_fused,) = torch.autograd.grad(fused * 3.0, hidden)  # an upstream factor, as a grad scaler gives
    plain = F.cross_entropy(head(hidden).float(), targets, reduction=reduction)
    (g_plain,) = torch.autograd.grad(plain * 3.0, hidden)
    assert fused.grad_fn is not None and type(fused.grad_fn).__name__.startswith("_HeadCrossEntropy")
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-5, atol=1e-7)


def test_plain_path_when_the_head_trains_or_no_gradient(head):
    hidden = torch.randn(5, 32)
    targets = torch.randint(0, 500, (5,))
    with torch.no_grad():
        assert target_cross_entropy(hidden, head, targets).grad_fn is None
    head.weight.requires_grad_(True)
    out = target_cross_entropy(hidden.requires_grad_(), head, targets)
    out.backward()
    assert head.weight.grad is not None  # the plain path trains the head
    with pytest.raises(ValueError, match="reduction"):
        target_cross_entropy(hidden, head, targets, "none")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_vocabulary_in_chunks_matches_cross_entropy(monkeypatch, reduction):
    """Chunks of 1,024 columns (the smallest), the last one partial, targets in every chunk, and
    logits whose maximum lies in a late chunk for some rows (the running maximum must rescale)."""
    import tinygptv_lib.model.loss as L

    monkeypatch.setattr(L, "CHUNK_BYTES", 0)
    torch.manual_seed(1)
    head = nn.Linear(32, 2500)
    head.requires_grad_(False)
    with torch.no_grad():
        head.bias[2400:] += 8.0  # the last, partial chunk holds the largest logits
    hidden = torch.randn(23, 32, requires_grad=True)
    targets = torch.tensor([0, 1023, 1024, 2047, 2048, 2499] + torch.randint(0, 2500, (17,)).tolist())
    fused = target_cross_entropy(hidden, head, targets, reduction)
    (g_fused,) = torch.autograd.grad(fused, hidden)
    plain = F.cross_entropy(head(hidden), targets, reduction=reduction)
    (g_plain,) = torch.autograd.grad(plain, hidden)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-5, atol=1e-6)


def test_targets_outside_the_vocabulary_are_refused(head):
    hidden = torch.randn(3, 32, requires_grad=True)
    for bad in (500, -1):
        with pytest.raises(ValueError, match=r"target ids must lie in \[0, 500\)"):
            target_cross_entropy(hidden, head, torch.tensor([1, bad, 2]))
