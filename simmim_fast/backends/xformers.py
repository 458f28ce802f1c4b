"""xformers.ops.memory_efficient_attention with a tensor attn_bias (attention ops only, when importable)."""
from __future__ import annotations

from typing import List

import torch

from . import Backend, device_types, import_error

# xformers wants the bias' last dimension stored with a stride that is a multiple of 8.
_BIAS_ALIGNMENT = 8


def _aligned_bias(bias: torch.Tensor, batch: int) -> torch.Tensor:
    """(G, H, N, N) with G in {1, batch} -> (batch, H, N, N) view of a buffer with padded rows."""
    groups, heads, tokens = bias.shape[0], bias.shape[1], bias.shape[-1]
    padded = -(-tokens // _BIAS_ALIGNMENT) * _BIAS_ALIGNMENT
    storage = bias.new_zeros(groups, heads, tokens, padded)
    storage[..., :tokens] = bias
    return storage[..., :tokens].expand(batch, heads, tokens, tokens)


def _memory_efficient(q, k, v, attn_bias, scale, dropout_p):
    import xformers.ops as xops

    # xformers layout is (B, N, H, d).
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_bias=attn_bias, p=dropout_p, scale=scale)
    return out.transpose(1, 2)


def attention(q, k, v, bias=None, scale=None, dropout_p=0.0):
    attn_bias = None if bias is None else _aligned_bias(bias.unsqueeze(0).to(q.dtype), q.shape[0])
    return _memory_efficient(q, k, v, attn_bias, scale, dropout_p)


def window_attention(q, k, v, bias, window_mask=None, scale=None, dropout_p=0.0):
    combined = bias.unsqueeze(0) if window_mask is None else bias.unsqueeze(0) + window_mask.unsqueeze(1)
    images = q.shape[0] // combined.shape[0]
    per_window = combined.repeat(images, 1, 1, 1) if combined.shape[0] > 1 else combined
    return _memory_efficient(q, k, v, _aligned_bias(per_window.to(q.dtype), q.shape[0]), scale, dropout_p)


class XformersBackend(Backend):
    name = "xformers"
    ops = ("attention", "window_attention")
    description = "xformers memory_efficient_attention with a tensor attn_bias (optional package)"

    def unavailable_reasons(self) -> List[str]:
        error = import_error("xformers.ops")
        return [error] if error else []

    def not_supported_reasons(self, op, args) -> List[str]:
        devices = device_types(args)
        return [] if devices == {"cuda"} else [f"tensors on {sorted(devices)}; xformers needs CUDA"]

    def implementation(self, op):
        return {"attention": attention, "window_attention": window_attention}[op]
