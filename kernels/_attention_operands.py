"""What the two attention kernels (attention_bias.py, window_attention.py) do to their operands
before launching, so that they match the reference's dtype and scale rules."""
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
