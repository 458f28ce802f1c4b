"""A static efficiency account of the attention kernels: what each launch of a training step would ask
of an H100, read from the compiled kernels and the launch arguments, with no GPU and nothing timed.

For every attention launch of a first training step (meta tensors, bf16 autocast, each kernel's
default config, compile only: tests/compile_only.py) at the four headline recipes:

- MMA FLOPs executed / useful: the products the kernel issues over its padded tiles (rows, keys and
  head dims rounded up to its blocks) over those of the unpadded op; ``exp`` the same ratio for the
  exponentials (the softmax work on padded entries);
- bytes / minimum: the bytes its loads and stores request (masked-off lanes move nothing; re-reads
  count every time, though many hit L2, so DRAM traffic is lower), over the op's minimum for that
  pass (benchmarks/kernel_cases.py: every input once, every output once; the backward's kernels
  each show their share of the one backward minimum);
- programs, resident CTAs per SM (sm_90: 65536 registers, allocated per warp in 256-register units,
  228 KiB shared memory with 1 KiB reserved per CTA, 64 warps, 32 CTAs) and waves on 132 SMs.

It is a model: it says where the tiles waste work and where the grid leaves SMs idle, not how fast
anything runs (benchmarks/gpu_check.sh measures that on a GPU). ``python -m tests.compile_only --account``
prints it.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from tests import compile_only

# The headline recipes and their per-GPU batch.
RECIPES = {
    "ViT-B 224 b128": ("vit-base-224", 128),
    "Swin-B 192 w6 b128": ("swin-base-192-w6", 128),
    "Swin-L 192 w12 b64": ("swin-large-192-w12", 64),
    "Swin V2-B 192 w12 b128": ("swinv2-base-192-w12", 128),
}
# sm_90 (H100 SXM) per-SM limits.
SM_COUNT = 132
REGISTERS_PER_SM = 65536
REGISTER_ALLOCATION_UNIT = 256  # registers, per warp
SHARED_BYTES_PER_SM = 233472
SHARED_BYTES_RESERVED_PER_CTA = 1024
WARPS_PER_SM = 64
CTAS_PER_SM = 32


def resident_ctas(registers: int, num_warps: int, shared_bytes: int) -> int:
    """CTAs of one kernel that fit on an sm_90 SM at once, by registers, shared memory and warps."""
    registers_per_warp = math.ceil(registers * 32 / REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    by_registers = REGISTERS_PER_SM // (registers_per_warp * num_warps)
    by_shared = SHARED_BYTES_PER_SM // (shared_bytes + SHARED_BYTES_RESERVED_PER_CTA)
    return min(by_registers, by_shared, WARPS_PER_SM // num_warps, CTAS_PER_SM)


def _padded(size: int, block: int, tail: Optional[int] = None) -> int:
    """Rows or keys a kernel computes for ``size``: full blocks, and the rest in one block of ``tail``
    (the forward's TAIL_M, TAIL_N), else of ``block``."""
    return size // block * block + (0 if size % block == 0 else tail or block)


@dataclass(frozen=True)
class Work:
    mma_executed: float
    mma_useful: float
    exp_executed: float
    exp_useful: float
    bytes_moved: float
    bytes_minimum: float  # of the op's pass (forward or backward) this kernel belongs to


def _attention_minimum(batch, heads, tokens, head_dim, element, bias_bytes, mask_bytes, backward, dbias):
    """benchmarks/kernel_cases.py's minimum of the attention op (forward or backward pass)."""
    qkv = batch * heads * tokens * head_dim * element
    if not backward:
        return 3 * qkv + bias_bytes + mask_bytes + qkv
    return 5 * qkv + batch * heads * tokens * 4 + bias_bytes + mask_bytes + 3 * qkv + (bias_bytes if dbias else 0)


def _additive_bytes(arguments, tokens) -> Tuple[int, int, int, int]:
    """(one (N, N) bias slice, one (N, N) window-mask slice, the whole bias, the whole mask) in bytes, 0 where
    the launch has none (the kernels get a stand-in tensor they never read)."""
    bias = arguments.get("Bias", arguments.get("bias_ptr"))
    mask = arguments.get("Mask", arguments.get("mask_ptr"))
    has_bias, has_mask = arguments.get("HAS_BIAS", True), arguments["HAS_MASK"]
    return (tokens * tokens * bias.element_size() if has_bias else 0,
            tokens * tokens * mask.element_size() if has_mask else 0,
            bias.numel() * bias.element_size() if has_bias else 0,
            mask.numel() * mask.element_size() if has_mask else 0)


def _flash(arguments, backward_kernel: Optional[str]) -> Work:
    """_attention_fwd_kernel, _attention_bwd_dq_kernel, _attention_bwd_dkdv_dbias_kernel."""
    q = arguments["Q"]
    batch, heads, tokens, head_dim = q.shape
    element = q.element_size()
    block_m, block_n, dim_pad = arguments["BLOCK_M"], arguments["BLOCK_N"], arguments["HEAD_DIM_PAD"]
    bias_slice, mask_slice, bias_minimum, mask_minimum = _additive_bytes(arguments, tokens)
    bh = batch * heads
    row = tokens * head_dim * element  # one (b, h) slice of q, k, v, o or a gradient
    padded_pairs = (_padded(tokens, block_m, arguments.get("TAIL_M"))
                    * _padded(tokens, block_n, arguments.get("TAIL_N")))
    dbias = bool(arguments.get("COMPUTE_DBIAS", False))
    # Per (batch, head): the additive terms once (each program reads its strip of them).
    additive = bias_slice + mask_slice
    if backward_kernel is None:  # forward: QK^T, PV per tile; q in, o and lse out; K, V per query block
        dots, moved = 2, bh * (2 * row + tokens * 4 + additive + math.ceil(tokens / block_m) * 2 * row)
    elif backward_kernel == "dq":  # QK^T, dO V^T, dS K per tile; q, dO, O, lse in, dq, delta out; K, V per query block
        dots = 3
        moved = bh * (4 * row + 2 * tokens * 4 + additive + math.ceil(tokens / block_m) * 2 * row)
    else:  # K Q^T, P^T dO, V dO^T, dS^T Q per tile; k, v in, dk, dv out; q, dO, lse, delta per key block
        dots = 4
        strip = 0
        if dbias:  # the fp32 dBias strips: every batch writes its group's, all but the group's first read it
            groups = math.ceil(batch / arguments["batches_per_group"])
            strip = heads * tokens * tokens * 4 * (2 * batch - groups)
        moved = bh * (4 * row + additive + math.ceil(tokens / block_n) * (2 * row + 2 * tokens * 4)) + strip
    useful_pairs = tokens * tokens
    minimum = _attention_minimum(batch, heads, tokens, head_dim, element, bias_minimum, mask_minimum,
                                 backward_kernel is not None, dbias)
    return Work(2.0 * dots * bh * padded_pairs * dim_pad, 2.0 * dots * bh * useful_pairs * head_dim,
                float(bh * padded_pairs), float(bh * useful_pairs), float(moved), float(minimum))


def _whole_window(arguments, backward: bool) -> Work:
    """_window_attention_fwd_kernel (QK^T, PV) and _window_attention_bwd_kernel (QK^T, dO V^T, dS K,
    dS^T Q, P^T dO) per window and head over (BLOCK_HEAD + BLOCK_TAIL)^2 logits: one block, or a head and a
    tail block of rows and keys (kernels/window_attention.py token_blocks)."""
    q = arguments["q_ptr"]
    windows, heads, tokens, head_dim = q.shape
    element = q.element_size()
    block_t, block_d = arguments["BLOCK_HEAD"] + arguments["BLOCK_TAIL"], arguments["BLOCK_D"]
    bias_slice, mask_slice, bias_minimum, mask_minimum = _additive_bytes(arguments, tokens)
    programs = math.prod(arguments["grid"])
    row = tokens * head_dim * element
    wh = windows * heads
    dots = 5 if backward else 2
    stats = 2 * tokens * 4
    if backward:  # q, k, v, dO, row stats in; dq, dk, dv out; one fp32 dBias partial per program
        moved = wh * (7 * row + stats) + programs * (bias_slice + mask_slice + tokens * tokens * 4)
    else:
        moved = wh * (4 * row + stats) + programs * (bias_slice + mask_slice)
    minimum = _attention_minimum(windows, heads, tokens, head_dim, element, bias_minimum, mask_minimum, backward,
                                 True)
    return Work(2.0 * dots * wh * block_t * block_t * block_d, 2.0 * dots * wh * tokens * tokens * head_dim,
                float(wh * block_t * block_t), float(wh * tokens * tokens), float(moved), float(minimum))


MODELS: Dict[str, Callable[[dict], Work]] = {
    "_attention_fwd_kernel": lambda arguments: _flash(arguments, None),
    "_attention_bwd_dq_kernel": lambda arguments: _flash(arguments, "dq"),
    "_attention_bwd_dkdv_dbias_kernel": lambda arguments: _flash(arguments, "dkdv"),
    "_window_attention_fwd_kernel": lambda arguments: _whole_window(arguments, backward=False),
    "_window_attention_bwd_kernel": lambda arguments: _whole_window(arguments, backward=True),
}


@dataclass(frozen=True)
class AccountRow:
    recipe: str
    kernel: str
    shape: str  # (batch or windows, heads, tokens, head dim) of q
    additive: str  # the additive terms: bias, shift mask
    launches: int  # identical launches in one step (layers)
    num_warps: int
    num_stages: int
    registers: int
    shared_bytes: int
    spill_bytes: int
    programs: int
    ctas_per_sm: int
    work: Work

    @property
    def waves(self) -> float:
        return self.programs / (SM_COUNT * self.ctas_per_sm)


def account(recipe: str) -> List[AccountRow]:
    """The rows of one recipe: every distinct attention launch of its first training step."""
    preset, batch = RECIPES[recipe]
    with compile_only.compile_only(90, every_config=False) as compiled:
        compile_only.training_step_on_meta(preset, batch)
    resources = {}
    rows: Counter = Counter()
    for launch in compiled.launches:
        if launch.kernel not in MODELS or launch.compiled is None:
            continue
        if id(launch.compiled) not in resources:
            resources[id(launch.compiled)] = compile_only._resources(launch.compiled)
        used = resources[id(launch.compiled)]
        arguments = dict(launch.arguments, grid=launch.grid)
        q = arguments.get("Q", arguments.get("q_ptr"))
        programs = math.prod(launch.grid)
        additive = "+".join(name for name, present in (("bias", arguments.get("HAS_BIAS", True)),
                                                       ("mask", arguments["HAS_MASK"])) if present)
        row = AccountRow(recipe, launch.kernel, "x".join(map(str, q.shape)), additive or "-", 0, used.num_warps,
                         used.num_stages,
                         used.registers, used.shared_bytes, used.spill_bytes, programs,
                         resident_ctas(used.registers, used.num_warps, used.shared_bytes),
                         MODELS[launch.kernel](arguments))
        rows[row] += 1
    order = list(MODELS)
    return sorted((AccountRow(**{**vars(row), "launches": count}) for row, count in rows.items()),
                  key=lambda row: (order.index(row.kernel), -int(row.shape.split("x")[0]), row.additive))


def format_table(rows: List[AccountRow]) -> str:
    """A markdown table of the rows."""
    lines = ["| recipe | kernel | q shape | additive | launches | warps/stages | regs | smem KiB | spill B | MMA exec/useful "
             "| exp exec/useful | bytes/min | programs | CTAs/SM | waves |",
             "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        work = row.work
        lines.append(f"| {row.recipe} | {row.kernel.strip('_').replace('_kernel', '')} | {row.shape} | {row.additive} "
                     f"| {row.launches} "
                     f"| {row.num_warps}/{row.num_stages} | {row.registers} | {row.shared_bytes / 1024:.1f} "
                     f"| {row.spill_bytes} | {work.mma_executed / work.mma_useful:.2f} "
                     f"| {work.exp_executed / work.exp_useful:.2f} | {work.bytes_moved / work.bytes_minimum:.2f} "
                     f"| {row.programs} | {row.ctas_per_sm} | {row.waves:.1f} |")
    return "\n".join(lines)
