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

Full rows: the program holds the whole window (T x next_pow2(T) logits), so the softmax needs no
online rescaling (and no guard for a row whose first keys are all -inf), and the forward saves each row's max and sum rather than their
log-sum-exp: the backward's recomputed probabilities are then as exact as torch's, where
exp(logits - lse) loses |lse| * eps (10x torch's gradient error in fp32 with logits ~ 60), and
sum_j P_ij dP_ij comes from P and dP rather than from the rounded output.

Above T = 64 (Swin-L's 12x12, 14x14 windows) a whole window no longer fits one warpgroup's
registers: those windows run the flash kernels of kernels/attention_bias.py with the shift mask
as a second additive term, on 64 x 64 tiles: an FA2-style backward whose dk/dv program loops over
query blocks, with no dk/dv workspace (dBias's fp32 partials as here).

Both paths return the output as a view of a (B*nW, T, H, d) tensor and the q, k, v gradients as
views of one (B*nW, T, 3, H, d) buffer: the layouts of the Swin block's qkv projection and output
projection, so the caller's reshapes are free. The op is registered as
``simmim_fast_triton::window_attention`` (with its backward as a second op) for torch.compile.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._attention_operands import attention_operands, dot_precision, packed_qkv_gradient
from ._autotune import autotune
from ._launch import on_device_of
from .attention_bias import flash_backward, flash_forward

# Programs per backward launch that the image slices aim at: enough to fill an H100 a few times over
# (1 resident CTA per SM). A constant rather than the device's SM count, so that dBias sums in the same
# order on every GPU.
TARGET_PROGRAMS = 1024
# The forward sums nothing across images (each image's result is the same whatever program computes it),
# so its slices are finer: at 4-5 resident CTAs per SM, 1024 programs would be under 2 waves on 132 SMs.
FORWARD_TARGET_PROGRAMS = 4096
# Largest window and head dim the whole-window kernels take (one 64-row warpgroup tile, compile-checked
# at d <= 64); anything larger goes to the flash kernels of attention_bias.py.
WHOLE_WINDOW_TOKENS = WHOLE_WINDOW_HEAD_DIM = 64


# The image counts grow with the batch: not specialised, so a new batch size compiles nothing new.
@triton.jit(do_not_specialize=["num_images", "images_per_split"])
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
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    window = tl.program_id(0) % num_windows  # windows (and image slices) on axis 0, which has no 65535 cap
    split = tl.program_id(0) // num_windows
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    rows = tl.arange(0, BLOCK_T)
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


@triton.jit(do_not_specialize=["num_images", "images_per_split"])
def _window_attention_bwd_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, row_max_ptr, row_sum_ptr, bias_ptr, mask_ptr,
    grad_q_ptr, grad_k_ptr, grad_v_ptr, grad_bias_partials_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_gob, stride_goh, stride_got, stride_god,
    stride_gradb, stride_gradh, stride_gradt, stride_gradd,
    stride_bias_h, stride_bias_r, stride_bias_c,
    stride_mask_w, stride_mask_r, stride_mask_c,
    num_images, images_per_split, num_windows, scale,
    TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    window = tl.program_id(0) % num_windows
    split = tl.program_id(0) // num_windows
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    rows = tl.arange(0, BLOCK_T)
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
    grad_bias = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)

    # dq, dk, dv share one stride set: views of one packed (B*nW, T, 3, H, d) buffer.
    query_offsets = rows[:, None] * stride_gradt + dims[None, :] * stride_gradd
    key_offsets = cols[:, None] * stride_gradt + dims[None, :] * stride_gradd
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
        grad_base = batch_window * stride_gradb + head * stride_gradh
        tl.store(grad_q_ptr + grad_base + query_offsets, grad_q.to(grad_q_ptr.dtype.element_ty), mask=query_ok)
        tl.store(grad_k_ptr + grad_base + key_offsets, grad_k.to(grad_k_ptr.dtype.element_ty), mask=key_ok)
        tl.store(grad_v_ptr + grad_base + key_offsets, grad_v.to(grad_v_ptr.dtype.element_ty), mask=key_ok)

    partial = (tl.program_id(0) * num_heads + head).to(tl.int64)
    tl.store(grad_bias_partials_ptr + (partial * TOKENS + rows[:, None]) * TOKENS + cols[None, :], grad_bias,
             mask=tile_ok)


# The whole window is the tile, and the warps are fixed too (the row sums are cross-thread tl.sums whose
# bits follow the warp layout): only stages are tuned; the dBias partials follow the image slices, not
# the config. configs[0] is the default: for the forward one warpgroup for the 64-row tile with 3
# stages of prefetch; the backward, with its (T x T) dBias accumulator, spills 56-64 B/thread on 4
# warps (sm_90 ptxas, Swin-B w6) and nothing on 8.
_KEY = ["TOKENS", "HEAD_DIM", "HAS_MASK", "DOT_PRECISION"]
_fwd = autotune([triton.Config({}, num_warps=4, num_stages=s) for s in (3, 2)], _KEY)(_window_attention_fwd_kernel)
_bwd = autotune([triton.Config({}, num_warps=8, num_stages=s) for s in (2, 3)], _KEY)(_window_attention_bwd_kernel)


def _launch_geometry(q: torch.Tensor, window_mask: Optional[torch.Tensor], target_programs: int) -> dict:
    """Image slices for about ``target_programs`` programs, the grid and the constexprs of a launch."""
    batch_windows, heads, tokens, head_dim = q.shape
    num_windows = 1 if window_mask is None else window_mask.shape[0]
    num_images = batch_windows // num_windows
    splits = max(1, min(num_images, target_programs // (heads * num_windows)))
    images_per_split = triton.cdiv(num_images, splits)
    splits = triton.cdiv(num_images, images_per_split)
    return dict(
        grid=(splits * num_windows, heads),
        num_images=num_images, images_per_split=images_per_split, num_windows=num_windows,
        constexprs=dict(
            TOKENS=tokens, HEAD_DIM=head_dim, HAS_MASK=window_mask is not None,
            DOT_PRECISION=dot_precision(q.dtype),
            BLOCK_T=max(16, triton.next_power_of_2(tokens)), BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        ),
    )


def _mask_args(bias: torch.Tensor, window_mask: Optional[torch.Tensor]):
    mask = bias if window_mask is None else window_mask  # any tensor: the kernel never reads it without HAS_MASK
    return mask, mask.stride()


def _whole_windows(tokens: int, head_dim: int) -> bool:
    return tokens <= WHOLE_WINDOW_TOKENS and head_dim <= WHOLE_WINDOW_HEAD_DIM


def _forward(q, k, v, bias, window_mask, scale):
    """(out, row statistics): out (B*nW, H, T, d), a view of (B*nW, T, H, d). Whole windows save each
    row's max and sum as (2, B*nW, H, T); the flash path its log-sum-exp (B*nW, H, T)."""
    if not _whole_windows(*q.shape[2:]):
        return flash_forward(q, k, v, bias, window_mask, scale)
    batch_windows, heads, tokens, head_dim = q.shape
    geometry = _launch_geometry(q, window_mask, FORWARD_TARGET_PROGRAMS)
    out = torch.empty((batch_windows, tokens, heads, head_dim), device=q.device, dtype=q.dtype).transpose(1, 2)
    row_stats = torch.empty((2, batch_windows, heads, tokens), device=q.device, dtype=torch.float32)
    mask, mask_strides = _mask_args(bias, window_mask)
    with on_device_of(q):
        _fwd[geometry["grid"]](
            q, k, v, bias, mask, out, row_stats[0], row_stats[1],
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *bias.stride(), *mask_strides,
            geometry["num_images"], geometry["images_per_split"], geometry["num_windows"], scale,
            **geometry["constexprs"],
        )
    return out, row_stats


def _backward(grad_out, q, k, v, bias, window_mask, out, row_stats, scale):
    """(dqkv, dbias): dqkv (B*nW, T, 3, H, d) holds dq, dk, dv; dbias (H, T, T) in fp32."""
    if not _whole_windows(*q.shape[2:]):
        return flash_backward(grad_out, q, k, v, bias, window_mask, out, row_stats, scale, compute_dbias=True)
    batch_windows, heads, tokens, head_dim = q.shape
    geometry = _launch_geometry(q, window_mask, TARGET_PROGRAMS)
    dqkv = torch.empty((batch_windows, tokens, 3, heads, head_dim), device=q.device, dtype=q.dtype)
    grad_q, grad_k, grad_v = packed_qkv_gradient(dqkv, (True, True, True))
    grad_bias_partials = torch.empty((geometry["grid"][0], heads, tokens, tokens), device=q.device,
                                     dtype=torch.float32)
    mask, mask_strides = _mask_args(bias, window_mask)
    with on_device_of(q):
        _bwd[geometry["grid"]](
            q, k, v, grad_out, row_stats[0], row_stats[1], bias, mask, grad_q, grad_k, grad_v, grad_bias_partials,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *grad_q.stride(), *bias.stride(),
            *mask_strides, geometry["num_images"], geometry["images_per_split"], geometry["num_windows"], scale,
            **geometry["constexprs"],
        )
    return dqkv, grad_bias_partials.sum(0)  # a fixed-order sum: the same bits every run


# ---- the op: torch.library registration, so Dynamo sees one opaque node ---------------------------

@torch.library.custom_op("simmim_fast_triton::window_attention", mutates_args=())
def _window_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                         window_mask: Optional[torch.Tensor], scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, bias, window_mask, scale)


@_window_attention_op.register_fake
def _(q, k, v, bias, window_mask, scale):
    batch_windows, heads, tokens, head_dim = q.shape
    whole = _whole_windows(tokens, head_dim)
    stats_shape = (2, batch_windows, heads, tokens) if whole else (batch_windows, heads, tokens)
    return (q.new_empty((batch_windows, tokens, heads, head_dim)).transpose(1, 2),
            q.new_empty(stats_shape, dtype=torch.float32))


@torch.library.custom_op("simmim_fast_triton::window_attention_backward", mutates_args=())
def _window_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  bias: torch.Tensor, window_mask: Optional[torch.Tensor], out: torch.Tensor,
                                  row_stats: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    dqkv, dbias = _backward(grad_out, q, k, v, bias, window_mask, out, row_stats, scale)
    return dqkv, dbias.contiguous()  # the flash path's is a transposed view


@_window_attention_backward_op.register_fake
def _(grad_out, q, k, v, bias, window_mask, out, row_stats, scale):
    batch_windows, heads, tokens, head_dim = q.shape
    return (q.new_empty((batch_windows, tokens, 3, heads, head_dim)),
            q.new_empty((heads, tokens, tokens), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, bias, window_mask, scale = inputs
    out, row_stats = output
    ctx.save_for_backward(q, k, v, bias, window_mask, out, row_stats)
    ctx.scale = scale


def _backward_formula(ctx, grad_out, _grad_row_stats):
    q, k, v, bias, window_mask, out, row_stats = ctx.saved_tensors
    dqkv, dbias = _window_attention_backward_op(grad_out, q, k, v, bias, window_mask, out, row_stats, ctx.scale)
    dq, dk, dv = packed_qkv_gradient(dqkv, ctx.needs_input_grad[:3])
    return dq, dk, dv, dbias.to(bias.dtype) if ctx.needs_input_grad[3] else None, None, None


torch.library.register_autograd("simmim_fast_triton::window_attention", _backward_formula,
                                setup_context=_setup_context)


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
    return _window_attention_op(q, k, v, bias, window_mask, scale)[0]
