"""Mask-token substitution: ``tokens * (1 - w) + mask_token * w`` for the 0/1 token mask w.

Same signature and meaning as ``simmim_fast.reference.mask_token_blend``; the output dtype is the
promotion of tokens' and mask_token's, as the reference's arithmetic gives. With w in {0, 1} the blend
is a select, which the kernel does: masked tokens are not read (non-finite values there do not
propagate, where the reference's ``x * 0`` would give NaN). Tokens may have any strides.

Backward: d tokens = g * (1 - w); d mask_token = sum of g over masked tokens, as per-program partials
over fixed token blocks summed in a fixed order (deterministic: the backward's warps are fixed too,
since they lay out the tile that tl.sum reduces).

Registered as the custom ops ``simmim_fast_triton::mask_token_blend`` and ``..._backward`` (fake
implementations, autograd): torch.compile treats them as opaque calls.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._autotune import autotune
from ._eager import custom_op, eager_or_op, eager_or_op_with_autograd
from ._launch import cdiv, next_power_of_2, on_device_of, sm_count

_TILE_ELEMENTS = 4096


@autotune([triton.Config({}, num_warps=8), triton.Config({}, num_warps=4)], key=["dim", "BLOCK_ROWS", "BLOCK_D"])
@triton.jit(do_not_specialize=["num_rows"])
def _mask_token_blend_fwd_kernel(
    out_ptr, tokens_ptr, mask_ptr, mask_token_ptr,
    num_rows, length, dim, stride_b, stride_l, stride_d,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # rows b*L + l
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows_valid = rows < num_rows
    d_valid = d < dim
    valid = rows_valid[:, None] & d_valid[None, :]
    masked = tl.load(mask_ptr + rows, mask=rows_valid, other=0) != 0
    token_rows = (rows // length).to(tl.int64) * stride_b + (rows % length) * stride_l
    tokens = tl.load(tokens_ptr + token_rows[:, None] + d[None, :] * stride_d, mask=valid & ~masked[:, None], other=0.0)
    mask_token = tl.load(mask_token_ptr + d, mask=d_valid, other=0.0)
    out = tl.where(masked[:, None], mask_token.to(tl.float32)[None, :], tokens.to(tl.float32))
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * dim + d[None, :], out.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["num_rows"])
def _mask_token_blend_bwd_kernel(
    grad_tokens_ptr, grad_mask_token_part_ptr, grad_out_ptr, mask_ptr,
    num_rows, dim,
    GRAD_TOKENS: tl.constexpr, GRAD_MASK_TOKEN: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (p, j) walks the row blocks p, p + P, ... of column block j; its mask-token partial is row p."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_valid = d < dim
    grad_mask_token = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
    for start in range(pid * BLOCK_ROWS, num_rows, num_programs * BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        rows_valid = rows < num_rows
        valid = rows_valid[:, None] & d_valid[None, :]
        masked = (tl.load(mask_ptr + rows, mask=rows_valid, other=0) != 0)[:, None]
        offsets = rows.to(tl.int64)[:, None] * dim + d[None, :]
        grad = tl.load(grad_out_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        if GRAD_TOKENS:
            tl.store(grad_tokens_ptr + offsets, tl.where(masked, 0.0, grad).to(grad_tokens_ptr.dtype.element_ty),
                     mask=valid)
        if GRAD_MASK_TOKEN:
            grad_mask_token += tl.where(masked, grad, 0.0)
    if GRAD_MASK_TOKEN:
        tl.store(grad_mask_token_part_ptr + pid * dim + d, tl.sum(grad_mask_token, axis=0), mask=d_valid)


def _blocks(dim: int):
    block_d = min(next_power_of_2(dim), 256)
    return _TILE_ELEMENTS // block_d, block_d


def _launch_forward(tokens: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    batch, length, dim = tokens.shape
    num_rows = batch * length
    out = torch.empty((batch, length, dim), device=tokens.device,
                      dtype=torch.promote_types(tokens.dtype, mask_token.dtype))
    block_rows, block_d = _blocks(dim)
    with on_device_of(tokens):
        _mask_token_blend_fwd_kernel[(cdiv(num_rows, block_rows), cdiv(dim, block_d))](
            out, tokens, mask.reshape(num_rows).contiguous(), mask_token.reshape(dim).contiguous(), num_rows, length,
            dim, *tokens.stride(), BLOCK_ROWS=block_rows, BLOCK_D=block_d,
        )
    return out


_forward_op = custom_op("simmim_fast_triton::mask_token_blend", _launch_forward)


@_forward_op.register_fake
def _(tokens, mask, mask_token):
    return tokens.new_empty(tokens.shape, dtype=torch.promote_types(tokens.dtype, mask_token.dtype))


def _launch_backward(grad_out: torch.Tensor, mask: torch.Tensor, tokens_dtype: torch.dtype,
                                  mask_token_dtype: torch.dtype, grad_tokens_needed: bool,
                                  grad_mask_token_needed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d tokens, d mask_token); an empty tensor stands for a gradient not needed."""
    grad_out = grad_out.contiguous()
    batch, length, dim = grad_out.shape
    num_rows = batch * length
    block_rows, block_d = _blocks(dim)
    col_blocks = cdiv(dim, block_d)
    row_programs = max(1, min(cdiv(num_rows, block_rows), 4 * sm_count(grad_out.device) // col_blocks))
    grad_tokens = (grad_out.new_empty((batch, length, dim), dtype=tokens_dtype) if grad_tokens_needed
                   else grad_out.new_empty(0, dtype=tokens_dtype))
    part_mask_token = (grad_out.new_empty((row_programs, dim), dtype=torch.float32) if grad_mask_token_needed
                       else None)
    with on_device_of(grad_out):
        _mask_token_blend_bwd_kernel[(row_programs, col_blocks)](
            grad_tokens, part_mask_token, grad_out, mask.reshape(num_rows).contiguous(), num_rows, dim,
            GRAD_TOKENS=grad_tokens_needed, GRAD_MASK_TOKEN=grad_mask_token_needed,
            BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=8,
        )
    grad_mask_token = (part_mask_token.sum(0).view(1, 1, dim).to(mask_token_dtype) if grad_mask_token_needed
                       else grad_out.new_empty(0, dtype=mask_token_dtype))
    return grad_tokens, grad_mask_token


_backward_op = custom_op("simmim_fast_triton::mask_token_blend_backward", _launch_backward)


@_backward_op.register_fake
def _(grad_out, mask, tokens_dtype, mask_token_dtype, grad_tokens_needed, grad_mask_token_needed):
    dim = grad_out.shape[-1]
    return (grad_out.new_empty(grad_out.shape if grad_tokens_needed else (0,), dtype=tokens_dtype),
            grad_out.new_empty((1, 1, dim) if grad_mask_token_needed else (0,), dtype=mask_token_dtype))


def _save_for_backward(ctx, inputs, output):
    tokens, mask, mask_token = inputs
    ctx.save_for_backward(mask)
    ctx.dtypes = (tokens.dtype, mask_token.dtype)


def _backward(ctx, grad_out):
    (mask,) = ctx.saved_tensors
    grad_tokens_needed, _, grad_mask_token_needed = ctx.needs_input_grad
    grad_tokens, grad_mask_token = _call_backward(grad_out, mask, *ctx.dtypes, grad_tokens_needed,
                                                  grad_mask_token_needed)
    return (grad_tokens if grad_tokens_needed else None, None,
            grad_mask_token if grad_mask_token_needed else None)


_call_backward = eager_or_op(_backward_op)
_call = eager_or_op_with_autograd(_forward_op, _backward, _save_for_backward)


def mask_token_blend(tokens: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    return _call(tokens, mask, mask_token)
