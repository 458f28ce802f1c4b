"""What every launcher needs from the device its tensors live on.

Triton launches on the *current* CUDA device, not the tensors': a model on ``cuda:1`` without
``torch.cuda.set_device(1)`` would run GPU-0 code on GPU-1 pointers. Every launch goes inside
``on_device_of(tensor)``.
"""
from __future__ import annotations

import contextlib
import os

import torch


def on_device_of(tensor: torch.Tensor):
    """A context that makes the tensor's CUDA device current (nothing to do for CPU tensors)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``, which size persistent and split grids. The CPU
    interpreter gets 4, so tiny tests still see several programs and a ragged last one; the
    compile-only harness (tests/compile_only.py) fakes ``get_device_properties``."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
