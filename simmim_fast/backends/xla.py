"""Static-shape formulations for XLA devices (TPU, or the XLA CPU device in tests): no Triton, no syncs."""
from __future__ import annotations

import functools
from typing import List

from .. import reference
from . import ALL_OPS, Backend, device_types


@functools.lru_cache(maxsize=None)
def _torch_xla_import_error() -> str:
    try:
        import torch_xla  # noqa: F401
    except Exception as error:
        return f"torch_xla is not importable ({type(error).__name__}: {error})"
    return ""


class XlaBackend(Backend):
    name = "xla"
    ops = ALL_OPS
    description = "static-shape PyTorch for XLA devices (torch_xla)"

    def unavailable_reasons(self) -> List[str]:
        error = _torch_xla_import_error()
        return [error] if error else []

    def not_supported_reasons(self, op, args) -> List[str]:
        devices = device_types(args)
        return [] if devices == {"xla"} else [f"tensors on {sorted(devices)}; this backend is for XLA devices"]

    def implementation(self, op):
        # Every reference op is already static-shape: dense mask, multiplication, no data-dependent
        # gather, no .item(). The masked-only decoder's compaction is not used here.
        return reference.OPS[op]
