"""Hand-written CUDA C++ ops from csrc/ (built on request), registered as torch.ops.simmim_fast.*."""
from __future__ import annotations

from typing import List

import torch

from . import Backend, device_types

CUDA_OPS = ("masked_l1_loss", "mask_token_blend")


def extension_error() -> str:
    """Why the compiled extension cannot be used, or '' when its ops are registered."""
    try:
        import simmim_fast._C  # noqa: F401  (built by SIMMIM_FAST_BUILD_CUDA=1 pip install .)
    except ImportError as error:
        return f"CUDA extension simmim_fast._C not built ({error}); build with SIMMIM_FAST_BUILD_CUDA=1"
    return ""


class CudaBackend(Backend):
    name = "cuda"
    ops = CUDA_OPS
    description = "CUDA C++ kernels from csrc/ (optional build)"

    def unavailable_reasons(self) -> List[str]:
        error = extension_error()
        return [error] if error else []

    def not_supported_reasons(self, op, args) -> List[str]:
        devices = device_types(args)
        return [] if devices == {"cuda"} else [f"tensors on {sorted(devices)}; the extension runs on CUDA"]

    def implementation(self, op):
        from .. import cuda_ops

        return getattr(cuda_ops, op)
