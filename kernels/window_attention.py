"""Swin window attention, softmax(q k^T * scale + bias + window_mask) v, as fused Triton kernels.

Work split: a program owns one head, the whole window's rows (T <= 64, as for Swin's 6x6 and 7x7
windows) and one window position w among the nW windows of an image, and loops over a fixed slice of
the images. Rows and keys are one power-of-two block, or for 33 to 48 tokens a 32-token head block and
a 16-token tail block (``token_blocks``): 36 tokens then compute 48 x 48 logits in four tiles, the
tensor cores' 16-row floor, instead of one 64 x 64 tile. What depends only on (head, w) -- the relative-position bias plus
the shift mask -- is loaded once per program and kept in registers; in the backward pass the bias
gradient of the program's rows is accumulated there across its images and written once as a
partial, and the partials are summed in a fixed order: dBias is deterministic, with no atomics.

Windows are not packed block-diagonally into one tile: packing k windows would multiply the MMA and
exp work by k. Iterating over windows keeps every tile dense instead.

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
from ._eager import custom_op, eager_or_op, eager_or_op_with_autograd
from ._launch import cdiv, next_power_of_2, on_device_of
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


@triton.jit
def _token_block(base_ptr, stride_t, stride_d, first, TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers to tokens [first, first + ROWS) of one window and head, and which of them are real."""
    tokens = first + tl.arange(0, ROWS)
    dims = tl.arange(0, BLOCK_D)
    return (base_ptr + tokens[:, None] * stride_t + dims[None, :] * stride_d,
            (tokens < TOKENS)[:, None] & (dims < HEAD_DIM)[None, :])


@triton.jit
def _square_tile(first_row, first_col, TOKENS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Rows and columns of one tile of a (T, T) matrix, and which entries are real."""
    rows = first_row + tl.arange(0, ROWS)
    cols = first_col + tl.arange(0, COLS)
    return rows, cols, (rows < TOKENS)[:, None] & (cols < TOKENS)[None, :]


@triton.jit
def _additive_tile(bias_ptr, mask_ptr, head, window, stride_bias_h, stride_bias_r, stride_bias_c,
                   stride_mask_w, stride_mask_r, stride_mask_c, first_row, first_col,
                   TOKENS: tl.constexpr, HAS_MASK: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """bias (+ shift mask) over one tile of the logits, in fp32; padded keys at -inf (no weight), padded
    query rows finite (never stored)."""
    rows, cols, tile_ok = _square_tile(first_row, first_col, TOKENS, ROWS, COLS)
    additive = tl.load(bias_ptr + head * stride_bias_h + rows[:, None] * stride_bias_r + cols[None, :] * stride_bias_c,
                       mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_MASK:
        additive += tl.load(mask_ptr + window * stride_mask_w + rows[:, None] * stride_mask_r
                            + cols[None, :] * stride_mask_c, mask=tile_ok, other=0.0).to(tl.float32)
    return tl.where((cols < TOKENS)[None, :], additive, float("-inf"))


@triton.jit
def _additive_tiles(bias_ptr, mask_ptr, head, window, stride_bias_h, stride_bias_r, stride_bias_c,
                    stride_mask_w, stride_mask_r, stride_mask_c,
                    TOKENS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_HEAD: tl.constexpr, BLOCK_TAIL: tl.constexpr):
    """The additive tiles of (head rows, head keys), (head, tail), (tail, head) and (tail, tail); without a
    tail block (BLOCK_TAIL == 0) the last three are the first again, and are not read."""
    head_head = _additive_tile(bias_ptr, mask_ptr, head, window, stride_bias_h, stride_bias_r, stride_bias_c,
                               stride_mask_w, stride_mask_r, stride_mask_c, 0, 0, TOKENS, HAS_MASK, BLOCK_HEAD, BLOCK_HEAD)
    head_tail, tail_head, tail_tail = head_head, head_head, head_head
    if BLOCK_TAIL > 0:
        head_tail = _additive_tile(bias_ptr, mask_ptr, head, window, stride_bias_h, stride_bias_r, stride_bias_c,
                                   stride_mask_w, stride_mask_r, stride_mask_c, 0, BLOCK_HEAD,
                                   TOKENS, HAS_MASK, BLOCK_HEAD, BLOCK_TAIL)
        tail_head = _additive_tile(bias_ptr, mask_ptr, head, window, stride_bias_h, stride_bias_r, stride_bias_c,
                                   stride_mask_w, stride_mask_r, stride_mask_c, BLOCK_HEAD, 0,
                                   TOKENS, HAS_MASK, BLOCK_TAIL, BLOCK_HEAD)
        tail_tail = _additive_tile(bias_ptr, mask_ptr, head, window, stride_bias_h, stride_bias_r, stride_bias_c,
                                   stride_mask_w, stride_mask_r, stride_mask_c, BLOCK_HEAD, BLOCK_HEAD,
                                   TOKENS, HAS_MASK, BLOCK_TAIL, BLOCK_TAIL)
    return head_head, head_tail, tail_head, tail_tail


@triton.jit
def _load_keys(k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, TOKENS: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_HEAD: tl.constexpr, BLOCK_TAIL: tl.constexpr, BLOCK_D: tl.constexpr):
    """(k, v, which are real) of the head key block, then of the tail block (the head's again when
    BLOCK_TAIL == 0, and not read)."""
    k_ptrs, head_ok = _token_block(k_base, stride_kt, stride_kd, 0, TOKENS, HEAD_DIM, BLOCK_HEAD, BLOCK_D)
    v_ptrs, _ = _token_block(v_base, stride_vt, stride_vd, 0, TOKENS, HEAD_DIM, BLOCK_HEAD, BLOCK_D)
    k_head = tl.load(k_ptrs, mask=head_ok, other=0.0)
    v_head = tl.load(v_ptrs, mask=head_ok, other=0.0)
    k_tail, v_tail, tail_ok = k_head, v_head, head_ok
    if BLOCK_TAIL > 0:
        k_ptrs, tail_ok = _token_block(k_base, stride_kt, stride_kd, BLOCK_HEAD, TOKENS, HEAD_DIM, BLOCK_TAIL, BLOCK_D)
        v_ptrs, _ = _token_block(v_base, stride_vt, stride_vd, BLOCK_HEAD, TOKENS, HEAD_DIM, BLOCK_TAIL, BLOCK_D)
        k_tail = tl.load(k_ptrs, mask=tail_ok, other=0.0)
        v_tail = tl.load(v_ptrs, mask=tail_ok, other=0.0)
    return k_head, v_head, head_ok, k_tail, v_tail, tail_ok


@triton.jit
def _load_query_rows(q_base, grad_out_base, row_max_ptr, row_sum_ptr, stats_base, stride_qt, stride_qd,
                     stride_got, stride_god, first, TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """(q, dO, row max, row sum, which are real) of query rows [first, first + ROWS), for the backward."""
    q_ptrs, query_ok = _token_block(q_base, stride_qt, stride_qd, first, TOKENS, HEAD_DIM, ROWS, BLOCK_D)
    grad_out_ptrs, _ = _token_block(grad_out_base, stride_got, stride_god, first, TOKENS, HEAD_DIM, ROWS, BLOCK_D)
    rows = first + tl.arange(0, ROWS)
    return (tl.load(q_ptrs, mask=query_ok, other=0.0), tl.load(grad_out_ptrs, mask=query_ok, other=0.0),
            tl.load(row_max_ptr + stats_base + rows, mask=rows < TOKENS, other=0.0),
            tl.load(row_sum_ptr + stats_base + rows, mask=rows < TOKENS, other=1.0), query_ok)


@triton.jit
def _attend_rows(q, k_head, v_head, additive_head, k_tail, v_tail, additive_tail, scale,
                 BLOCK_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(output, row max, row sum) of one block of query rows against the window's keys: the head key
    block, and the tail block when BLOCK_TAIL > 0 (else the tail arguments are not read)."""
    logits_head = tl.dot(q, tl.trans(k_head), input_precision=DOT_PRECISION) * scale + additive_head
    row_max = tl.max(logits_head, 1)
    if BLOCK_TAIL > 0:
        logits_tail = tl.dot(q, tl.trans(k_tail), input_precision=DOT_PRECISION) * scale + additive_tail
        row_max = tl.maximum(row_max, tl.max(logits_tail, 1))
    probs = tl.exp(logits_head - row_max[:, None])
    row_sum = tl.sum(probs, 1)
    out = tl.dot(probs.to(v_head.dtype), v_head, input_precision=DOT_PRECISION)
    if BLOCK_TAIL > 0:
        probs_tail = tl.exp(logits_tail - row_max[:, None])
        row_sum += tl.sum(probs_tail, 1)
        out = tl.dot(probs_tail.to(v_tail.dtype), v_tail, out, input_precision=DOT_PRECISION)
    return out / row_sum[:, None], row_max, row_sum


@triton.jit
def _score_gradients(q, grad_out, row_max, row_sum, k_head, v_head, additive_head, k_tail, v_tail, additive_tail,
                     scale, BLOCK_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(P, dS) against the head key block and (P, dS) against the tail block (the head's again when
    BLOCK_TAIL == 0) for one block of query rows; dS = dLoss/dlogits.

    With whole rows at hand, sum_j P_ij dP_ij comes from P and dP themselves, in fp32, rather than as
    dO_i . O_i from the rounded output: a peaked softmax then gets dS ~ 0, as in torch, and O is not
    read. Padded query rows have dO = 0, so their dS is exactly 0."""
    inverse_sum = (1.0 / row_sum)[:, None]
    logits_head = tl.dot(q, tl.trans(k_head), input_precision=DOT_PRECISION) * scale + additive_head
    probs_head = tl.exp(logits_head - row_max[:, None]) * inverse_sum
    grad_probs_head = tl.dot(grad_out, tl.trans(v_head), input_precision=DOT_PRECISION)
    row_dot = tl.sum(probs_head * grad_probs_head, 1)
    probs_tail, grad_logits_tail = probs_head, probs_head
    if BLOCK_TAIL > 0:
        logits_tail = tl.dot(q, tl.trans(k_tail), input_precision=DOT_PRECISION) * scale + additive_tail
        probs_tail = tl.exp(logits_tail - row_max[:, None]) * inverse_sum
        grad_probs_tail = tl.dot(grad_out, tl.trans(v_tail), input_precision=DOT_PRECISION)
        row_dot += tl.sum(probs_tail * grad_probs_tail, 1)
        grad_logits_tail = probs_tail * (grad_probs_tail - row_dot[:, None])
    grad_logits_head = probs_head * (grad_probs_head - row_dot[:, None])
    return probs_head, grad_logits_head, probs_tail, grad_logits_tail


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
    BLOCK_HEAD: tl.constexpr, BLOCK_TAIL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    window = tl.program_id(0) % num_windows  # windows (and image slices) on axis 0, which has no 65535 cap
    split = tl.program_id(0) // num_windows
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    # The additive terms of every (query block, key block) tile, once per program.
    additive_hh, additive_ht, additive_th, additive_tt = _additive_tiles(
        bias_ptr, mask_ptr, head, window, stride_bias_h, stride_bias_r, stride_bias_c,
        stride_mask_w, stride_mask_r, stride_mask_c, TOKENS, HAS_MASK, BLOCK_HEAD, BLOCK_TAIL)

    first_image = split * images_per_split
    for image in range(first_image, tl.minimum(first_image + images_per_split, num_images)):
        batch_window = (image * num_windows + window).to(tl.int64)
        q_base = q_ptr + batch_window * stride_qb + head * stride_qh
        k_base = k_ptr + batch_window * stride_kb + head * stride_kh
        v_base = v_ptr + batch_window * stride_vb + head * stride_vh
        out_base = out_ptr + batch_window * stride_ob + head * stride_oh
        stats_base = (batch_window * num_heads + head) * TOKENS

        k_head, v_head, _, k_tail, v_tail, _ = _load_keys(k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                                          TOKENS, HEAD_DIM, BLOCK_HEAD, BLOCK_TAIL, BLOCK_D)

        q_ptrs, query_ok = _token_block(q_base, stride_qt, stride_qd, 0, TOKENS, HEAD_DIM, BLOCK_HEAD, BLOCK_D)
        out_ptrs, _ = _token_block(out_base, stride_ot, stride_od, 0, TOKENS, HEAD_DIM, BLOCK_HEAD, BLOCK_D)
        out, row_max, row_sum = _attend_rows(tl.load(q_ptrs, mask=query_ok, other=0.0), k_head, v_head, additive_hh,
                                             k_tail, v_tail, additive_ht, scale, BLOCK_TAIL, DOT_PRECISION)
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=query_ok)
        rows = tl.arange(0, BLOCK_HEAD)
        tl.store(row_max_ptr + stats_base + rows, row_max, mask=rows < TOKENS)
        tl.store(row_sum_ptr + stats_base + rows, row_sum, mask=rows < TOKENS)
        if BLOCK_TAIL > 0:
            q_ptrs, query_ok = _token_block(q_base, stride_qt, stride_qd, BLOCK_HEAD, TOKENS, HEAD_DIM, BLOCK_TAIL,
                                            BLOCK_D)
            out_ptrs, _ = _token_block(out_base, stride_ot, stride_od, BLOCK_HEAD, TOKENS, HEAD_DIM, BLOCK_TAIL,
                                       BLOCK_D)
            out, row_max, row_sum = _attend_rows(tl.load(q_ptrs, mask=query_ok, other=0.0), k_head, v_head,
                                                 additive_th, k_tail, v_tail, additive_tt, scale, BLOCK_TAIL,
                                                 DOT_PRECISION)
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=query_ok)
            rows = BLOCK_HEAD + tl.arange(0, BLOCK_TAIL)
            tl.store(row_max_ptr + stats_base + rows, row_max, mask=rows < TOKENS)
            tl.store(row_sum_ptr + stats_base + rows, row_sum, mask=rows < TOKENS)


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
    BLOCK_HEAD: tl.constexpr, BLOCK_TAIL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    window = tl.program_id(0) % num_windows
    split = tl.program_id(0) // num_windows
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    additive_hh, additive_ht, additive_th, additive_tt = _additive_tiles(
        bias_ptr, mask_ptr, head, window, stride_bias_h, stride_bias_r, stride_bias_c,
        stride_mask_w, stride_mask_r, stride_mask_c, TOKENS, HAS_MASK, BLOCK_HEAD, BLOCK_TAIL)
    grad_bias_hh = tl.zeros((BLOCK_HEAD, BLOCK_HEAD), dtype=tl.float32)
    if BLOCK_TAIL > 0:
        grad_bias_ht = tl.zeros((BLOCK_HEAD, BLOCK_TAIL), dtype=tl.float32)
        grad_bias_th = tl.zeros((BLOCK_TAIL, BLOCK_HEAD), dtype=tl.float32)
        grad_bias_tt = tl.zeros((BLOCK_TAIL, BLOCK_TAIL), dtype=tl.float32)

    first_image = split * images_per_split
    for image in range(first_image, tl.minimum(first_image + images_per_split, num_images)):
        batch_window = (image * num_windows + window).to(tl.int64)
        q_base = q_ptr + batch_window * stride_qb + head * stride_qh
        k_base = k_ptr + batch_window * stride_kb + head * stride_kh
        v_base = v_ptr + batch_window * stride_vb + head * stride_vh
        grad_out_base = grad_out_ptr + batch_window * stride_gob + head * stride_goh
        # dq, dk, dv share one stride set: views of one packed (B*nW, T, 3, H, d) buffer.
        grad_base = batch_window * stride_gradb + head * stride_gradh
        stats_base = (batch_window * num_heads + head) * TOKENS

        k_head, v_head, key_head_ok, k_tail, v_tail, key_tail_ok = _load_keys(
            k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, TOKENS, HEAD_DIM, BLOCK_HEAD, BLOCK_TAIL,
            BLOCK_D)

        # Query rows of the head block: their dq whole, and their share of every key's dk and dv.
        q, grad_out, row_max, row_sum, query_ok = _load_query_rows(
            q_base, grad_out_base, row_max_ptr, row_sum_ptr, stats_base, stride_qt, stride_qd, stride_got, stride_god,
            0, TOKENS, HEAD_DIM, BLOCK_HEAD, BLOCK_D)
        probs, grad_logits, probs_tail, grad_logits_tail = _score_gradients(
            q, grad_out, row_max, row_sum, k_head, v_head, additive_hh, k_tail, v_tail, additive_ht, scale,
            BLOCK_TAIL, DOT_PRECISION)
        grad_bias_hh += grad_logits
        grad_logits_lowp = grad_logits.to(q.dtype)
        grad_q = tl.dot(grad_logits_lowp, k_head, input_precision=DOT_PRECISION)
        grad_k_head = tl.dot(tl.trans(grad_logits_lowp), q, input_precision=DOT_PRECISION)
        grad_v_head = tl.dot(tl.trans(probs.to(grad_out.dtype)), grad_out, input_precision=DOT_PRECISION)
        if BLOCK_TAIL > 0:
            grad_bias_ht += grad_logits_tail
            grad_logits_lowp = grad_logits_tail.to(q.dtype)
            grad_q = tl.dot(grad_logits_lowp, k_tail, grad_q, input_precision=DOT_PRECISION)
            grad_k_tail = tl.dot(tl.trans(grad_logits_lowp), q, input_precision=DOT_PRECISION)
            grad_v_tail = tl.dot(tl.trans(probs_tail.to(grad_out.dtype)), grad_out, input_precision=DOT_PRECISION)
        dq_ptrs, _ = _token_block(grad_q_ptr + grad_base, stride_gradt, stride_gradd, 0, TOKENS, HEAD_DIM,
                                  BLOCK_HEAD, BLOCK_D)
        tl.store(dq_ptrs, (grad_q * scale).to(grad_q_ptr.dtype.element_ty), mask=query_ok)

        if BLOCK_TAIL > 0:  # query rows of the tail block
            q, grad_out, row_max, row_sum, query_ok = _load_query_rows(
                q_base, grad_out_base, row_max_ptr, row_sum_ptr, stats_base, stride_qt, stride_qd, stride_got,
                stride_god, BLOCK_HEAD, TOKENS, HEAD_DIM, BLOCK_TAIL, BLOCK_D)
            probs, grad_logits, probs_tail, grad_logits_tail = _score_gradients(
                q, grad_out, row_max, row_sum, k_head, v_head, additive_th, k_tail, v_tail, additive_tt, scale,
                BLOCK_TAIL, DOT_PRECISION)
            grad_bias_th += grad_logits
            grad_bias_tt += grad_logits_tail
            grad_logits_lowp = grad_logits.to(q.dtype)
            grad_q = tl.dot(grad_logits_lowp, k_head, input_precision=DOT_PRECISION)
            grad_k_head = tl.dot(tl.trans(grad_logits_lowp), q, grad_k_head, input_precision=DOT_PRECISION)
            grad_v_head = tl.dot(tl.trans(probs.to(grad_out.dtype)), grad_out, grad_v_head,
                                 input_precision=DOT_PRECISION)
            grad_logits_lowp = grad_logits_tail.to(q.dtype)
            grad_q = tl.dot(grad_logits_lowp, k_tail, grad_q, input_precision=DOT_PRECISION)
            grad_k_tail = tl.dot(tl.trans(grad_logits_lowp), q, grad_k_tail, input_precision=DOT_PRECISION)
            grad_v_tail = tl.dot(tl.trans(probs_tail.to(grad_out.dtype)), grad_out, grad_v_tail,
                                 input_precision=DOT_PRECISION)
            dq_ptrs, _ = _token_block(grad_q_ptr + grad_base, stride_gradt, stride_gradd, BLOCK_HEAD, TOKENS,
                                      HEAD_DIM, BLOCK_TAIL, BLOCK_D)
            tl.store(dq_ptrs, (grad_q * scale).to(grad_q_ptr.dtype.element_ty), mask=query_ok)
            dk_ptrs, _ = _token_block(grad_k_ptr + grad_base, stride_gradt, stride_gradd, BLOCK_HEAD, TOKENS,
                                      HEAD_DIM, BLOCK_TAIL, BLOCK_D)
            dv_ptrs, _ = _token_block(grad_v_ptr + grad_base, stride_gradt, stride_gradd, BLOCK_HEAD, TOKENS,
                                      HEAD_DIM, BLOCK_TAIL, BLOCK_D)
            tl.store(dk_ptrs, (grad_k_tail * scale).to(grad_k_ptr.dtype.element_ty), mask=key_tail_ok)
            tl.store(dv_ptrs, grad_v_tail.to(grad_v_ptr.dtype.element_ty), mask=key_tail_ok)
        dk_ptrs, _ = _token_block(grad_k_ptr + grad_base, stride_gradt, stride_gradd, 0, TOKENS, HEAD_DIM,
                                  BLOCK_HEAD, BLOCK_D)
        dv_ptrs, _ = _token_block(grad_v_ptr + grad_base, stride_gradt, stride_gradd, 0, TOKENS, HEAD_DIM,
                                  BLOCK_HEAD, BLOCK_D)
        tl.store(dk_ptrs, (grad_k_head * scale).to(grad_k_ptr.dtype.element_ty), mask=key_head_ok)
        tl.store(dv_ptrs, grad_v_head.to(grad_v_ptr.dtype.element_ty), mask=key_head_ok)

    partials = grad_bias_partials_ptr + (tl.program_id(0) * num_heads + head).to(tl.int64) * TOKENS * TOKENS
    rows, cols, tile_ok = _square_tile(0, 0, TOKENS, BLOCK_HEAD, BLOCK_HEAD)
    tl.store(partials + rows[:, None] * TOKENS + cols[None, :], grad_bias_hh, mask=tile_ok)
    if BLOCK_TAIL > 0:
        rows, cols, tile_ok = _square_tile(0, BLOCK_HEAD, TOKENS, BLOCK_HEAD, BLOCK_TAIL)
        tl.store(partials + rows[:, None] * TOKENS + cols[None, :], grad_bias_ht, mask=tile_ok)
        rows, cols, tile_ok = _square_tile(BLOCK_HEAD, 0, TOKENS, BLOCK_TAIL, BLOCK_HEAD)
        tl.store(partials + rows[:, None] * TOKENS + cols[None, :], grad_bias_th, mask=tile_ok)
        rows, cols, tile_ok = _square_tile(BLOCK_HEAD, BLOCK_HEAD, TOKENS, BLOCK_TAIL, BLOCK_TAIL)
        tl.store(partials + rows[:, None] * TOKENS + cols[None, :], grad_bias_tt, mask=tile_ok)


# The blocks follow the window, and the warps are fixed too (the row sums are cross-thread tl.sums whose
# bits follow the warp layout): only stages are tuned; the dBias partials follow the image slices, not
# the config. configs[0] is the default. The forward: one warpgroup, 3 stages of prefetch. The backward
# (sm_90 ptxas, Swin-B 192 w6 and 224 w7): with one 64-block, its (T x T) dBias accumulator spills
# 56-64 B/thread on 4 warps and nothing on 8 (1 CTA/SM); split into 32 + 16 blocks (mma.sync, operands
# in registers) it runs 255 registers on 4 warps with no spill at 3 stages (8 B at 1 or 2): 2 CTAs/SM.
_KEY = ["TOKENS", "HEAD_DIM", "HAS_MASK", "DOT_PRECISION"]
_fwd = autotune([triton.Config({}, num_warps=4, num_stages=s) for s in (3, 2)], _KEY)(_window_attention_fwd_kernel)
_bwd_one_block = autotune([triton.Config({}, num_warps=8, num_stages=s) for s in (2, 3)],
                          _KEY)(_window_attention_bwd_kernel)
_bwd_split = autotune([triton.Config({}, num_warps=4, num_stages=s) for s in (3, 2)], _KEY)(_window_attention_bwd_kernel)


def _launch_geometry(q: torch.Tensor, window_mask: Optional[torch.Tensor], target_programs: int) -> dict:
    """Image slices for about ``target_programs`` programs, the grid and the constexprs of a launch."""
    batch_windows, heads, tokens, head_dim = q.shape
    num_windows = 1 if window_mask is None else window_mask.shape[0]
    num_images = batch_windows // num_windows
    splits = max(1, min(num_images, target_programs // (heads * num_windows)))
    images_per_split = cdiv(num_images, splits)
    splits = cdiv(num_images, images_per_split)
    return dict(
        grid=(splits * num_windows, heads),
        num_images=num_images, images_per_split=images_per_split, num_windows=num_windows,
        constexprs=dict(
            TOKENS=tokens, HEAD_DIM=head_dim, HAS_MASK=window_mask is not None,
            DOT_PRECISION=dot_precision(q.dtype),
            **token_blocks(tokens), BLOCK_D=max(16, next_power_of_2(head_dim)),
        ),
    )


def token_blocks(tokens: int) -> dict:
    """The window's rows (and keys) as a power-of-two head block and, where that pads less, a tail block:
    36 tokens (6x6 windows) as 32 + 16 (48 x 48 tiles, the 16-row tensor-core floor: 1.78x the useful
    MMA work, where one 64-block is 3.16x); 49 as one 64-block (32 + 32 pads alike, in smaller tiles)."""
    whole = max(16, next_power_of_2(tokens))
    head = whole // 2
    tail = max(16, next_power_of_2(tokens - head)) if head >= 16 else whole
    if head + tail < whole:
        return dict(BLOCK_HEAD=head, BLOCK_TAIL=tail)
    return dict(BLOCK_HEAD=whole, BLOCK_TAIL=0)


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
    backward_kernel = _bwd_split if geometry["constexprs"]["BLOCK_TAIL"] else _bwd_one_block
    with on_device_of(q):
        backward_kernel[geometry["grid"]](
            q, k, v, grad_out, row_stats[0], row_stats[1], bias, mask, grad_q, grad_k, grad_v, grad_bias_partials,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *grad_q.stride(), *bias.stride(),
            *mask_strides, geometry["num_images"], geometry["images_per_split"], geometry["num_windows"], scale,
            **geometry["constexprs"],
        )
    return dqkv, grad_bias_partials.sum(0)  # a fixed-order sum: the same bits every run


# ---- the op: torch.library registration, so Dynamo sees one opaque node ---------------------------

def _window_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                              window_mask: Optional[torch.Tensor], scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, bias, window_mask, scale)


_window_attention_op = custom_op("simmim_fast_triton::window_attention", _window_attention_forward)


@_window_attention_op.register_fake
def _(q, k, v, bias, window_mask, scale):
    batch_windows, heads, tokens, head_dim = q.shape
    whole = _whole_windows(tokens, head_dim)
    stats_shape = (2, batch_windows, heads, tokens) if whole else (batch_windows, heads, tokens)
    return (q.new_empty((batch_windows, tokens, heads, head_dim)).transpose(1, 2),
            q.new_empty(stats_shape, dtype=torch.float32))


def _window_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               bias: torch.Tensor, window_mask: Optional[torch.Tensor], out: torch.Tensor,
                               row_stats: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    dqkv, dbias = _backward(grad_out, q, k, v, bias, window_mask, out, row_stats, scale)
    return dqkv, dbias.contiguous()  # the flash path's is a transposed view


_window_attention_backward_op = custom_op("simmim_fast_triton::window_attention_backward", _window_attention_backward)


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
    dqkv, dbias = _call_backward(grad_out, q, k, v, bias, window_mask, out, row_stats, ctx.scale)
    dq, dk, dv = packed_qkv_gradient(dqkv, ctx.needs_input_grad[:3])
    return dq, dk, dv, dbias.to(bias.dtype) if ctx.needs_input_grad[3] else None, None, None


_call_backward = eager_or_op(_window_attention_backward_op)
_call = eager_or_op_with_autograd(_window_attention_op, _backward_formula, _setup_context)


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
    return _call(q, k, v, bias, window_mask, scale)[0]
