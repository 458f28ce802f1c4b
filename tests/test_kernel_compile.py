"""Every Triton kernel, compiled for the GPUs it is built for (sm_90 H100/H200, sm_80 A100) on this
CPU machine: the launchers run unchanged and each launch compiles with Triton's ptxas instead of
running (tests/compile_only.py). The interpreter lane checks the numbers; this checks what only
the GPU compiler sees:

- every op's forward and backward kernels lower and assemble, at the recipes' shapes in bf16,
  fp16 and fp32, and at the edges of what the dispatch sends to the attention kernels;
- each kernel has a config within the device's shared memory (the autotuner skips the others;
  a kernel with one config must fit);
- in 16-bit at the recipes' shapes, no config the launchers or the tuner's pruning can pick
  spills registers to local memory beyond a few bytes, and every tl.dot runs on tensor cores.
"""
import os
from collections import defaultdict

import pytest
import torch

from benchmarks.kernel_cases import all_cases, envelope_cases
from tests import compile_only

pytestmark = [pytest.mark.compile,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="compiles for the GPU; the interpreter runs no compiler")]

SPILL_BYTES_ALLOWED = 64  # per thread; ptxas spills a few bytes at 255 registers where it costs nothing
REAL_CASES = all_cases(smoke=False)
ENVELOPE_CASES = envelope_cases()


def _case_id(case):
    return f"{case.op}[{case.name}]"


def _by_kernel(kernels):
    variants = defaultdict(list)
    for kernel in kernels:
        variants[kernel.kernel].append(kernel)
    return variants


def _check_compiled(case, dtype, capability, max_spill_bytes=None, tensor_cores=False):
    kernels = compile_only.compile_case(case, dtype, capability)
    names = {kernel.kernel for kernel in kernels}
    assert any("_fwd" in name for name in names) and any("_bwd" in name for name in names), \
        f"{case.op}: compiled {sorted(names)}; expected forward and backward kernels"
    limit = compile_only.MAX_SHARED_BYTES[capability]
    for name, variants in _by_kernel(kernels).items():
        fitting = [kernel for kernel in variants if kernel.shared_bytes <= limit]
        assert fitting, (f"{name}: every config needs more shared memory than sm_{capability}'s {limit} B: "
                         f"{sorted(kernel.shared_bytes for kernel in variants)}")
        if tensor_cores:
            assert all(kernel.tensor_cores for kernel in variants if kernel.dots), f"{name}: tl.dot without MMA"
        if max_spill_bytes is not None:
            spilling = [kernel for kernel in fitting if kernel.spill_bytes > max_spill_bytes]
            assert not spilling, "\n".join(
                f"{kernel.kernel} ({kernel.constants}, warps={kernel.num_warps}, stages={kernel.num_stages}) "
                f"spills {kernel.spill_bytes} B/thread" for kernel in spilling)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", REAL_CASES, ids=_case_id)
def test_recipe_shapes_compile_for_sm90(case, dtype):
    # fp32 keeps exact products on the FMA units, whose operands live in registers: some of its
    # tiles spill, which costs that (slower anyway) path speed, not correctness.
    low_precision = dtype != torch.float32
    _check_compiled(case, dtype, 90, max_spill_bytes=SPILL_BYTES_ALLOWED if low_precision else None,
                    tensor_cores=low_precision)


@pytest.mark.parametrize("case", REAL_CASES, ids=_case_id)
def test_recipe_shapes_compile_for_sm80(case):
    _check_compiled(case, torch.bfloat16, 80, tensor_cores=True)


@pytest.mark.parametrize("case", ENVELOPE_CASES, ids=_case_id)
def test_attention_envelope_compiles_for_sm90(case):
    _check_compiled(case, torch.bfloat16, 90)


def test_compile_only_reads_resources():
    """The harness itself: a kernel that must spill does, one that must not does not, and the
    launch compiled without running (the output stays as allocated)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _scale_by_sum_kernel(src_ptr, dst_ptr, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        values = tl.load(src_ptr + offsets)
        tl.store(dst_ptr + offsets, values * tl.sum(values))  # every value stays live until the sum

    src, dst = torch.ones(1024), torch.zeros(1024)
    with compile_only.compile_only(90) as compiled:
        _scale_by_sum_kernel[(1,)](src, dst, BLOCK=1024)
        _scale_by_sum_kernel[(1,)](src, dst, BLOCK=16384, num_warps=1)  # 512 values per thread: local memory
    assert torch.equal(dst, torch.zeros(1024))
    small, huge = compiled
    assert small.kernel == "_scale_by_sum_kernel" and small.spill_bytes == 0 and 0 < small.registers <= 255
    assert not small.dots and not small.tensor_cores
    assert huge.spill_bytes > 0
