"""Static-shape formulations for XLA devices (TPU, or the XLA CPU device in tests).

XLA traces a step into one graph, compiles it once per distinct set of shapes and replays it. So on
an XLA device every op must be shape-static and sync-free:

- no boolean indexing, nonzero or masked_select: the 0/1 mask stays dense and selects by
  multiplication (the loss is ``sum(|x - x_rec| * mask_px) / (sum(mask_px) + 1e-5)``);
- no data-dependent shapes: the masked-only decoder of the fast backends (which gathers the
  masked patches) is replaced by the dense 1x1 conv + PixelShuffle of the reference;
- no ``.item()``/``bool(tensor)``/``.tolist()`` inside forward or backward (each would cut the graph
  and sync with the host; ``simmim_fast._checks`` reads mask values on the CPU only);
- no Triton or CUDA kernels: attention is the reference's explicit softmax(q k^T * scale + bias) v.

The reference ops (``simmim_fast.reference``) are written exactly this way, so this backend runs
them as they are; tests/test_xla.py holds them to it on the XLA CPU device: one compilation reused
across steps, one graph execution per step, no aten op falling back to the CPU.
"""
from __future__ import annotations

from typing import List

from .. import reference
from . import ALL_OPS, Backend, device_types, import_error


class XlaBackend(Backend):
    name = "xla"
    ops = ALL_OPS
    description = "static-shape PyTorch for XLA devices (torch_xla): dense mask, no syncs, reference attention"

    def unavailable_reasons(self) -> List[str]:
        error = import_error("torch_xla")
        return [error] if error else []

    def not_supported_reasons(self, op, args) -> List[str]:
        devices = device_types(args)
        return [] if devices == {"xla"} else [f"tensors on {sorted(devices)}; this backend is for XLA devices"]

    def implementation(self, op):
        return reference.OPS[op]
