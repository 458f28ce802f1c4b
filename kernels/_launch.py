"""What every launcher needs: the device its tensors live on, and integer arithmetic for grids and blocks.

Triton launches on the *current* CUDA device, not the tensors': a model on ``cuda:1`` without
``torch.cuda.set_device(1)`` would run GPU-0 code on GPU-1 pointers. Every launch goes inside
``on_device_of(tensor)``.

Launchers size grids and blocks with ``cdiv`` and ``next_power_of_2`` from here, not ``triton.cdiv`` and
``triton.next_power_of_2``: in Triton 3.6 those are constexpr functions, whose call from host code
unwraps every argument and imports a module each time (2.2 us a call here against 0.02 us, and a launcher
makes up to ten: docs/kernels.md, host overhead). Inside a kernel, ``tl.cdiv`` as before.
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


def cdiv(numerator: int, denominator: int) -> int:
    """``triton.cdiv``: the quotient rounded up."""
    return (numerator + denominator - 1) // denominator


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` for n >= 0: the smallest power of two >= n (0 for 0, as Triton's)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
