"""The two projections that carry the Q-Former's 32 outputs into Phi-2's embedding space.

TinyGPT-V keeps MiniGPT-4's `llama_proj` (768 -> 4096, trained once for Vicuna-7B's width) and adds
`llama_proj2` (4096 -> 2560, Phi-2's width). There is no activation between them, so together they
are one linear map of rank <= 768; the split lets stage 1 start from MiniGPT-4's trained layer.
"""
from __future__ import annotations

import torch
from torch import nn


class Projection(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.proj1 = nn.Linear(in_dim, hidden_dim)  # original name: llama_proj
        self.proj2 = nn.Linear(hidden_dim, out_dim)  # original name: llama_proj2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj2(self.proj1(x))
