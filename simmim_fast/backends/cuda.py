"""Hand-written CUDA C++ ops from csrc/ (an optional build), registered as torch.ops.simmim_fast.*.

Available once the extension loads (``simmim_fast.cuda_ops.load_error`` says why not: CPU-only
torch, not built, built for another torch, JIT compile failed); then it takes CUDA tensors only.
"""
from __future__ import annotations

from typing import List

import torch

from . import Backend, device_types

CUDA_OPS = ("masked_l1_loss", "mask_token_blend")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The tensors of each op that the kernel reads as pixels/features, which must share one kernel dtype.
VALUE_TENSORS = {"masked_l1_loss": ("reconstruction", "target"), "mask_token_blend": ("tokens", "mask_token")}


def extension_error() -> str:
    """Why the compiled ops cannot be used, or '' when they are registered."""
    from .. import cuda_ops

    return cuda_ops.load_error()


class CudaBackend(Backend):
    name = "cuda"
    ops = CUDA_OPS
    description = "CUDA C++ kernels from csrc/ (optional build: SIMMIM_FAST_BUILD_CUDA=1, see csrc/README.md)"

    def unavailable_reasons(self) -> List[str]:
        error = extension_error()
        return [error] if error else []

    def not_supported_reasons(self, op, args) -> List[str]:
        reasons = []
        devices = device_types(args)
        if devices != {"cuda"}:
            reasons.append(f"tensors on {sorted(devices)}; the extension's kernels take CUDA tensors only")
        dtypes = [args[name].dtype for name in VALUE_TENSORS[op]]
        if dtypes[0] not in KERNEL_DTYPES or len(set(dtypes)) != 1:
            names = " and ".join(VALUE_TENSORS[op])
            reasons.append(f"{names} are {', '.join(map(str, dtypes))}; the kernels take one of "
                           "float32/float16/bfloat16 for both")
        return reasons

    def implementation(self, op):
        from .. import cuda_ops

        return getattr(cuda_ops, op)
