"""torch.nn.functional.scaled_dot_product_attention with the bias as a float mask (attention ops only).

With a float mask that requires grad, PyTorch picks its memory-efficient kernel, which returns the
bias gradient too; it is the strongest stock baseline for SimMIM's biased attention.
"""
from __future__ import annotations

from typing import List

import torch.nn.functional as F

from . import Backend, device_types


def attention(q, k, v, bias=None, scale=None, dropout_p=0.0):
    attn_mask = None if bias is None else bias.unsqueeze(0).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)


def window_attention(q, k, v, bias, window_mask=None, scale=None, dropout_p=0.0):
    if window_mask is None:
        return attention(q, k, v, bias, scale, dropout_p)
    # Fold the window index into the head axis so the (nW, H, T, T) mask broadcasts over the batch.
    num_windows = window_mask.shape[0]
    batch_windows, heads, tokens, head_dim = q.shape
    folded = (batch_windows // num_windows, num_windows * heads, tokens, head_dim)
    combined = (bias.unsqueeze(0) + window_mask.unsqueeze(1)).reshape(1, num_windows * heads, tokens, tokens)
    out = F.scaled_dot_product_attention(q.reshape(folded), k.reshape(folded), v.reshape(folded),
                                         attn_mask=combined.to(q.dtype), dropout_p=dropout_p, scale=scale)
    return out.reshape(batch_windows, heads, tokens, head_dim)


class SdpaBackend(Backend):
    name = "sdpa"
    ops = ("attention", "window_attention")
    description = "torch scaled_dot_product_attention with a float bias mask (memory-efficient kernel)"

    def not_supported_reasons(self, op, args) -> List[str]:
        devices = device_types(args)
        if devices != {"cuda"}:
            return [f"tensors on {sorted(devices)}; sdpa is offered as a CUDA baseline (the reference is the CPU path)"]
        return []

    def implementation(self, op):
        return {"attention": attention, "window_attention": window_attention}[op]
