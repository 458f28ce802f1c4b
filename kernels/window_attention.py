"""Swin window attention, softmax(q k^T * scale + bias + window_mask) v, as fused Triton kernels.

Work split: a program owns one head, one block of query rows (the whole window when T <= 64, as for
Swin's 6x6 and 7x7 windows) and one window position w among the nW windows of an image, and loops
over a fixed slice of the images. What depends only on (head, w) -- the relative-position bias plus
the shift mask -- is loaded once per program and kept in registers; in the backward pass the bias
gradient of the program's rows is accumulated there across its images and written once as a
partial, and the partials are summed in a fixed order: dBias is deterministic, with no atomics.

Windows are not packed block-diagonally into one tile: T = 36 already pads to a 64-wide tile
(MMA-sized), the kernels are bound by memory, and packing k windows would multiply the MMA and exp
work by k. Iterating over windows keeps every tile dense instead.

Full rows: a query block always holds all T keys (BLOCK_M x next_pow2(T) logits), so the softmax
needs no online rescaling, and the forward saves each row's max and sum rather than their
log-sum-exp: the backward's recomputed probabilities are then as exact as torch's, where
exp(logits - lse) loses |lse| * eps (10x torch's gradient error in fp32 with logits ~ 60), and
sum_j P_ij dP_ij comes from P and dP rather than from the rounded output.

Above T = 64 (12x12, 14x14 windows) the rows come in 16-row blocks and each block's dk/dv
contributions go to fp32 partials summed afterwards: correct, but that traffic makes those windows
slower per token than the 6x6 and 7x7 ones the kernels are built for.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._attention_operands import attention_operands

# Programs per launch that the image slices aim at: enough to fill an H100 a few times over. A
# constant rather than the device's SM count, so that dBias sums in the same order on every GPU.
TARGET_PROGRAMS = 1024


@triton.jit
def _window_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, out_ptr, row_max_ptr, row_sum_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_bias_h, stride_bias_r, stride_bias_c,
    stride_mask_w, stride_mask_r, stride_mask_c,
    num_images, images_per_split, num_windows, scale,
    TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    head = tl.program_id(0)
    num_heads = tl.num_programs(0)
    window = tl.program_id(2) % num_windows
    split = tl.program_id(2) // num_windows
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_T)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < TOKENS
    col_ok = cols < TOKENS
    dim_ok = dims < HEAD_DIM
    tile_ok = row_ok[:, None] & col_ok[None, :]

    additive = tl.load(bias_ptr + head * stride_bias_h + rows[:, None] * stride_bias_r + cols[None, :] * stride_bias_c,
                       mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_MASK:
        additive += tl.load(mask_ptr + window * stride_mask_w + rows[:, None] * stride_mask_r
                            + cols[None, :] * stride_mask_c, mask=tile_ok, other=0.0).to(tl.float32)
    # Padded keys get no weight; padded query rows stay finite and are never stored.
    additive = tl.where(col_ok[None, :], additive, float("-inf"))

    first_image = split * images_per_split
    for image in range(first_image, tl.minimum(first_image + images_per_split, num_images)):
        batch_window = (image * num_windows + window).to(tl.int64)
        q = tl.load(q_ptr + batch_window * stride_qb + head * stride_qh + rows[:, None] * stride_qt
                    + dims[None, :] * stride_qd, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        k = tl.load(k_ptr + batch_window * stride_kb + head * stride_kh + cols[:, None] * stride_kt
                    + dims[None, :] * stride_kd, mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        v = tl.load(v_ptr + batch_window * stride_vb + head * stride_vh + cols[:, None] * stride_vt
                    + dims[None, :] * stride_vd, mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale + additive
        row_max = tl.max(logits, 1)
        probs = tl.exp(logits - row_max[:, None])
        row_sum = tl.sum(probs, 1)
        out = tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION) / row_sum[:, None]
        tl.store(out_ptr + batch_window * stride_ob + head * stride_oh + rows[:, None] * stride_ot
                 + dims[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
        row_stats = (batch_window * num_heads + head) * TOKENS + rows
        tl.store(row_max_ptr + row_stats, row_max, mask=row_ok)
        tl.store(row_sum_ptr + row_stats, row_sum, mask=row_ok)


@triton.jit
def _window_attention_bwd_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, row_max_ptr, row_sum_ptr, bias_ptr, mask_ptr,
    grad_q_ptr, grad_k_ptr, grad_v_ptr, grad_bias_partials_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_gob, stride_goh, stride_got, stride_god,
    stride_bias_h, stride_bias_r, stride_bias_c,
    stride_mask_w, stride_mask_r, stride_mask_c,
    stride_kv_partial,
    num_images, images_per_split, num_windows, scale,
    TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    head = tl.program_id(0)
    num_heads = tl.num_programs(0)
    row_block = tl.program_id(1)
    window = tl.program_id(2) % num_windows
    split = tl.program_id(2) // num_windows
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_T)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < TOKENS
    col_ok = cols < TOKENS
    dim_ok = dims < HEAD_DIM
    tile_ok = row_ok[:, None] & col_ok[None, :]
    query_ok = row_ok[:, None] & dim_ok[None, :]
    key_ok = col_ok[:, None] & dim_ok[None, :]

    additive = tl.load(bias_ptr + head * stride_bias_h + rows[:, None] * stride_bias_r + cols[None, :] * stride_bias_c,
                       mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_MASK:
        additive += tl.load(mask_ptr + window * stride_mask_w + rows[:, None] * stride_mask_r
                            + cols[None, :] * stride_mask_c, mask=tile_ok, other=0.0).to(tl.float32)
    additive = tl.where(col_ok[None, :], additive, float("-inf"))
    grad_bias = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)

    # Gradients are stored contiguous (B*nW, H, T, d); dk/dv of row block r go to partial r (or
    # straight to the result when there is one row block, stride_kv_partial == 0).
    query_offsets = rows[:, None] * HEAD_DIM + dims[None, :]
    key_offsets = row_block.to(tl.int64) * stride_kv_partial + cols[:, None] * HEAD_DIM + dims[None, :]
    first_image = split * images_per_split
    for image in range(first_image, tl.minimum(first_image + images_per_split, num_images)):
        batch_window = (image * num_windows + window).to(tl.int64)
        q = tl.load(q_ptr + batch_window * stride_qb + head * stride_qh + rows[:, None] * stride_qt
                    + dims[None, :] * stride_qd, mask=query_ok, other=0.0)
        k = tl.load(k_ptr + batch_window * stride_kb + head * stride_kh + cols[:, None] * stride_kt
                    + dims[None, :] * stride_kd, mask=key_ok, other=0.0)
        v = tl.load(v_ptr + batch_window * stride_vb + head * stride_vh + cols[:, None] * stride_vt
                    + dims[None, :] * stride_vd, mask=key_ok, other=0.0)
        grad_out = tl.load(grad_out_ptr + batch_window * stride_gob + head * stride_goh + rows[:, None] * stride_got
                           + dims[None, :] * stride_god, mask=query_ok, other=0.0)
        row_stats = (batch_window * num_heads + head) * TOKENS + rows
        row_max = tl.load(row_max_ptr + row_stats, mask=row_ok, other=0.0)
        row_sum = tl.load(row_sum_ptr + row_stats, mask=row_ok, other=1.0)

        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale + additive
        probs = tl.exp(logits - row_max[:, None]) * (1.0 / row_sum)[:, None]
        grad_probs = tl.dot(grad_out, tl.trans(v), input_precision=DOT_PRECISION)
        # With whole rows at hand, sum_j P_ij dP_ij comes from P and dP themselves, in fp32, rather than
        # as dO_i . O_i from the rounded output: a peaked softmax then gets dS ~ 0, as in torch, and O
        # is not read. Padded query rows have dO = 0, so their dS is exactly 0.
        grad_logits = probs * (grad_probs - tl.sum(probs * grad_probs, 1)[:, None])
        grad_bias += grad_logits

        grad_logits_lowp = grad_logits.to(q.dtype)
        grad_q = tl.dot(grad_logits_lowp, k, input_precision=DOT_PRECISION) * scale
        grad_k = tl.dot(tl.trans(grad_logits_lowp), q, input_precision=DOT_PRECISION) * scale
        grad_v = tl.dot(tl.trans(probs.to(grad_out.dtype)), grad_out, input_precision=DOT_PRECISION)
        grad_base = (batch_window * num_heads + head) * TOKENS * HEAD_DIM
        tl.store(grad_q_ptr + grad_base + query_offsets, grad_q.to(grad_q_ptr.dtype.element_ty), mask=query_ok)
        tl.store(grad_k_ptr + grad_base + key_offsets, grad_k.to(grad_k_ptr.dtype.element_ty), mask=key_ok)
        tl.store(grad_v_ptr + grad_base + key_offsets, grad_v.to(grad_v_ptr.dtype.element_ty), mask=key_ok)

    partial = tl.program_id(2) * num_heads + head
    tl.store(grad_bias_partials_ptr + (partial * TOKENS + rows[:, None]) * TOKENS + cols[None, :], grad_bias,
             mask=tile_ok)


def _launch_geometry(q: torch.Tensor, window_mask: Optional[torch.Tensor]) -> dict:
    """Block sizes, image slices and the grid shared by the forward and the backward launch."""
    batch_windows, heads, tokens, head_dim = q.shape
    num_windows = 1 if window_mask is None else window_mask.shape[0]
    num_images = batch_windows // num_windows
    block_t = max(16, triton.next_power_of_2(tokens))
    # Full key rows in registers: the whole window up to T = 64 (a 64 x 64 tile, one warpgroup's MMA
    # rows), 16-row blocks above, where the backward's T x d dk/dv tiles take 8 warps' registers
    # (larger row blocks spill; checked with ptxas for sm_90).
    block_m = block_t if block_t <= 64 else 16
    row_blocks = triton.cdiv(tokens, block_m)
    splits = max(1, min(num_images, TARGET_PROGRAMS // (heads * row_blocks * num_windows)))
    images_per_split = triton.cdiv(num_images, splits)
    splits = triton.cdiv(num_images, images_per_split)
    return dict(
        grid=(heads, row_blocks, splits * num_windows),
        num_images=num_images, images_per_split=images_per_split, num_windows=num_windows,
        # 16-bit windows up to T = 64: one warpgroup for the 64-row MMA tile, 3 stages of prefetch.
        # 8 warps where 4 would spill (checked with ptxas): the T x d dk/dv tiles above T = 64, and
        # float32, whose exact products run without tensor cores; 2 stages fit their shared memory.
        **(dict(num_warps=4, num_stages=3) if block_t <= 64 and q.dtype != torch.float32
           else dict(num_warps=8, num_stages=2)),
        constexprs=dict(
            TOKENS=tokens, HEAD_DIM=head_dim, HAS_MASK=window_mask is not None,
            # float32 inputs get exact float32 products, as torch's default; 16-bit inputs ignore it.
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            BLOCK_M=block_m, BLOCK_T=block_t, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        ),
    )


def _mask_args(bias: torch.Tensor, window_mask: Optional[torch.Tensor]):
    mask = bias if window_mask is None else window_mask  # any tensor: the kernel never reads it without HAS_MASK
    return mask, mask.stride()


def _forward(q, k, v, bias, window_mask, scale):
    batch_windows, heads, tokens, head_dim = q.shape
    geometry = _launch_geometry(q, window_mask)
    # Stored as (B*nW, T, H, d) so that the caller's transpose(1, 2).reshape(B*nW, T, C) is free.
    out = torch.empty((batch_windows, tokens, heads, head_dim), device=q.device, dtype=q.dtype).transpose(1, 2)
    row_max = torch.empty((batch_windows, heads, tokens), device=q.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    mask, mask_strides = _mask_args(bias, window_mask)
    _window_attention_fwd_kernel[geometry["grid"]](
        q, k, v, bias, mask, out, row_max, row_sum,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *bias.stride(), *mask_strides,
        geometry["num_images"], geometry["images_per_split"], geometry["num_windows"], scale,
        **geometry["constexprs"], num_warps=geometry["num_warps"], num_stages=geometry["num_stages"],
    )
    return out, row_max, row_sum


def _backward(grad_out, q, k, v, bias, window_mask, row_max, row_sum, scale):
    geometry = _launch_geometry(q, window_mask)
    row_blocks = geometry["grid"][1]
    grad_q = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    kv_shape, kv_dtype = (q.shape, q.dtype) if row_blocks == 1 else ((row_blocks, *q.shape), torch.float32)
    grad_k = torch.empty(kv_shape, device=q.device, dtype=kv_dtype)
    grad_v = torch.empty(kv_shape, device=q.device, dtype=kv_dtype)
    heads, tokens = q.shape[1], q.shape[2]
    grad_bias_partials = torch.empty((geometry["grid"][2], heads, tokens, tokens), device=q.device,
                                     dtype=torch.float32)
    mask, mask_strides = _mask_args(bias, window_mask)
    _window_attention_bwd_kernel[geometry["grid"]](
        q, k, v, grad_out, row_max, row_sum, bias, mask, grad_q, grad_k, grad_v, grad_bias_partials,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *bias.stride(), *mask_strides,
        0 if row_blocks == 1 else grad_k.stride(0),
        geometry["num_images"], geometry["images_per_split"], geometry["num_windows"], scale,
        **geometry["constexprs"], num_warps=geometry["num_warps"], num_stages=geometry["num_stages"],
    )
    if row_blocks > 1:
        grad_k = grad_k.sum(0).to(q.dtype)
        grad_v = grad_v.sum(0).to(q.dtype)
    return grad_q, grad_k, grad_v, grad_bias_partials.sum(0).to(bias.dtype)


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, window_mask, scale):
        out, row_max, row_sum = _forward(q, k, v, bias, window_mask, scale)
        ctx.save_for_backward(q, k, v, bias, window_mask, row_max, row_sum)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, window_mask, row_max, row_sum = ctx.saved_tensors
        grad_q, grad_k, grad_v, grad_bias = _backward(grad_out, q, k, v, bias, window_mask, row_max, row_sum,
                                                      ctx.scale)
        return grad_q, grad_k, grad_v, grad_bias, None, None


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    window_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``simmim_fast.reference.window_attention`` (same signature and meaning); dropout_p must be 0.

    Under autocast q, k, v run in the autocast dtype, as the reference's matmuls do; the bias and the
    window mask are read in their own dtype and everything else is computed in float32.
    """
    assert dropout_p == 0.0, "attention dropout is not fused; the dispatch sends dropout_p > 0 to the reference"
    q, k, v, scale = attention_operands(q, k, v, scale)
    return _WindowAttention.apply(q, k, v, bias, window_mask, scale)
