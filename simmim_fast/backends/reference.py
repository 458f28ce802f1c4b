"""The plain PyTorch backend: runs everywhere, the oracle of the numerical tests."""
from __future__ import annotations

from .. import reference
from . import ALL_OPS, Backend


class ReferenceBackend(Backend):
    name = "reference"
    ops = ALL_OPS
    description = "plain PyTorch (simmim_fast.reference): any device, the numerical oracle"

    def implementation(self, op):
        return reference.OPS[op]
