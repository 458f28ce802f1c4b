"""What the two attention ops (attention_bias.py, window_attention.py) share around their kernels:
the operands' dtype and scale rules of the reference, the precision of their products, and the packed
layout of their gradients."""
from __future__ import annotations

from typing import Optional

import torch


def attention_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float]):
    """(q, k, v, scale): scale defaults to d^-0.5; under autocast q, k, v take the autocast dtype,
    because the reference's matmuls run in it and so its output has that dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v, scale


def dot_precision(dtype: torch.dtype) -> str:
    """The one TF32 rule of the attention kernels (flash and whole-window alike): fp32 operands follow
    ``torch.backends.cuda.matmul.allow_tf32``, as the reference's fp32 matmuls do: exact fp32 products
    ("ieee", off tensor cores) by default, TF32 when it is allowed. 16-bit operands are exact in
    either setting."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def packed_qkv_gradient(dqkv: torch.Tensor, needed):
    """dq, dk, dv as (B, H, N, d) views of one (B, N, 3, H, d) gradient buffer (None where ``needed``
    is false): the layout of the qkv projection the encoders split q, k, v from, so the split's
    backward (simmim_fast.models.layers.split_qkv) takes the buffer whole, with no copy."""
    return tuple(dqkv[:, :, index].transpose(1, 2) if need else None for index, need in enumerate(needed))
