"""The one tolerance table of the numerical tests.

CPU / interpreter (fp32): the fast op must match the fp32 reference within ``CPU_FP32``.
GPU low precision: flash-attention's rule, err(fast, fp32 ref) <= FACTOR * err(torch same dtype,
fp32 ref) + FLOOR[dtype], for the output and every gradient.
"""
import torch

CPU_FP32 = dict(rtol=1e-5, atol=1e-5)
CPU_FP16 = dict(rtol=2e-3, atol=2e-3)
FACTOR = 2.0
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    return max_error(actual, expected) / max(scale, 1e-12)


def assert_close_cpu(actual, expected, name="output", dtype=torch.float32):
    """Tight check against the reference on the CPU; prints where the first mismatch is."""
    tol = CPU_FP32 if dtype == torch.float32 else CPU_FP16
    torch.testing.assert_close(actual, expected.to(actual.dtype), msg=lambda m: f"{name}: {m}", **tol)


def assert_within_torch_error(fast, torch_lowp, reference_fp32, name="output"):
    """err(fast) <= FACTOR * err(torch in the same dtype) + FLOOR[dtype], both against fp32."""
    fast_err = max_error(fast, reference_fp32)
    torch_err = max_error(torch_lowp, reference_fp32)
    bound = FACTOR * torch_err + FLOOR[fast.dtype]
    assert fast_err <= bound, f"{name}: err {fast_err:.3g} > {FACTOR} x torch err {torch_err:.3g} + {FLOOR[fast.dtype]:g}"
