"""Mask-token substitution: ``tokens * (1 - w) + mask_token * w`` for the 0/1 token mask w.

Same signature and meaning as ``simmim_fast.reference.mask_token_blend``; the output dtype is the
promotion of tokens' and mask_token's, as the reference's arithmetic gives. With w in {0, 1} the blend
is a select, which the kernel does: masked tokens are not read (non-finite values there do not
propagate, where the reference's ``x * 0`` would give NaN). Tokens may have any strides.

Backward: d tokens = g * (1 - w); d mask_token = sum of g over masked tokens, as per-program partials
over fixed token blocks summed in a fixed order (deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE_ELEMENTS = 4096


@triton.jit
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


@triton.jit
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
    block_d = min(triton.next_power_of_2(dim), 256)
    return _TILE_ELEMENTS // block_d, block_d


class _MaskTokenBlend(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, mask, mask_token):
        batch, length, dim = tokens.shape
        num_rows = batch * length
        flat_mask = mask.reshape(num_rows).contiguous()
        out = torch.empty((batch, length, dim), device=tokens.device,
                          dtype=torch.promote_types(tokens.dtype, mask_token.dtype))
        block_rows, block_d = _blocks(dim)
        _mask_token_blend_fwd_kernel[(triton.cdiv(num_rows, block_rows), triton.cdiv(dim, block_d))](
            out, tokens, flat_mask, mask_token.reshape(dim).contiguous(), num_rows, length, dim, *tokens.stride(),
            BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=8,
        )
        ctx.save_for_backward(flat_mask)
        ctx.dtypes = (tokens.dtype, mask_token.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (flat_mask,) = ctx.saved_tensors
        tokens_dtype, mask_token_dtype = ctx.dtypes
        grad_tokens_needed, _, grad_mask_token_needed = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        batch, length, dim = grad_out.shape
        num_rows = batch * length
        block_rows, block_d = _blocks(dim)
        col_blocks = triton.cdiv(dim, block_d)
        if grad_out.is_cuda:
            target_programs = 4 * torch.cuda.get_device_properties(grad_out.device).multi_processor_count
        else:
            target_programs = 4
        row_programs = max(1, min(triton.cdiv(num_rows, block_rows), target_programs // col_blocks))
        grad_tokens = (torch.empty((batch, length, dim), device=grad_out.device, dtype=tokens_dtype)
                       if grad_tokens_needed else None)
        part_mask_token = (torch.empty((row_programs, dim), device=grad_out.device, dtype=torch.float32)
                           if grad_mask_token_needed else None)
        _mask_token_blend_bwd_kernel[(row_programs, col_blocks)](
            grad_tokens, part_mask_token, grad_out, flat_mask, num_rows, dim,
            GRAD_TOKENS=grad_tokens_needed, GRAD_MASK_TOKEN=grad_mask_token_needed,
            BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=8,
        )
        grad_mask_token = (part_mask_token.sum(0).view(1, 1, dim).to(mask_token_dtype)
                           if grad_mask_token_needed else None)
        return grad_tokens, None, grad_mask_token


def mask_token_blend(tokens: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    return _MaskTokenBlend.apply(tokens, mask, mask_token)
