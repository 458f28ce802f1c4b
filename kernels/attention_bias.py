"""Flash-style attention with a learnable additive bias: softmax(q k^T * scale + bias) v.

Semantics and signature of ``simmim_fast.reference.attention``; q, k, v (B, H, N, d) with any
strides, bias (H, N, N) shared over the batch (the ViT's relative position bias) or None.

Forward: online softmax over key blocks; the (B, H, N, N) logits are never stored, only the
log-sum-exp (B, H, N) in fp32. Logits stay in natural units and only the shifted difference is
scaled by log2(e) for exp2: with bias entries of +-100, folding log2(e) into the logits would
round values near 144 instead of 100 and double the forward's error.

Backward, in two kernels that own every value they write (deterministic, no atomics, no
read-modify-write of global memory):

- ``_attention_bwd_dq_dbias_kernel``, one program per (query block, head, key chunk, batch
  group): the key chunk is a single tile (all N keys when N <= 256 at d <= 64 in 16-bit, the
  ViT case), so dq needs no sum over key blocks, and the program's (BLOCK_M, KEY_CHUNK) bias
  gradient is summed over its batches in registers. Each batch group writes its own fp32
  partial, then one ``sum`` over the groups (a fixed-order reduction) gives dBias; several key
  chunks likewise give per-chunk dq partials summed once. (A per-(key block, head) program
  looping over the whole batch would own dBias outright, but only H * N / BLOCK_N programs: 48
  for ViT-B, a third of an H100.) It also computes delta = rowsum(dO * O) for the second kernel.
- ``_attention_bwd_dkdv_kernel``, one program per (key block, batch, head), loops over the
  query blocks as in FlashAttention-2.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._attention_operands import attention_operands

LOG2E = tl.constexpr(1.4426950408889634)  # kernels see globals only as constexpr
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Bias, Out, Lse,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bias_h, stride_bias_m, stride_bias_n,
    B, H, N, HEAD_DIM, sm_scale,
    HAS_BIAS: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_DIM

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k_t = tl.load(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                      mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * sm_scale
        if HAS_BIAS:
            bias = tl.load(Bias + h * stride_bias_h + offs_m[:, None] * stride_bias_m + offs_n[None, :] * stride_bias_n,
                           mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            s += bias.to(tl.float32)
        # Every block holds a real key, so the running max is finite from the first block on.
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2((m_i - m_new) * LOG2E)
        p = tl.exp2((s - m_new[:, None]) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    rows = (b * H + h) * N + offs_m  # Out, Lse: contiguous (B, H, N[, d])
    tl.store(Out + rows[:, None] * HEAD_DIM + offs_d[None, :], (acc / l_i[:, None]).to(Out.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(Lse + rows, m_i + tl.log(l_i), mask=mask_m)


@triton.jit
def _attention_bwd_dq_dbias_kernel(
    Q, K, V, Bias, Out, DOut, Lse, Delta, DQ, DBiasPartial,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_bias_h, stride_bias_m, stride_bias_n,
    stride_dq_chunk, batches_per_program,
    B, H, N, HEAD_DIM, sm_scale,
    HAS_BIAS: tl.constexpr, COMPUTE_DBIAS: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KEY_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
):
    h = (tl.program_id(1) % H).to(tl.int64)
    chunk = tl.program_id(1) // H
    group = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = chunk * KEY_CHUNK + tl.arange(0, KEY_CHUNK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_m = offs_m < N
    mask_n = offs_n < N
    mask_d = offs_d < HEAD_DIM
    mask_md = mask_m[:, None] & mask_d[None, :]
    mask_nd = mask_n[:, None] & mask_d[None, :]
    mask_mn = mask_m[:, None] & mask_n[None, :]

    # The same tile for every batch, loaded once: the bias, and -inf outside the N x N logits.
    logit_offset = tl.where(mask_mn, 0.0, float("-inf"))
    if HAS_BIAS:
        logit_offset += tl.load(Bias + h * stride_bias_h + offs_m[:, None] * stride_bias_m
                                + offs_n[None, :] * stride_bias_n, mask=mask_mn, other=0.0).to(tl.float32)
    dbias = tl.zeros([BLOCK_M, KEY_CHUNK], tl.float32)
    b_start = group.to(tl.int64) * batches_per_program  # int64 loop index: no offset overflow
    b_end = tl.minimum(b_start + batches_per_program, B)
    for b in range(b_start, b_end):
        rows = (b * H + h) * N + offs_m  # Out, Lse, Delta, DQ: contiguous (B, H, N[, d])
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=mask_md, other=0.0)
        do = tl.load(DOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don
                     + offs_d[None, :] * stride_dod, mask=mask_md, other=0.0)
        o = tl.load(Out + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_md, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(Delta + rows, delta, mask=mask_m & (chunk == 0))
        lse = tl.load(Lse + rows, mask=mask_m, other=0.0)
        k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=mask_nd, other=0.0)
        v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=mask_nd, other=0.0)

        # bias - lse first: near-equal values subtract exactly, so logits of +-100 lose no digits.
        p = tl.exp2((tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale
                     + (logit_offset - lse[:, None])) * LOG2E)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])  # d(loss)/d(logits) = d(loss)/d(bias) for this batch
        if COMPUTE_DBIAS:
            dbias += ds
        dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION) * sm_scale
        tl.store(DQ + chunk * stride_dq_chunk + rows[:, None] * HEAD_DIM + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=mask_md)

    if COMPUTE_DBIAS:
        bias_rows = (group * H + h) * N + offs_m  # contiguous (groups, H, N, N)
        tl.store(DBiasPartial + bias_rows[:, None] * N + offs_n[None, :], dbias, mask=mask_mn)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, Bias, DOut, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_bias_h, stride_bias_m, stride_bias_n,
    B, H, N, HEAD_DIM, sm_scale,
    HAS_BIAS: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_n = offs_n < N
    mask_d = offs_d < HEAD_DIM
    mask_nd = mask_n[:, None] & mask_d[None, :]

    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=mask_nd, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=mask_nd, other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DOut + b * stride_dob + h * stride_doh
    row_base = (b * H + h) * N  # Lse, Delta, DK, DV: contiguous (B, H, N[, d])
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    # Keys x queries orientation: dv = P^T dO and dk = dS^T q become plain dots of the transposed tiles.
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=mask_md, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=mask_md, other=0.0)
        lse = tl.load(Lse + row_base + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(Delta + row_base + offs_m, mask=mask_m, other=0.0)

        mask_nm = mask_n[:, None] & mask_m[None, :]
        shift_t = -lse[None, :]
        if HAS_BIAS:  # bias - lse first, as in the dq kernel
            shift_t = tl.load(Bias + h * stride_bias_h + offs_m[None, :] * stride_bias_m
                              + offs_n[:, None] * stride_bias_n, mask=mask_nm, other=0.0).to(tl.float32) + shift_t
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * sm_scale + shift_t
        p_t = tl.exp2(tl.where(mask_nm, s_t, float("-inf")) * LOG2E)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    out_offsets = (row_base + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_offsets, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + out_offsets, dv.to(DV.dtype.element_ty), mask=mask_nd)


def _tuned(kernel, configs, fp32_blocks, key, fits_registers=None):
    """Autotuned on CUDA; the interpreter has no timer, so there the launcher passes one small config.

    Exact fp32 dots run on the FMA units with their operands in registers: only the smallest tiles
    (``fp32_blocks``, 8 warps) are kept for fp32 inputs, which also skips the other configs' long
    compiles. ``fits_registers(config, kwargs)`` drops 16-bit configs whose tiles would spill at
    this launch's shapes (their spills, read from sm_90 cubins, are checked in
    tests/test_kernel_compile.py); the last config is kept if none fits.
    """
    if _INTERPRET:
        return kernel

    def prune(configs, named_args, **kwargs):
        if named_args["Q"].element_size() == 4:
            return [c for c in configs if c.num_warps == 8 and all(c.kwargs[k] == v for k, v in fp32_blocks.items())]
        if fits_registers is None:
            return configs
        return [c for c in configs if fits_registers(c, kwargs)] or configs[-1:]

    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)


def _dq_dbias_fits_registers(config, kwargs) -> bool:
    """The program's fp32 tiles, per thread: two (BLOCK_M, KEY_CHUNK) (the bias tile and the dBias
    accumulator; the per-batch logits are transient) and the (BLOCK_M, d) dq. At most 40 compile
    without spilling on sm_90 at the ViT-B shape; 16 rows on 8 warps fit every shape we launch."""
    block_m = config.kwargs["BLOCK_M"]
    values = 2 * block_m * kwargs["KEY_CHUNK"] + block_m * kwargs["HEAD_DIM_PAD"]
    return values <= 40 * 32 * config.num_warps


# Config spaces trimmed with sm_90 ptxas register/spill counts (tests/test_kernel_compile.py):
# 128-row forwards and 128-key dk/dv blocks on 4 warps spill; the tuner picks among the rest.
_TUNING_KEY = ["B", "H", "N", "HEAD_DIM_PAD", "HAS_BIAS", "DOT_PRECISION"]
_fwd = _tuned(_attention_fwd_kernel, [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm in (64, 128) for bn in (32, 64) for w in (4, 8) for s in (2, 3) if not (bm == 128 and w == 4)
], {"BLOCK_M": 64, "BLOCK_N": 32}, _TUNING_KEY)
_bwd_dq_dbias = _tuned(_attention_bwd_dq_dbias_kernel, [
    triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
    for bm in (16, 32, 64) for w in (4, 8) for s in (1, 2)
], {"BLOCK_M": 16}, _TUNING_KEY + ["COMPUTE_DBIAS", "KEY_CHUNK"], _dq_dbias_fits_registers)
_bwd_dkdv = _tuned(_attention_bwd_dkdv_kernel, [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm in (32, 64) for bn in (32, 64, 128) for w in (4, 8) for s in (1, 2) if not (bn == 128 and w == 4)
], {"BLOCK_M": 32, "BLOCK_N": 32}, _TUNING_KEY)
_INTERPRETER_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64}


def _blocks(*names):
    return {name: _INTERPRETER_BLOCKS[name] for name in names} if _INTERPRET else {}


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting (exact by default); tf32 is the fast path for fp32 only.
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _head_dim_pad(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.arange needs a power of two, tl.dot at least 16


def _key_chunk(tokens: int, head_dim_pad: int, element_size: int) -> int:
    """Keys per dq/dbias tile: all of them when they fit (one chunk), in a 32 KiB K (and V) tile."""
    cap = 64 if _INTERPRET else min(256, 32768 // (head_dim_pad * element_size))  # interpreter: its block width
    return min(max(16, triton.next_power_of_2(tokens)), cap)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _batches_per_program(batch: int, programs_per_batch: int, device: torch.device) -> int:
    """Batch group size of the dq/dbias kernel: enough programs to fill the GPU, few fp32 partials."""
    if _INTERPRET:
        return 2  # several groups, the last one ragged, in tiny tests
    groups = max(1, min(batch, 8 * _sm_count(device.index) // programs_per_batch))
    return triton.cdiv(batch, groups)


def _bias_strides(bias: Optional[torch.Tensor]):
    return tuple(bias.stride()) if bias is not None else (0, 0, 0)


def _forward(q, k, v, bias, scale):
    batch, heads, tokens, head_dim = q.shape
    out = torch.empty((batch, heads, tokens, head_dim), device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, heads, tokens), device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(tokens, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _fwd[grid](
        q, k, v, bias if bias is not None else q, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *_bias_strides(bias),
        batch, heads, tokens, head_dim, scale,
        HAS_BIAS=bias is not None, HEAD_DIM_PAD=_head_dim_pad(head_dim),
        DOT_PRECISION=_dot_precision(q.dtype), **_blocks("BLOCK_M", "BLOCK_N"),
    )
    return out, lse


def _backward(q, k, v, bias, out, lse, dout, scale, compute_dbias):
    batch, heads, tokens, head_dim = q.shape
    head_dim_pad = _head_dim_pad(head_dim)
    key_chunk = _key_chunk(tokens, head_dim_pad, q.element_size())
    chunks = triton.cdiv(tokens, key_chunk)
    common = dict(HAS_BIAS=bias is not None, HEAD_DIM_PAD=head_dim_pad, DOT_PRECISION=_dot_precision(q.dtype))
    bias_arg = bias if bias is not None else q
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *_bias_strides(bias))

    # One chunk: dq is written directly; several: fp32 partials per chunk, summed below.
    dq_buffer = torch.empty((chunks, batch, heads, tokens, head_dim), device=q.device,
                            dtype=q.dtype if chunks == 1 else torch.float32)
    delta = torch.empty((batch, heads, tokens), device=q.device, dtype=torch.float32)
    # Programs per batch at a nominal BLOCK_M of 32 (the tuned one may differ; the group count may not).
    batches_per_program = _batches_per_program(batch, heads * chunks * triton.cdiv(tokens, 32), q.device)
    groups = triton.cdiv(batch, batches_per_program)
    dbias_partial = (torch.empty((groups, heads, tokens, tokens), device=q.device, dtype=torch.float32)
                     if compute_dbias else delta)
    grid = lambda meta: (triton.cdiv(tokens, meta["BLOCK_M"]), heads * chunks, groups)  # noqa: E731
    _bwd_dq_dbias[grid](
        q, k, v, bias_arg, out, dout, lse, delta, dq_buffer, dbias_partial, *strides,
        dq_buffer.stride(0), batches_per_program,
        batch, heads, tokens, head_dim, scale,
        COMPUTE_DBIAS=compute_dbias, KEY_CHUNK=key_chunk, **common, **_blocks("BLOCK_M"),
    )

    dk = torch.empty((batch, heads, tokens, head_dim), device=q.device, dtype=k.dtype)
    dv = torch.empty((batch, heads, tokens, head_dim), device=q.device, dtype=v.dtype)
    grid = lambda meta: (triton.cdiv(tokens, meta["BLOCK_N"]), batch * heads)  # noqa: E731
    _bwd_dkdv[grid](
        q, k, v, bias_arg, dout, lse, delta, dk, dv, *strides,
        batch, heads, tokens, head_dim, scale,
        **common, **_blocks("BLOCK_M", "BLOCK_N"),
    )

    # torch's sum is a fixed-order reduction: the partials' order never changes the result's bits.
    dq = dq_buffer[0] if chunks == 1 else dq_buffer.sum(0).to(q.dtype)
    dbias = dbias_partial.sum(0).to(bias.dtype) if compute_dbias else None
    return dq, dk, dv, dbias


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        out, lse = _forward(q, k, v, bias, scale)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, out, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dq, dk, dv, dbias = _backward(q, k, v, bias, out, lse, dout, ctx.scale,
                                      compute_dbias=bias is not None and needs[3])
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, dbias, None)


# Dynamo does not trace into the kernels: the op runs eagerly between compiled graphs (a graph break,
# which costs the attention nothing), so torch.compile works on CUDA and under TRITON_INTERPRET=1 alike.
@torch.compiler.disable
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``simmim_fast.reference.attention`` (see there): softmax(q k^T * scale + bias) v, no dropout."""
    assert dropout_p == 0.0, "dropout is not fused; the dispatch sends dropout_p > 0 to the reference"
    q, k, v, scale = attention_operands(q, k, v, scale)
    return _AttentionFunction.apply(q, k, v, bias, scale)
