"""One decoding step of TinyGPT-V's Phi on a CPU, with the arithmetic of its layers in fewer operations.

After the prompt pass, each new token runs through every layer once. In transformers' modules
(`model/phi.py`), with peft's LoRA around `query_key_value` and `dense`, that is about 60 small
operations per layer, and at nano size their fixed costs are most of a step. This step computes the
same thing, layer by layer, in the same order:

    x_norm = LayerNorm(x)
    q, k, v = per-head QK-Norm(split(x_norm @ (W_qkv + s * B_qkv A_qkv)^T + b_qkv)), rotary on q and k
    attn    = RMSNorm(softmax(q K^T / sqrt(d)) V @ (W_dense + s * B_dense A_dense)^T + b_dense)
    x       = attn + fc2(GELU(fc1(x_norm))) + x

with changes that leave the values equal up to float rounding:
- LoRA merged: W + s * B A is formed once (B A is rank r) and kept while no parameter changes,
  instead of two extra products, a scale and an add per layer and token. The parameters are not
  touched.
- Keys and values go into buffers sized for the whole answer, filled in place, instead of a cache
  that concatenates a new tensor every step.
- Rotary on q and k at once, and one-row products as `bmm` over slices of the weight (`_linear`).

Measured at the benchmarks' nano size (2-core VM, 2 threads, one row, 64 new tokens), a whole
cached step with the vocabulary head: 6.7 ms through the modules, 3.4 ms with this step (and the
head in slices, `generate._DecodeHead`); see docs/PERFORMANCE.md. `generate` uses it only where it
is exact to rounding and known to be faster: fp32 on a CPU, Phi built by `model/phi.py`, plain LoRA
(or none). Everything else (GPUs, half precision, other adapters) runs the modules, as before.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from ..model.phi import TinyGPTVPhiDecoderLayer

_KEPT: dict[int, tuple] = {}  # id(owner) -> (weakref to it, the key it was built for, what was built)


def kept(owner, key, build):
    """`build()`, kept between calls while `key` (e.g. its tensors' versions) is unchanged; a new one
    after any in-place update, which bumps a tensor's version; dropped when `owner` goes."""
    entry = _KEPT.get(id(owner))
    if entry is not None and entry[0]() is owner and entry[1] == key:
        return entry[2]
    if entry is None or entry[0]() is not owner:
        weakref.finalize(owner, _KEPT.pop, id(owner), None)
    value = build()
    _KEPT[id(owner)] = (weakref.ref(owner), key, value)
    return value


def _effective(linear: torch.nn.Module) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(weight, bias) that a linear layer, or a peft LoRA layer around one, applies in eval mode;
    None for anything this step does not reproduce exactly (a LoRA variant, merged-then-disabled...)."""
    if isinstance(linear, torch.nn.Linear):
        return linear.weight, linear.bias
    base = getattr(linear, "base_layer", None)
    if not isinstance(base, torch.nn.Linear) or not hasattr(linear, "lora_A"):
        return None
    if getattr(linear, "lora_variant", None) or getattr(linear, "merged", False):
        return None  # DoRA and friends, or weights peft has already merged: leave them to peft
    weight = base.weight
    if not getattr(linear, "disable_adapters", False):
        for name in linear.active_adapters:
            if name not in linear.lora_A.keys():
                continue
            a, b = linear.lora_A[name].weight, linear.lora_B[name].weight
            weight = weight + linear.scaling[name] * (b @ a)
    return weight, base.bias


def _prepare(layer: TinyGPTVPhiDecoderLayer) -> Optional[dict]:
    """The layer's weights as the step uses them (LoRA merged), kept while no parameter changes;
    None when a layer holds something the step does not reproduce."""
    def build() -> Optional[dict]:
        attn = layer.self_attn
        weights = {"qkv": _effective(attn.query_key_value), "dense": _effective(attn.dense),
                   "fc1": _effective(layer.mlp.fc1), "fc2": _effective(layer.mlp.fc2)}
        return None if None in weights.values() else weights

    return kept(layer, tuple((p.data_ptr(), p._version) for p in layer.parameters()), build)


def sliced_matvec(weight: torch.Tensor, x: torch.Tensor, chunks: int) -> torch.Tensor:
    """x (1, in) @ weight^T -> (1, out), as a batch of `chunks` matrix-vector products over slices of
    the weight's rows (`bmm`; out must divide by chunks). On a CPU this reads a weight that is out of
    the caches faster than `linear`'s one-row kernel (figures at `_linear` and `_DecodeHead`)."""
    out, inp = weight.shape
    return torch.bmm(weight.view(chunks, out // chunks, inp), x.t().expand(chunks, inp, 1)).view(1, out)


CHUNKS = 4


def _linear(x: torch.Tensor, wb: tuple) -> torch.Tensor:
    """x @ weight^T + bias. One row: as a batch of CHUNKS matrix-vector products over slices of the
    weight's rows (`bmm`). Measured on the 2-core VM with the weight out of the caches (as it is after
    the vocabulary head has been read), microseconds per product, `linear` vs this:
    768 x 256 88 vs 33, 1024 x 256 124 vs 37, 256 x 1024 73 vs 33, 256 x 256 32 vs 19 (2 threads);
    95/46, 126/64, 77/48, 36/24 (1 thread). The same values up to float rounding."""
    weight, bias = wb
    if x.shape[0] != 1 or weight.shape[0] % CHUNKS:
        return F.linear(x, weight, bias)
    y = sliced_matvec(weight, x, CHUNKS)
    return y + bias if bias is not None else y


def start(phi: torch.nn.Module, cache, mask: torch.Tensor, max_new: int) -> Optional["LeanDecoder"]:
    """A LeanDecoder going on from the prompt pass, or None where it would not reproduce the modules
    exactly (to rounding): only our Phi, fp32, on a CPU, in eval mode, with plain LoRA or none, and a
    cache that holds the prompt's keys and values per layer."""
    body = getattr(phi, "model", None)
    layers = getattr(body, "layers", None)
    if layers is None or not len(layers) or not all(isinstance(l, TinyGPTVPhiDecoderLayer) for l in layers):
        return None
    if not hasattr(body, "rotary_emb") or not hasattr(body, "final_layernorm") or phi.training:
        return None
    if not all(p.device.type == "cpu" and p.dtype == torch.float32 for p in phi.parameters()):
        return None
    cached = getattr(cache, "layers", None)
    if cached is None or len(cached) != len(layers) or \
            any(getattr(c, "keys", None) is None or getattr(c, "values", None) is None or
                c.keys.shape[2] != mask.shape[1] for c in cached):
        return None
    prepared = [_prepare(layer) for layer in layers]
    if any(p is None for p in prepared):
        return None
    return LeanDecoder(phi, cache, mask, max_new, prepared)


class LeanDecoder:
    """Decodes on from a prompt pass made by the modules (`body(..., use_cache=True)`); made by `start`.

    cache: that pass's cache (transformers' `DynamicCache`: per layer `.keys`, `.values`, shaped
    (rows, heads, prompt length, head dim)); mask: the prompt's attention mask (rows, prompt length),
    0 at left padding; max_new: how many more positions the buffers must hold.
    """

    def __init__(self, phi: torch.nn.Module, cache, mask: torch.Tensor, max_new: int, prepared: list[dict]):
        body = phi.model
        self.body, self.embed = body, phi.get_input_embeddings()
        self.layers = prepared
        first = body.layers[0].self_attn
        self.heads, self.head_dim, self.rotary = first.num_heads, first.head_dim, first.rotary_ndims
        self.scaling = first.scaling
        rows, prompt = mask.shape
        self.length = prompt
        self.total = total = prompt + max_new
        self.keys, self.values = [], []
        for i in range(len(body.layers)):
            k, v = cache.layers[i].keys, cache.layers[i].values
            kb = k.new_zeros(rows, k.shape[1], total, k.shape[3])
            vb = v.new_zeros(rows, v.shape[1], total, v.shape[3])
            kb[:, :, :prompt], vb[:, :, :prompt] = k, v
            self.keys.append(kb)
            self.values.append(vb)
        # Padded rows attend only to their real positions (and every new one); None when there is no padding.
        self.mask = None
        if not bool(mask.all()):
            self.mask = torch.ones(rows, 1, 1, total, dtype=torch.bool)
            self.mask[:, 0, 0, :prompt] = mask.bool()
        positions = torch.arange(total, device=mask.device)[None]
        probe = self.keys[0].new_zeros(1, total, self.heads * self.head_dim)
        cos, sin = body.rotary_emb(probe, positions)  # (1, total, rotary dims): the table, once
        self.cos, self.sin = cos[0], sin[0]

    @torch.no_grad()
    def step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids (rows,) at positions (rows,) -> the final-norm hidden state (rows, width)."""
        t = self.length
        if t >= self.total:
            raise ValueError(f"the buffers hold {self.total} positions (prompt + max_new), all used; "
                             "start a new decoder for a longer answer")
        rows = ids.shape[0]
        x = self.embed(ids)  # (rows, width)
        cos, sin = self.cos[positions][:, None, None], self.sin[positions][:, None, None]  # (rows, 1, 1, rotary)
        mask = None if self.mask is None else self.mask[..., :t + 1]
        r, d, h = self.rotary, self.head_dim, self.heads
        for layer, w, keys, values in zip(self.body.layers, self.layers, self.keys, self.values):
            attn = layer.self_attn
            ln = layer.input_layernorm
            xn = F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
            qkv = _linear(xn, w["qkv"]).view(rows, h, 3, d)
            ql, kl = attn.q_layernorm, attn.k_layernorm
            qk = torch.stack((F.layer_norm(qkv[:, :, 0], (d,), ql.weight, ql.bias, ql.eps),
                              F.layer_norm(qkv[:, :, 1], (d,), kl.weight, kl.bias, kl.eps)), dim=2)
            rot = qk[..., :r]  # rotary on q and k at once: transformers' x * cos + rotate_half(x) * sin
            qk[..., :r] = rot * cos + torch.cat((-rot[..., r // 2:], rot[..., :r // 2]), dim=-1) * sin
            keys[:, :, t], values[:, :, t] = qk[:, :, 1], qkv[:, :, 2]
            out = F.scaled_dot_product_attention(qk[:, :, :1], keys[:, :, :t + 1], values[:, :, :t + 1],
                                                 attn_mask=mask, scale=self.scaling)
            a = layer.post_layernorm(_linear(out.reshape(rows, h * d), w["dense"]))
            ff = _linear(layer.mlp.activation_fn(_linear(xn, w["fc1"])), w["fc2"])
            x = a + ff + x
        self.length = t + 1
        return self.body.final_layernorm(x)
