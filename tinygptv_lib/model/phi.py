"""Phi-2 with TinyGPT-V's norms, built on transformers' Phi without editing the installed package.

The original TinyGPT-V asked users to overwrite transformers' `modeling_phi.py`. Here we subclass:
- `TinyGPTVPhiAttention`: Phi attention with the original's fused `query_key_value` projection
  (per-head interleaved: the 3*hidden outputs view as (heads, 3, head_dim)), per-head
  `q_layernorm` / `k_layernorm` applied before the rotary embedding (QK-Norm), SDPA and the KV cache
  through transformers' own attention functions and `Cache` objects.
- `TinyGPTVPhiDecoderLayer`: Phi's parallel block with an RMSNorm (`post_layernorm`) on the
  attention branch only: h = x + drop(RMSNorm(attn(LN(x)))) + drop(mlp(LN(x))).
New norms start as identity (weight 1, bias 0), so an untrained TinyGPT-V Phi computes what Phi
computes except for the QK-Norm and the RMSNorm themselves (see notebook 04).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers import PhiConfig as HFPhiConfig
from transformers import PhiForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.phi.modeling_phi import (
    PhiAttention,
    PhiDecoderLayer,
    PhiMLP,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from ..config import PhiConfig


def build_hf_phi_config(cfg: PhiConfig) -> HFPhiConfig:
    """transformers' PhiConfig with our numbers (its defaults are Phi-1.5's, not Phi-2's)."""
    hf = HFPhiConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_act="gelu_new",
        resid_pdrop=cfg.resid_pdrop,
        embd_pdrop=0.0,
        attention_dropout=0.0,
        qk_layernorm=True,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=50256,
        eos_token_id=50256,
        # No padding_idx: in Phi-2 the pad id is also BOS, and nn.Embedding(padding_idx=50256) would
        # zero the BOS row and block its gradient (a zero BOS explodes gradients through the RMSNorm).
        pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                         "partial_rotary_factor": cfg.partial_rotary_factor},
    )
    rot = cfg.head_dim * cfg.partial_rotary_factor
    if rot != int(rot) or int(rot) % 2:
        raise ValueError(f"partial_rotary_factor {cfg.partial_rotary_factor} x head_dim {cfg.head_dim} = {rot}: "
                         "the rotary dims must be an even integer (Phi-2: 0.4 x 80 = 32)")
    hf.post_norm_eps = cfg.post_norm_eps
    hf._attn_implementation = cfg.attn_implementation
    return hf


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 (TinyGPT-V's `post_layernorm`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


class TinyGPTVPhiAttention(PhiAttention):
    def __init__(self, config: HFPhiConfig, layer_idx: int):
        nn.Module.__init__(self)  # PhiAttention.__init__ would build split q/k/v projections
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.num_key_value_groups = 1
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.rotary_ndims = int(self.head_dim * config.rope_parameters["partial_rotary_factor"])
        self.qk_layernorm = True
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.q_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
        self.k_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None,
                past_key_values=None, query_positions=None, **kwargs):
        """`query_positions` (1-D, ascending): attend from these positions only (keys and values
        still come from every position); the output then has one row per query position."""
        cache = cache if cache is not None else past_key_values
        bsz, seq, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states).view(bsz, seq, self.num_heads, 3, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=3))  # (B, heads, T, head_dim)

        q = self.q_layernorm(q)  # QK-Norm, before the rotary embedding
        k = self.k_layernorm(k)

        cos, sin = position_embeddings
        r = self.rotary_ndims
        q_rot, k_rot = apply_rotary_pos_emb(q[..., :r], k[..., :r], cos, sin)
        q = torch.cat((q_rot, q[..., r:]), dim=-1)
        k = torch.cat((k_rot, k[..., r:]), dim=-1)

        if cache is not None:
            if query_positions is not None:
                raise ValueError("query_positions is for training passes, not with a KV cache")
            k, v = cache.update(k, v, self.layer_idx)
        if query_positions is not None:  # causal: query position p sees keys 0..p
            q = q[:, :, query_positions]
            if attention_mask is None:
                keys = torch.arange(k.shape[2], device=q.device)
                attention_mask = (keys[None, :] <= query_positions[:, None])[None, None]
            else:
                attention_mask = attention_mask[:, :, query_positions]

        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        kwargs.pop("position_ids", None)
        kwargs.pop("use_cache", None)
        out, weights = attention(self, q, k, v, attention_mask,
                                 dropout=self.attention_dropout if self.training else 0.0,
                                 scaling=self.scaling, **kwargs)
        out = out.reshape(bsz, q.shape[2], -1).contiguous()
        return self.dense(out), weights


class TinyGPTVPhiDecoderLayer(PhiDecoderLayer):
    def __init__(self, config: HFPhiConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.self_attn = TinyGPTVPhiAttention(config, layer_idx)
        self.mlp = PhiMLP(config)
        if config.hidden_act == "gelu_new":  # the same tanh-approximated GELU, as one fused torch kernel
            self.mlp.activation_fn = nn.GELU(approximate="tanh")  # (transformers' version runs 8 ops)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_layernorm = RMSNorm(config.hidden_size, eps=getattr(config, "post_norm_eps", 1e-6))
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                use_cache=False, position_embeddings=None, past_key_values=None, last_layer_positions=None,
                **kwargs):
        """`last_layer_positions` (1-D, ascending), given to every layer: the *last* layer computes
        its output only at these positions (the ones whose hidden state the loss reads); its keys
        and values still cover every position. Earlier layers ignore it."""
        last = self.self_attn.layer_idx == self.self_attn.config.num_hidden_layers - 1
        positions = last_layer_positions if last else None
        residual = hidden_states
        x = self.input_layernorm(hidden_states)
        attn, _ = self.self_attn(x, position_embeddings=position_embeddings, attention_mask=attention_mask,
                                 cache=cache if cache is not None else past_key_values,
                                 query_positions=positions, **kwargs)
        if positions is not None:
            x, residual = x[:, positions], residual[:, positions]
        attn = self.resid_dropout(self.post_layernorm(attn))
        ff = self.resid_dropout(self.mlp(x))
        return attn + ff + residual


class TinyGPTVPhiForCausalLM(PhiForCausalLM):
    """PhiForCausalLM whose decoder layers carry TinyGPT-V's norms and fused qkv."""

    def __init__(self, config: HFPhiConfig):
        super().__init__(config)
        self.model.layers = nn.ModuleList(
            TinyGPTVPhiDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


def build_phi(cfg: PhiConfig) -> TinyGPTVPhiForCausalLM:
    return TinyGPTVPhiForCausalLM(build_hf_phi_config(cfg))


def norm_weight_names(phi: nn.Module) -> list[str]:
    """Names (relative to the Phi model) of the norm weights TinyGPT-V trains in every stage."""
    names = []
    for name, _ in phi.named_parameters():
        if name.endswith(("q_layernorm.weight", "k_layernorm.weight", "post_layernorm.weight",
                          "input_layernorm.weight", "final_layernorm.weight")):
            names.append(name)
    return names
