"""The one tolerance table: what "the same as the reference" means, for the tests and for ``tune()``.

fp32 on the CPU (the Triton interpreter): the fast op matches the fp32 reference within ``CPU_FP32``
(``CPU_FP16`` for float16 there).

Everywhere else (a GPU, low precision, autocast): flash-attention's rule, with a floor relative to the
size of the quantity, for the output and every gradient:

    max|fast - oracle| <= FACTOR * max|torch - oracle| + FLOOR[dtype] * max|oracle|

where ``oracle`` is the reference in higher precision (fp64 or fp32, no autocast) and ``torch`` is the
reference in the fast op's own precision. The floor is relative because the compared quantities range
from ~1e-3 (gradients of normalised activations) to ~1e2 (a bias gradient summed over 64 images, a
weight gradient over thousands of tokens), and a GPU's ``exp2`` is approximate: an absolute 1e-5 is
tighter than fp32 rounding on a value of 100.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

CPU_FP32 = dict(rtol=1e-5, atol=1e-5)
CPU_FP16 = dict(rtol=2e-3, atol=2e-3)
FACTOR = 2.0
# Relative to max|oracle|; keyed by the precision the op computes in (the autocast dtype under autocast).
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# A model under torch.compile (Inductor) against the same model eager, both fp32 on a GPU: Inductor fuses
# and reorders reductions (LayerNorm statistics, sums over the batch); max|compiled - eager| <= this x
# max|eager|.
COMPILED_FP32_FLOOR = 1e-4


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def magnitude(tensor: torch.Tensor) -> float:
    """max |tensor| (0 for an empty one)."""
    return tensor.double().abs().max().item() if tensor.numel() else 0.0


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return max_error(actual, expected) / max(magnitude(expected), 1e-12)


@dataclass(frozen=True)
class Comparison:
    """One quantity (an output or a gradient) of a fast op against the oracle, under ``FACTOR``/``FLOOR``."""

    name: str
    error: float
    torch_error: float
    reference_magnitude: float
    floor: float

    @property
    def bound(self) -> float:
        return FACTOR * self.torch_error + self.floor * self.reference_magnitude

    @property
    def ok(self) -> bool:
        return self.error <= self.bound  # False for a NaN error

    def __str__(self) -> str:
        verdict = "<=" if self.ok else ">"
        return (f"{self.name}: err {self.error:.3g} {verdict} {FACTOR:g} x torch err {self.torch_error:.3g} "
                f"+ {self.floor:g} x max|ref| {self.reference_magnitude:.3g}")


def compare_to_torch_error(fast: torch.Tensor, torch_same_precision: torch.Tensor, oracle: torch.Tensor,
                           name: str = "output", dtype: Optional[torch.dtype] = None) -> Comparison:
    """``fast`` and ``torch_same_precision`` against ``oracle``; ``dtype`` (default: fast's) picks the floor."""
    return Comparison(name, max_error(fast, oracle), max_error(torch_same_precision, oracle), magnitude(oracle),
                      FLOOR[dtype or fast.dtype])


def assert_close_cpu(actual, expected, name="output", dtype=torch.float32):
    """Tight check against the reference on the CPU; prints where the first mismatch is."""
    tol = CPU_FP32 if dtype == torch.float32 else CPU_FP16
    torch.testing.assert_close(actual, expected.to(actual.dtype), msg=lambda m: f"{name}: {m}", **tol)


def assert_within_torch_error(fast, torch_lowp, reference_fp32, name="output", dtype=None):
    """err(fast) <= FACTOR * err(torch in the same dtype) + FLOOR[dtype] * max|reference|."""
    comparison = compare_to_torch_error(fast, torch_lowp, reference_fp32, name, dtype)
    assert comparison.ok, str(comparison)
