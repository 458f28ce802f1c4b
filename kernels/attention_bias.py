"""Flash-style attention with additive terms: softmax(q k^T * scale + bias [+ window mask]) v.

The op ``simmim_fast_triton::attention`` has the semantics of ``simmim_fast.reference.attention``:
q, k, v (B, H, N, d) with any strides, bias (H, N, N) shared over the batch (the ViT's relative
position bias) or None. The same kernels, with a (nW, N, N) mask added to batch entry b's logits
as mask[b % nW], run Swin's large windows (kernels/window_attention.py, T > 64).

Forward: online softmax over 64-key blocks; the (B, H, N, N) logits are never stored, only the
log-sum-exp (B, H, N) in fp32. The forward and dq kernels run a ragged N's last N % 64 rows and
keys as one peeled tail block of 16, 32 or 64 (the least power of two from 16 that holds them):
N = 197 is padded to 208 rows and keys, not 256, and 144 is not padded; full blocks need no masks.
The dk/dv kernel peels its key tail alike and loops over whole query blocks of 16 (its tuner's default;
197: 208 keys x 208 queries) or 32. Tail dots below 64 rows run on mma.sync instead of wgmma.

The output is written as (B, N, H, d) and returned as a (B, H, N, d) view, so the caller's
transpose(1, 2).reshape(B, N, H * d) is free. With a bias or mask the logits
stay in natural units and only the shifted difference is scaled by log2(e) for exp2: folding
log2(e) into the logits would multiply each bias entry by it (a second rounding) and round values
near 144 instead of 100. With neither, nothing is added to q k^T, so scale * log2(e) folds into one
multiply at no cost in precision.

Backward, FlashAttention-2's split, in two kernels:

- ``_attention_bwd_dq_kernel``, one program per (batch, head, query block): delta = rowsum(dO * O),
  then a loop over key blocks accumulating dq; no batch reduction, so it needs no workspace.
- ``_attention_bwd_dkdv_dbias_kernel``, one program per (batch group, head, key block): for each
  batch of its group, a loop over query blocks accumulating dk and dv, and the dS^T tiles, which
  are the bias gradient of this batch, added into the group's fp32 partial of dBias. The program
  owns its partial's (N x 64) column strip: it writes it at the group's first batch and adds to
  it in batch order after, with a barrier between batches so every thread sees the others' writes.
  The partials are summed over groups afterwards in a fixed order: no atomics, the same bits in
  every run. The strip (N * 64 * 4 B, 50 KiB at N = 197) is re-read once per batch from L2.

dq, dk, dv are written into one (B, N, 3, H, d) buffer, the layout of the qkv projection that
ViT and Swin split into q, k, v, and returned as views of it (see simmim_fast/models/layers.py).
dBias's partials are capped at twice q's size (one batch group when even that is larger); without a bias
gradient there are no batch groups: one program per (batch, head, key block). Every launch
runs on q's device; B * H (with the query or key blocks) is the 1-D grid's only axis,
and every offset that grows with the batch is int64.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._attention_operands import attention_operands, dot_precision, packed_qkv_gradient
from ._autotune import autotune, heuristics
from ._eager import custom_op, eager_or_op, eager_or_op_with_autograd
from ._launch import cdiv, next_power_of_2, on_device_of

LOG2E = tl.constexpr(1.4426950408889634)  # kernels see globals only as constexpr
LN2 = tl.constexpr(0.6931471805599453)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The forward's and dq's tiles are fixed: BLOCK_N sets the order of their sums over keys (the tails, _tail,
# follow from N alone); 64 rows is one warpgroup's wgmma tile on sm_90. The dk/dv/dBias kernel's key
# block is 64 too, and its query block BLOCK_M (the order of dk's and dv's sums over queries) is a config
# of its tuner: 16 by default, whose (keys x queries) fp32 tiles (P^T, dP^T, dS^T, the additive terms,
# the dBias strip) are small enough for 4 warps and 2 stages without a spill (_DKDV_CONFIGS). Ranks
# stay bitwise equal because the choice is shared (kernels/_autotune.py).
BLOCK = 64
# Programs the dk/dv/dBias launch aims at: a constant, not the SM count, so that the batch groups,
# and with them dBias's summation order, are the same on every GPU.
TARGET_PROGRAMS = 1024


@triton.jit
def _load_tile(ptrs, row_ok, col_ok, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """A 2-D tile, masked (zeros) only on the sides that can be ragged."""
    if EVEN_ROWS:
        if EVEN_COLS:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        if EVEN_COLS:
            tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    return tile


@triton.jit
def _store_tile(ptrs, values, row_ok, col_ok, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    if EVEN_ROWS:
        if EVEN_COLS:
            tl.store(ptrs, values)
        else:
            tl.store(ptrs, values, mask=col_ok[None, :])
    else:
        if EVEN_COLS:
            tl.store(ptrs, values, mask=row_ok[:, None])
        else:
            tl.store(ptrs, values, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _additive_tile(Bias, Mask, h, window, rows, cols, row_ok, col_ok,
                   stride_bias_h, stride_bias_r, stride_bias_c, stride_mask_w, stride_mask_r, stride_mask_c,
                   HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """bias[h] + mask[window] at (rows, cols) in fp32; the keys x queries orientation passes the
    key indices as rows with the strides swapped. Only called with HAS_BIAS or HAS_MASK."""
    if HAS_BIAS:
        additive = _load_tile(Bias + h * stride_bias_h + rows[:, None] * stride_bias_r + cols[None, :] * stride_bias_c,
                              row_ok, col_ok, EVEN_ROWS, EVEN_COLS).to(tl.float32)
        if HAS_MASK:
            additive += _load_tile(Mask + window * stride_mask_w + rows[:, None] * stride_mask_r
                                   + cols[None, :] * stride_mask_c, row_ok, col_ok, EVEN_ROWS, EVEN_COLS).to(tl.float32)
    else:
        additive = _load_tile(Mask + window * stride_mask_w + rows[:, None] * stride_mask_r
                               + cols[None, :] * stride_mask_c, row_ok, col_ok, EVEN_ROWS, EVEN_COLS).to(tl.float32)
    return additive


@triton.jit
def _recomputed_probs(qk, additive, lse, sm_scale, HAS_ADDITIVE: tl.constexpr):
    """exp(qk * scale + additive - lse), the forward's probabilities; ``lse`` comes broadcastable
    to qk's shape. additive - lse first: near-equal values subtract exactly, so logits of +-100
    lose no digits. Without an additive term scale * log2(e) is one multiply."""
    if HAS_ADDITIVE:
        return tl.exp2((qk * sm_scale + (additive - lse)) * LOG2E)
    else:
        return tl.exp2(qk * (sm_scale * LOG2E) - lse * LOG2E)


@triton.jit
def _query_block_of_program(H, N, num_windows, BLOCK_M: tl.constexpr):
    """(batch * H + head, batch, head, window, first query row) of this program; the 1-D grid runs
    over B * H * query blocks, those of one (batch, head) adjacent to share K, V in L2."""
    m_blocks = tl.cdiv(N, BLOCK_M)
    batch_head = (tl.program_id(0) // m_blocks).to(tl.int64)
    b = batch_head // H
    return batch_head, b, batch_head % H, b % num_windows, (tl.program_id(0) % m_blocks) * BLOCK_M


@triton.jit
def _fwd_key_block(acc, m_i, l_i, q, k_base, v_base, Bias, Mask, h, window, offs_m, m_ok, offs_d, d_ok, start_n, N,
                   stride_kn, stride_kd, stride_vn, stride_vd,
                   stride_bias_h, stride_bias_m, stride_bias_n, stride_mask_w, stride_mask_m, stride_mask_n, qk_scale,
                   HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_N: tl.constexpr, EVEN_ROWS: tl.constexpr, EVEN_KEYS: tl.constexpr,
                   EVEN_HEADDIM: tl.constexpr):
    """One online-softmax step over the BLOCK_N keys from start_n: (acc, m_i, l_i) updated."""
    HAS_ADDITIVE: tl.constexpr = HAS_BIAS or HAS_MASK
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k = _load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, n_ok, d_ok,
                   EVEN_KEYS, EVEN_HEADDIM)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if HAS_ADDITIVE:
        s += _additive_tile(Bias, Mask, h, window, offs_m, offs_n, m_ok, n_ok,
                            stride_bias_h, stride_bias_m, stride_bias_n, stride_mask_w, stride_mask_m, stride_mask_n,
                            HAS_BIAS, HAS_MASK, EVEN_ROWS, EVEN_KEYS)
    if not EVEN_KEYS:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # FlashAttention's guard: a row whose keys so far are all -inf (a -inf bias or mask over the
    # first key block) has m_new = -inf, and -inf - (-inf) is NaN; shifting by 0 gives p = 0.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    if HAS_ADDITIVE:
        alpha = tl.exp2((m_i - m_shift) * LOG2E)
        p = tl.exp2((s - m_shift[:, None]) * LOG2E)
    else:
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, n_ok, d_ok,
                   EVEN_KEYS, EVEN_HEADDIM)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_query_rows(Q, K, V, Bias, Mask, Out, Lse, batch_head, b, h, window, start_m,
                    stride_qb, stride_qh, stride_qn, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_ob, stride_oh, stride_on, stride_od,
                    stride_bias_h, stride_bias_m, stride_bias_n,
                    stride_mask_w, stride_mask_m, stride_mask_n,
                    N, HEAD_DIM, sm_scale,
                    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
                    EVEN_ROWS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_HEADDIM: tl.constexpr):
    """The forward of the ROWS query rows from start_m: full key blocks unmasked, then the last
    N % BLOCK_N keys (if any) in one masked TAIL_N-key block, so only TAIL_N - N % BLOCK_N are padding."""
    HAS_ADDITIVE: tl.constexpr = HAS_BIAS or HAS_MASK
    offs_m = start_m + tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    m_ok = offs_m < N
    d_ok = offs_d < HEAD_DIM
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                   m_ok, d_ok, EVEN_ROWS, EVEN_HEADDIM)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    # Logits in natural units with an additive term, else in log2 units (see the module docstring).
    qk_scale = sm_scale if HAS_ADDITIVE else sm_scale * LOG2E
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM_PAD], tl.float32)
    for start_n in range(0, N - N % BLOCK_N, BLOCK_N):
        acc, m_i, l_i = _fwd_key_block(
            acc, m_i, l_i, q, k_base, v_base, Bias, Mask, h, window, offs_m, m_ok, offs_d, d_ok,
            tl.multiple_of(start_n, BLOCK_N), N, stride_kn, stride_kd, stride_vn, stride_vd,
            stride_bias_h, stride_bias_m, stride_bias_n, stride_mask_w, stride_mask_m, stride_mask_n, qk_scale,
            HAS_BIAS, HAS_MASK, DOT_PRECISION, BLOCK_N, EVEN_ROWS, True, EVEN_HEADDIM)
    if not EVEN_N:
        acc, m_i, l_i = _fwd_key_block(
            acc, m_i, l_i, q, k_base, v_base, Bias, Mask, h, window, offs_m, m_ok, offs_d, d_ok,
            N - N % BLOCK_N, N, stride_kn, stride_kd, stride_vn, stride_vd,
            stride_bias_h, stride_bias_m, stride_bias_n, stride_mask_w, stride_mask_m, stride_mask_n, qk_scale,
            HAS_BIAS, HAS_MASK, DOT_PRECISION, TAIL_N, EVEN_ROWS, False, EVEN_HEADDIM)

    out = (acc / l_i[:, None]).to(Out.dtype.element_ty)
    _store_tile(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                out, m_ok, d_ok, EVEN_ROWS, EVEN_HEADDIM)
    lse = m_i + tl.log(l_i) if HAS_ADDITIVE else m_i * LN2 + tl.log(l_i)
    lse_ptrs = Lse + batch_head * N + offs_m  # contiguous (B, H, N)
    if EVEN_ROWS:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=m_ok)


# Integer arguments that vary with the batch or the Swin stage are not specialised (divisibility, == 1): they
# bound loops and index windows, and a new batch size (or a stage with 16 heads) must not compile the kernels again.
@triton.jit(do_not_specialize=["H", "num_windows"])
def _attention_fwd_kernel(
    Q, K, V, Bias, Mask, Out, Lse,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_bias_h, stride_bias_m, stride_bias_n,
    stride_mask_w, stride_mask_m, stride_mask_n,
    H, N, HEAD_DIM, num_windows, sm_scale,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_HEADDIM: tl.constexpr,
):
    batch_head, b, h, window, start_m = _query_block_of_program(H, N, num_windows, BLOCK_M)
    # Full query blocks run unmasked; the last N % BLOCK_M rows (if any) run as one masked TAIL_M-row
    # block (mma.sync below 64 rows), so a ragged N is padded to TAIL_M, not BLOCK_M, in both dims.
    if EVEN_M:
        tail = False
    else:
        tail = start_m + BLOCK_M > N
    if tail:
        _fwd_query_rows(Q, K, V, Bias, Mask, Out, Lse, batch_head, b, h, window, start_m,
                        stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_on, stride_od,
                        stride_bias_h, stride_bias_m, stride_bias_n, stride_mask_w, stride_mask_m, stride_mask_n,
                        N, HEAD_DIM, sm_scale, HAS_BIAS, HAS_MASK, HEAD_DIM_PAD, DOT_PRECISION,
                        TAIL_M, BLOCK_N, TAIL_N, False, EVEN_N, EVEN_HEADDIM)
    else:
        _fwd_query_rows(Q, K, V, Bias, Mask, Out, Lse, batch_head, b, h, window, start_m,
                        stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_on, stride_od,
                        stride_bias_h, stride_bias_m, stride_bias_n, stride_mask_w, stride_mask_m, stride_mask_n,
                        N, HEAD_DIM, sm_scale, HAS_BIAS, HAS_MASK, HEAD_DIM_PAD, DOT_PRECISION,
                        BLOCK_M, BLOCK_N, TAIL_N, True, EVEN_N, EVEN_HEADDIM)


@triton.jit
def _dq_key_block(dq, q, do, lse, delta, k_base, v_base, Bias, Mask, h, window, offs_m, m_ok, offs_d, d_ok,
                  start_n, N, stride_kn, stride_kd, stride_vn, stride_vd,
                  stride_bias_h, stride_bias_m, stride_bias_n, stride_mask_w, stride_mask_m, stride_mask_n, sm_scale,
                  HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr, EVEN_ROWS: tl.constexpr, EVEN_KEYS: tl.constexpr,
                  EVEN_HEADDIM: tl.constexpr):
    """dq accumulated over the BLOCK_N keys from start_n (unscaled)."""
    HAS_ADDITIVE: tl.constexpr = HAS_BIAS or HAS_MASK
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k = _load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, n_ok, d_ok,
                   EVEN_KEYS, EVEN_HEADDIM)
    v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, n_ok, d_ok,
                   EVEN_KEYS, EVEN_HEADDIM)
    additive = 0.0
    if HAS_ADDITIVE:
        additive = _additive_tile(Bias, Mask, h, window, offs_m, offs_n, m_ok, n_ok,
                                  stride_bias_h, stride_bias_m, stride_bias_n,
                                  stride_mask_w, stride_mask_m, stride_mask_n, HAS_BIAS, HAS_MASK, EVEN_ROWS, EVEN_KEYS)
    p = _recomputed_probs(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), additive, lse[:, None],
                          sm_scale, HAS_ADDITIVE)
    if not EVEN_KEYS:  # exp(0 - lse) of a padded key may overflow; its k row is 0, but inf * 0 is NaN
        p = tl.where(n_ok[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)


@triton.jit
def _dq_query_rows(Q, K, V, Bias, Mask, Out, DOut, Lse, Delta, DQ, batch_head, b, h, window, start_m,
                   stride_qb, stride_qh, stride_qn, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_ob, stride_oh, stride_on, stride_od,
                   stride_dob, stride_doh, stride_don, stride_dod,
                   stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                   stride_bias_h, stride_bias_m, stride_bias_n,
                   stride_mask_w, stride_mask_m, stride_mask_n,
                   N, HEAD_DIM, sm_scale,
                   HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
                   EVEN_ROWS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_HEADDIM: tl.constexpr):
    """delta and dq of the ROWS query rows from start_m; keys as in _fwd_query_rows (a TAIL_N-key tail)."""
    offs_m = start_m + tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    m_ok = offs_m < N
    d_ok = offs_d < HEAD_DIM

    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                   m_ok, d_ok, EVEN_ROWS, EVEN_HEADDIM)
    do = _load_tile(DOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don
                    + offs_d[None, :] * stride_dod, m_ok, d_ok, EVEN_ROWS, EVEN_HEADDIM)
    o = _load_tile(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                   m_ok, d_ok, EVEN_ROWS, EVEN_HEADDIM)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row_ptrs = batch_head * N + offs_m  # Lse, Delta: contiguous (B, H, N)
    if EVEN_ROWS:
        tl.store(Delta + row_ptrs, delta)
        lse = tl.load(Lse + row_ptrs)
    else:
        tl.store(Delta + row_ptrs, delta, mask=m_ok)
        lse = tl.load(Lse + row_ptrs, mask=m_ok, other=0.0)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dq = tl.zeros([ROWS, HEAD_DIM_PAD], tl.float32)
    for start_n in range(0, N - N % BLOCK_N, BLOCK_N):
        dq = _dq_key_block(dq, q, do, lse, delta, k_base, v_base, Bias, Mask, h, window, offs_m, m_ok, offs_d, d_ok,
                           tl.multiple_of(start_n, BLOCK_N), N, stride_kn, stride_kd, stride_vn, stride_vd,
                           stride_bias_h, stride_bias_m, stride_bias_n, stride_mask_w, stride_mask_m, stride_mask_n,
                           sm_scale, HAS_BIAS, HAS_MASK, DOT_PRECISION, BLOCK_N, EVEN_ROWS, True, EVEN_HEADDIM)
    if not EVEN_N:
        dq = _dq_key_block(dq, q, do, lse, delta, k_base, v_base, Bias, Mask, h, window, offs_m, m_ok, offs_d, d_ok,
                           N - N % BLOCK_N, N, stride_kn, stride_kd, stride_vn, stride_vd,
                           stride_bias_h, stride_bias_m, stride_bias_n, stride_mask_w, stride_mask_m, stride_mask_n,
                           sm_scale, HAS_BIAS, HAS_MASK, DOT_PRECISION, TAIL_N, EVEN_ROWS, False, EVEN_HEADDIM)

    _store_tile(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
                (dq * sm_scale).to(DQ.dtype.element_ty), m_ok, d_ok, EVEN_ROWS, EVEN_HEADDIM)


@triton.jit(do_not_specialize=["H", "num_windows"])
def _attention_bwd_dq_kernel(
    Q, K, V, Bias, Mask, Out, DOut, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_bias_h, stride_bias_m, stride_bias_n,
    stride_mask_w, stride_mask_m, stride_mask_n,
    H, N, HEAD_DIM, num_windows, sm_scale,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_HEADDIM: tl.constexpr,
):
    batch_head, b, h, window, start_m = _query_block_of_program(H, N, num_windows, BLOCK_M)
    if EVEN_M:  # query tails as in the forward
        tail = False
    else:
        tail = start_m + BLOCK_M > N
    if tail:
        _dq_query_rows(Q, K, V, Bias, Mask, Out, DOut, Lse, Delta, DQ, batch_head, b, h, window, start_m,
                       stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                       stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_on, stride_od,
                       stride_dob, stride_doh, stride_don, stride_dod, stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                       stride_bias_h, stride_bias_m, stride_bias_n, stride_mask_w, stride_mask_m, stride_mask_n,
                       N, HEAD_DIM, sm_scale, HAS_BIAS, HAS_MASK, HEAD_DIM_PAD, DOT_PRECISION,
                       TAIL_M, BLOCK_N, TAIL_N, False, EVEN_N, EVEN_HEADDIM)
    else:
        _dq_query_rows(Q, K, V, Bias, Mask, Out, DOut, Lse, Delta, DQ, batch_head, b, h, window, start_m,
                       stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                       stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_on, stride_od,
                       stride_dob, stride_doh, stride_don, stride_dod, stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                       stride_bias_h, stride_bias_m, stride_bias_n, stride_mask_w, stride_mask_m, stride_mask_n,
                       N, HEAD_DIM, sm_scale, HAS_BIAS, HAS_MASK, HEAD_DIM_PAD, DOT_PRECISION,
                       BLOCK_M, BLOCK_N, TAIL_N, True, EVEN_N, EVEN_HEADDIM)


@triton.jit
def _dkdv_query_block(dk, dv, k, v, q_base, do_base, Lse, Delta, row_base, dbias_strip, Bias, Mask, h, window,
                      offs_n, n_ok, offs_d, d_ok, start_m, N, accumulate_dbias,
                      stride_qn, stride_qd, stride_don, stride_dod,
                      stride_bias_h, stride_bias_m, stride_bias_n, stride_mask_w, stride_mask_m, stride_mask_n,
                      sm_scale, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, COMPUTE_DBIAS: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_KEYS: tl.constexpr,
                      EVEN_QUERIES: tl.constexpr, EVEN_HEADDIM: tl.constexpr):
    """(dk, dv) accumulated over the BLOCK_M queries from start_m, and their dS^T added into the strip."""
    HAS_ADDITIVE: tl.constexpr = HAS_BIAS or HAS_MASK
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    q = _load_tile(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, m_ok, d_ok,
                   EVEN_QUERIES, EVEN_HEADDIM)
    do = _load_tile(do_base + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod, m_ok, d_ok,
                    EVEN_QUERIES, EVEN_HEADDIM)
    if EVEN_QUERIES:
        lse = tl.load(Lse + row_base + offs_m)
        delta = tl.load(Delta + row_base + offs_m)
    else:  # padded queries: q = dO = 0, lse = delta = 0, so their P^T is finite and dS^T is 0
        lse = tl.load(Lse + row_base + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(Delta + row_base + offs_m, mask=m_ok, other=0.0)
    additive_t = 0.0
    if HAS_ADDITIVE:
        additive_t = _additive_tile(Bias, Mask, h, window, offs_n, offs_m, n_ok, m_ok,
                                    stride_bias_h, stride_bias_n, stride_bias_m,
                                    stride_mask_w, stride_mask_n, stride_mask_m, HAS_BIAS, HAS_MASK,
                                    EVEN_KEYS, EVEN_QUERIES)
    p_t = _recomputed_probs(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION), additive_t, lse[None, :],
                            sm_scale, HAS_ADDITIVE)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])  # d(loss)/d(logits)^T = this batch's d(loss)/d(bias)^T
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    if COMPUTE_DBIAS:
        strip_ptrs = dbias_strip + offs_m[None, :]
        strip_ok = n_ok[:, None] & m_ok[None, :]
        earlier = tl.load(strip_ptrs, mask=strip_ok & accumulate_dbias, other=0.0)
        tl.store(strip_ptrs, earlier + ds_t, mask=strip_ok)
    return dk, dv


@triton.jit
def _dkdv_key_rows(Q, K, V, Bias, Mask, DOut, Lse, Delta, DK, DV, DBiasPartial, group_head, h, start_n,
                   first_batch, last_batch,
                   stride_qb, stride_qh, stride_qn, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_don, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                   stride_bias_h, stride_bias_m, stride_bias_n,
                   stride_mask_w, stride_mask_m, stride_mask_n,
                   H, N, HEAD_DIM, num_windows, sm_scale,
                   HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, COMPUTE_DBIAS: tl.constexpr,
                   HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   KEYS: tl.constexpr, EVEN_M: tl.constexpr, EVEN_KEYS: tl.constexpr, EVEN_HEADDIM: tl.constexpr):
    """dk, dv of the KEYS keys from start_n for each batch of the group, and their dBias^T strip."""
    offs_n = start_n + tl.arange(0, KEYS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    n_ok = offs_n < N
    d_ok = offs_d < HEAD_DIM
    # This program's strip of its group's dBias^T partial, contiguous (groups, H, N keys, N queries).
    dbias_strip = DBiasPartial + (group_head * N + offs_n[:, None]) * N
    for b in range(first_batch, last_batch):
        window = b % num_windows
        k = _load_tile(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       n_ok, d_ok, EVEN_KEYS, EVEN_HEADDIM)
        v = _load_tile(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       n_ok, d_ok, EVEN_KEYS, EVEN_HEADDIM)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DOut + b * stride_dob + h * stride_doh
        row_base = (b * H + h) * N  # Lse, Delta: contiguous (B, H, N)
        dk = tl.zeros([KEYS, HEAD_DIM_PAD], tl.float32)
        dv = tl.zeros([KEYS, HEAD_DIM_PAD], tl.float32)
        # Keys x queries orientation: dv = P^T dO and dk = dS^T q are plain dots of the transposed tiles.
        # A padded key's row holds garbage that is never stored: each row depends on its own key only.
        for start_m in range(0, N, BLOCK_M):
            dk, dv = _dkdv_query_block(
                dk, dv, k, v, q_base, do_base, Lse, Delta, row_base, dbias_strip, Bias, Mask, h, window,
                offs_n, n_ok, offs_d, d_ok, tl.multiple_of(start_m, BLOCK_M), N, b > first_batch,
                stride_qn, stride_qd, stride_don, stride_dod,
                stride_bias_h, stride_bias_m, stride_bias_n, stride_mask_w, stride_mask_m, stride_mask_n,
                sm_scale, HAS_BIAS, HAS_MASK, COMPUTE_DBIAS, DOT_PRECISION, BLOCK_M, EVEN_KEYS, EVEN_M, EVEN_HEADDIM)

        _store_tile(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
                    (dk * sm_scale).to(DK.dtype.element_ty), n_ok, d_ok, EVEN_KEYS, EVEN_HEADDIM)
        _store_tile(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
                    dv.to(DV.dtype.element_ty), n_ok, d_ok, EVEN_KEYS, EVEN_HEADDIM)
        if COMPUTE_DBIAS:
            tl.debug_barrier()  # the next batch's loads of the strip see every thread's stores


@triton.jit(do_not_specialize=["B", "H", "num_windows", "batches_per_group"])
def _attention_bwd_dkdv_dbias_kernel(
    Q, K, V, Bias, Mask, DOut, Lse, Delta, DK, DV, DBiasPartial,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_bias_h, stride_bias_m, stride_bias_n,
    stride_mask_w, stride_mask_m, stride_mask_n,
    B, H, N, HEAD_DIM, num_windows, batches_per_group, sm_scale,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, COMPUTE_DBIAS: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_HEADDIM: tl.constexpr,
):
    n_blocks = tl.cdiv(N, BLOCK_N)
    group_head = (tl.program_id(0) // n_blocks).to(tl.int64)
    h = group_head % H
    group = group_head // H
    start_n = (tl.program_id(0) % n_blocks) * BLOCK_N
    first_batch = group * batches_per_group
    last_batch = tl.minimum(first_batch + batches_per_group, B)
    # Key tails as the forward's query tails. The queries keep whole BLOCK_M-blocks: a second, tail-query
    # body in the batch loop spilled (255 registers, 136 B/thread at ViT-B with 32-query blocks, sm_90).
    if EVEN_N:
        tail = False
    else:
        tail = start_n + BLOCK_N > N
    if tail:
        _dkdv_key_rows(Q, K, V, Bias, Mask, DOut, Lse, Delta, DK, DV, DBiasPartial, group_head, h, start_n,
                       first_batch, last_batch, stride_qb, stride_qh, stride_qn, stride_qd,
                       stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
                       stride_dob, stride_doh, stride_don, stride_dod, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                       stride_dvb, stride_dvh, stride_dvn, stride_dvd, stride_bias_h, stride_bias_m, stride_bias_n,
                       stride_mask_w, stride_mask_m, stride_mask_n, H, N, HEAD_DIM, num_windows, sm_scale,
                       HAS_BIAS, HAS_MASK, COMPUTE_DBIAS, HEAD_DIM_PAD, DOT_PRECISION, BLOCK_M,
                       TAIL_N, EVEN_M, False, EVEN_HEADDIM)
    else:
        _dkdv_key_rows(Q, K, V, Bias, Mask, DOut, Lse, Delta, DK, DV, DBiasPartial, group_head, h, start_n,
                       first_batch, last_batch, stride_qb, stride_qh, stride_qn, stride_qd,
                       stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
                       stride_dob, stride_doh, stride_don, stride_dod, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                       stride_dvb, stride_dvh, stride_dvn, stride_dvd, stride_bias_h, stride_bias_m, stride_bias_n,
                       stride_mask_w, stride_mask_m, stride_mask_n, H, N, HEAD_DIM, num_windows, sm_scale,
                       HAS_BIAS, HAS_MASK, COMPUTE_DBIAS, HEAD_DIM_PAD, DOT_PRECISION, BLOCK_M,
                       BLOCK_N, EVEN_M, True, EVEN_HEADDIM)


# configs[0] is the default; tiles are fixed (see BLOCK), and so are the forward's and dq's warps: their
# row sums (l_i, delta) are cross-thread tl.sums whose bits follow the warp layout. No batch in the keys.
_CONFIGS = [triton.Config({}, num_warps=4, num_stages=s) for s in (2, 3, 1)]
_KEY = ["N", "HEAD_DIM_PAD", "HAS_BIAS", "HAS_MASK", "DOT_PRECISION"]


def _tail(tokens: int, block: int) -> int:
    """The block of the last tokens % block rows or keys: the power of two (at least 16, a tensor-core
    tile's k) that holds them, so 197 tokens in 64-blocks are padded to 208, not 256."""
    return min(block, max(16, next_power_of_2(tokens % block)))


_TILE_FLAGS = {
    "EVEN_M": lambda args: args["N"] % args["BLOCK_M"] == 0,
    "EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0,
    "EVEN_HEADDIM": lambda args: args["HEAD_DIM"] == args["HEAD_DIM_PAD"],
    "TAIL_N": lambda args: _tail(args["N"], args["BLOCK_N"]),
}
_ROW_TAIL = {"TAIL_M": lambda args: _tail(args["N"], args["BLOCK_M"])}
_fwd = autotune(_CONFIGS, _KEY)(heuristics({**_TILE_FLAGS, **_ROW_TAIL})(_attention_fwd_kernel))
_bwd_dq = autotune(_CONFIGS, _KEY)(heuristics({**_TILE_FLAGS, **_ROW_TAIL})(_attention_bwd_dq_kernel))

# dk/dv/dBias holds the most fp32 tiles. sm_90 ptxas, bf16 autocast (docs/kernels.md's account): 16
# queries, 4 warps, 2 stages is pipelined at 2 CTAs/SM without a spill at every headline shape (ViT-B:
# 255 registers; 144-token windows: 194, 222 with a shift mask), where 32 queries x 8 warps held 1 CTA/SM
# with 1 stage at ViT-B (236 registers; 2 stages spilled 16 B/thread, and are not a candidate) and with a
# shift mask (228). The others wait for a GPU's tuner: 1 stage (3 CTAs/SM at 144 tokens) and the 32-query
# tiles (fewer, larger dots per key block).
_DKDV_KEY = _KEY + ["COMPUTE_DBIAS"]
_DKDV_CONFIGS = [triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=2),
                 triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1),
                 triton.Config({"BLOCK_M": 32}, num_warps=8, num_stages=1)]
_bwd_dkdv_dbias = autotune(_DKDV_CONFIGS, _DKDV_KEY)(heuristics(_TILE_FLAGS)(_attention_bwd_dkdv_dbias_kernel))


def _head_dim_pad(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))  # tl.arange needs a power of two, tl.dot at least 16


def _additive_args(q, bias, window_mask):
    """The kernels' additive-term arguments: (bias pointer, mask pointer, their six strides, window
    count, constexpr flags); q stands in for an absent tensor, which the kernels never read."""
    strides = (*(bias.stride() if bias is not None else (0, 0, 0)),
               *(window_mask.stride() if window_mask is not None else (0, 0, 0)))
    flags = dict(HAS_BIAS=bias is not None, HAS_MASK=window_mask is not None)
    num_windows = window_mask.shape[0] if window_mask is not None else 1
    return (bias if bias is not None else q, window_mask if window_mask is not None else q, strides,
            num_windows, flags)


def _batches_per_group(batch: int, heads: int, tokens: int, head_dim: int, element_size: int,
                       compute_dbias: bool) -> int:
    """Batches each dk/dv/dBias program loops over: one without a bias gradient (dk, dv need no sum
    over the batch, so every (batch, head, key block) is a program); with one, enough programs
    (TARGET_PROGRAMS), and dBias's fp32 partials, (groups, H, N, N), no larger than twice q (at q's
    size Swin-L's 144-token stage-3 launch had 504 programs, under 2 waves on 132 SMs). Depends on
    shapes only, never the device."""
    if not compute_dbias:
        return 1
    if _INTERPRET:
        return 2  # several groups, the last one ragged, in tiny tests
    partial_bytes = heads * tokens * tokens * 4
    q_bytes = batch * heads * tokens * head_dim * element_size
    groups = min(batch, TARGET_PROGRAMS // (heads * cdiv(tokens, BLOCK)), 2 * q_bytes // partial_bytes)
    return cdiv(batch, max(1, groups))


def flash_forward(q, k, v, bias: Optional[torch.Tensor], window_mask: Optional[torch.Tensor], scale: float):
    """(out, lse): out (B, H, N, d) a view of a (B, N, H, d) tensor, lse (B, H, N) in fp32."""
    batch, heads, tokens, head_dim = q.shape
    out = torch.empty((batch, tokens, heads, head_dim), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((batch, heads, tokens), device=q.device, dtype=torch.float32)
    bias_arg, mask_arg, additive_strides, num_windows, flags = _additive_args(q, bias, window_mask)
    grid = (batch * heads * cdiv(tokens, BLOCK),)
    with on_device_of(q):
        _fwd[grid](
            q, k, v, bias_arg, mask_arg, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *additive_strides,
            heads, tokens, head_dim, num_windows, scale,
            **flags, HEAD_DIM_PAD=_head_dim_pad(head_dim), DOT_PRECISION=dot_precision(q.dtype),
            BLOCK_M=BLOCK, BLOCK_N=BLOCK,
        )
    return out, lse


def flash_backward(dout, q, k, v, bias, window_mask, out, lse, scale: float,
                   compute_dbias: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dqkv, dbias): dqkv (B, N, 3, H, d) holds dq, dk, dv; dbias (H, N, N) in fp32, or (H, 0, 0)
    when not ``compute_dbias``."""
    batch, heads, tokens, head_dim = q.shape
    dqkv = torch.empty((batch, tokens, 3, heads, head_dim), device=q.device, dtype=q.dtype)
    dq, dk, dv = packed_qkv_gradient(dqkv, (True, True, True))
    delta = torch.empty((batch, heads, tokens), device=q.device, dtype=torch.float32)
    bias_arg, mask_arg, additive_strides, num_windows, flags = _additive_args(q, bias, window_mask)
    blocks = cdiv(tokens, BLOCK)
    batches_per_group = _batches_per_group(batch, heads, tokens, head_dim, q.element_size(), compute_dbias)
    groups = cdiv(batch, batches_per_group)
    dbias_partial = torch.empty((groups, heads, tokens, tokens) if compute_dbias else (0, heads, 0, 0),
                                device=q.device, dtype=torch.float32)
    # dk/dv/dBias's query block BLOCK_M is its tuner's config
    common = dict(**flags, HEAD_DIM_PAD=_head_dim_pad(head_dim), DOT_PRECISION=dot_precision(q.dtype), BLOCK_N=BLOCK)
    with on_device_of(q):
        _bwd_dq[(batch * heads * blocks,)](
            q, k, v, bias_arg, mask_arg, out, dout, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(), *dq.stride(),
            *additive_strides, heads, tokens, head_dim, num_windows, scale, **common, BLOCK_M=BLOCK,
        )
        _bwd_dkdv_dbias[(groups * heads * blocks,)](
            q, k, v, bias_arg, mask_arg, dout, lse, delta, dk, dv, dbias_partial if compute_dbias else delta,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
            *additive_strides, batch, heads, tokens, head_dim, num_windows, batches_per_group, scale,
            COMPUTE_DBIAS=compute_dbias, **common,
        )
    # torch's sum is a fixed-order reduction: the same bits every run. The partials hold dBias^T.
    return dqkv, dbias_partial.sum(0).transpose(1, 2)


# ---- the op: torch.library registration, so Dynamo sees one opaque node ---------------------------

def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                       scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return flash_forward(q, k, v, bias, None, scale)


_attention_op = custom_op("simmim_fast_triton::attention", _attention_forward)


@_attention_op.register_fake
def _(q, k, v, bias, scale):
    batch, heads, tokens, head_dim = q.shape
    return (q.new_empty((batch, tokens, heads, head_dim)).transpose(1, 2),
            q.new_empty((batch, heads, tokens), dtype=torch.float32))


def _attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        bias: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, scale: float,
                        compute_dbias: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return flash_backward(dout, q, k, v, bias, None, out, lse, scale, compute_dbias)


_attention_backward_op = custom_op("simmim_fast_triton::attention_backward", _attention_backward)


@_attention_backward_op.register_fake
def _(dout, q, k, v, bias, out, lse, scale, compute_dbias):
    batch, heads, tokens, head_dim = q.shape
    dbias_shape = (heads, tokens, tokens) if compute_dbias else (heads, 0, 0)
    return (q.new_empty((batch, tokens, 3, heads, head_dim)),
            q.new_empty(dbias_shape, dtype=torch.float32).transpose(1, 2))


def _setup_context(ctx, inputs, output):
    q, k, v, bias, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse)
    ctx.scale = scale


def _backward(ctx, dout, _dlse):
    q, k, v, bias, out, lse = ctx.saved_tensors
    compute_dbias = bias is not None and ctx.needs_input_grad[3]
    dqkv, dbias = _call_backward(dout, q, k, v, bias, out, lse, ctx.scale, compute_dbias)
    dq, dk, dv = packed_qkv_gradient(dqkv, ctx.needs_input_grad[:3])
    return dq, dk, dv, dbias.to(bias.dtype) if compute_dbias else None, None


_call_backward = eager_or_op(_attention_backward_op)
_call = eager_or_op_with_autograd(_attention_op, _backward, _setup_context)


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
    return _call(q, k, v, bias, scale)[0]
