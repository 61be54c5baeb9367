"""Seeding, threads, the optimiser and the learning-rate schedule shared by both pretraining runs."""
from __future__ import annotations

import math
import os
import random

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int) -> None:
    """Same seed, same machine, same thread count -> the same weights, bit for bit."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(threads: int | None) -> int:
    """Use `threads`, else OMP_NUM_THREADS if set, else 2 (the laptop this course is sized for).

    The thread count changes how float sums are split, so it is part of what reproduces a run.
    """
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() and int(env) > 0 else min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads


def _no_decay(name: str, p: nn.Parameter) -> bool:
    """Biases, norms and the learned tokens / positions are not shrunk (BLIP-2 and GPT practice)."""
    return p.ndim < 2 or name.endswith(("cls_token", "pos_embed", "query_tokens", "pos", "bias"))


def adamw(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay, plain = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (plain if _no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-8)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to `peak`, then a cosine down to `floor * peak` at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup - 1)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
