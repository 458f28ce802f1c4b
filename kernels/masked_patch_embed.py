"""Masked patch embedding in one kernel: patchify, projection, patch LayerNorm, mask-token blend, positions.

Same signature and meaning as ``simmim_fast.reference.masked_patch_embed``. Patches are read straight
from the image by index arithmetic (any strides, no unfold copy) and projected with ``tl.dot`` by the
Conv2d weight viewed as (D, C*p*p).

Masked tokens (mask != 0; masks are 0/1) output the mask token whatever their patch holds, so they get
no projection, and no gradient reaches weight, bias, the LayerNorm or the image through them. Each
call orders the tokens visible-first on the device (a cumsum and a scatter, no host sync); a kernel
reads the visible count from memory and skips every block past it.

dtypes follow the reference: under autocast the projection runs in the autocast dtype (fp32
accumulation, output rounded to it) and LayerNorm in fp32; the blend promotes with mask_token's dtype
and the positions with pos_embed's. fp32 products are full fp32 (never TF32, which cuDNN may use for
the reference conv).

Backward: one kernel over the visible tokens for weight, bias and LayerNorm grads (recomputing the
conv output for the LayerNorm backward, cheaper than storing it), one streaming pass over grad_out
for mask_token and pos_embed, and the image grad only when the image requires it. Reductions are
per-split partials summed in a fixed order (no atomics), so every gradient is deterministic. Tuning
never changes the bits: the tiles are fixed by the launchers (the weight grad's token block fixes its
summation order), and the warps too wherever they lay out a tile that tl.sum reduces (the LayerNorm,
the bias and mask-token partials); only the rest tunes warps, and stages everywhere.

Grids: token blocks are on grid axis 0 (axes 1 and 2 stop at 65535: Swin's 48x48 tokens at 192 px
pass that from batch 1821). The image gradient comes back in the image's memory format
(channels_last in, channels_last out). Registered as the custom ops
``simmim_fast_triton::masked_patch_embed`` and ``..._backward`` (fake implementations, autograd):
torch.compile treats them as opaque calls.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._autotune import autotune
from ._compaction import selected_first_order
from ._eager import custom_op, eager_or_op, eager_or_op_with_autograd
from ._launch import cdiv, next_power_of_2, on_device_of, sm_count

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# Rows x columns held per program when a full LayerNorm row must fit (64 tokens x 256 channels).
_TILE_ELEMENTS = 64 * 256
# K step of the backward's recompute of the conv output for patch_norm: narrow weight tiles leave the
# registers to the row-sized tiles (wider steps spill on sm_90).
_RECOMPUTE_BLOCK_K = 16


def _configs(*schedules):
    """triton.Configs from (num_warps, num_stages); the first is the default (tuning off, the interpreter)."""
    return [triton.Config({}, num_warps=warps, num_stages=stages) for warps, stages in schedules]


def _default_warps_with_norm(configs, named_args, **kwargs):
    """With patch_norm the LayerNorm's tl.sum reduces over a layout set by num_warps: keep the default's warps so
    the bits do not depend on the tuner's pick (and 4-warp tiles of a whole 128-channel row spill there)."""
    if not kwargs["HAS_NORM"]:
        return configs
    return [config for config in configs if config.num_warps == configs[0].num_warps]


_PROJECTION_CONFIGS = _configs((8, 2), (4, 2), (8, 3), (4, 3))
_PROJECTION_KEY = ["D", "K", "PATCH", "HAS_NORM", "DOT_DTYPE", "BLOCK_M", "BLOCK_D", "BLOCK_K"]
# The weight grad's token block BLOCK_M is its summation order: fixed by the launcher (_weight_grad_block_m), with
# 8 warps, whose layout the bias and LayerNorm partial sums reduce over; stages alone are tuned.
_WEIGHT_GRAD_WARPS = 8
_WEIGHT_GRAD_CONFIGS = _configs((_WEIGHT_GRAD_WARPS, 2), (_WEIGHT_GRAD_WARPS, 3))


@triton.jit
def _patch_offsets(tokens, k, tokens_per_image, grid_w, stride_b, stride_c, stride_h, stride_w,
                   PATCH: tl.constexpr):
    """Offsets of feature k = (c, py, px) of each token's patch: a per-token plus a per-feature part."""
    b = tokens // tokens_per_image
    cell = tokens % tokens_per_image
    token_offset = (b.to(tl.int64) * stride_b + (cell // grid_w) * PATCH * stride_h
                    + (cell % grid_w) * PATCH * stride_w)
    channel = k // (PATCH * PATCH)
    within = k % (PATCH * PATCH)
    feature_offset = channel * stride_c + (within // PATCH) * stride_h + (within % PATCH) * stride_w
    return token_offset[:, None] + feature_offset[None, :]


@triton.jit
def _project_patches(image_ptr, weight_ptr, bias_ptr, tokens, rows_valid, d, d_valid,
                     tokens_per_image, grid_w, K, stride_b, stride_c, stride_h, stride_w, stride_wd, stride_wk,
                     PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """The conv output (BLOCK_M, BLOCK_D) of the tokens' patches, rounded to DOT_DTYPE as the conv's."""
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_valid = k < K
        pixels = tl.load(image_ptr + _patch_offsets(tokens, k, tokens_per_image, grid_w, stride_b, stride_c,
                                                    stride_h, stride_w, PATCH),
                         mask=rows_valid[:, None] & k_valid[None, :], other=0.0)
        weight = tl.load(weight_ptr + d[:, None] * stride_wd + k[None, :] * stride_wk,
                         mask=d_valid[:, None] & k_valid[None, :], other=0.0)
        acc = tl.dot(pixels.to(DOT_DTYPE), tl.trans(weight.to(DOT_DTYPE)), acc, input_precision="ieee")
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=d_valid, other=0.0)
        acc += bias.to(DOT_DTYPE).to(tl.float32)[None, :]
    return acc.to(DOT_DTYPE).to(tl.float32)


@triton.jit
def _normalize(x, d_valid, D, eps):
    """(x - mean) * rstd over the D valid columns of each row, in fp32; also rstd."""
    mean = tl.sum(x, axis=1) / D
    centered = tl.where(d_valid[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / D + eps)
    return centered * rstd[:, None], rstd


@triton.jit
def _grad_at_projection(grad_out_ptr, image_ptr, weight_ptr, bias_ptr, norm_weight_ptr, tokens, visible, d, d_valid,
                        tokens_per_image, grid_w, D, K, eps, stride_b, stride_c, stride_h, stride_w, stride_wd,
                        stride_wk, PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                        PROJECT_K: tl.constexpr):
    """(grad at the conv output, grad at the norm output, x_hat) of visible tokens over columns d.

    Visible tokens have blend weight 0, so the output grad reaches the norm (or conv) output unchanged.
    With patch_norm (BLOCK_D covers D) the LayerNorm backward recomputes the conv output from the image,
    cheaper than storing it in the forward; x_hat is zeros without it.
    """
    grad_out = tl.load(grad_out_ptr + tokens.to(tl.int64)[:, None] * D + d[None, :],
                       mask=visible[:, None] & d_valid[None, :], other=0.0).to(tl.float32)
    if HAS_NORM:
        x = _project_patches(image_ptr, weight_ptr, bias_ptr, tokens, visible, d, d_valid, tokens_per_image, grid_w,
                             K, stride_b, stride_c, stride_h, stride_w, stride_wd, stride_wk, PATCH, HAS_BIAS,
                             DOT_DTYPE, BLOCK_M, BLOCK_D, PROJECT_K)
        x_hat, rstd = _normalize(x, d_valid, D, eps)
        gamma = tl.load(norm_weight_ptr + d, mask=d_valid, other=0.0).to(tl.float32)
        grad_x_hat = grad_out * gamma[None, :]
        mean_grad = tl.sum(grad_x_hat, axis=1) / D
        mean_grad_x_hat = tl.sum(grad_x_hat * x_hat, axis=1) / D
        grad = (grad_x_hat - mean_grad[:, None] - x_hat * mean_grad_x_hat[:, None]) * rstd[:, None]
        grad = tl.where(visible[:, None] & d_valid[None, :], grad, 0.0)
    else:
        grad = grad_out
        x_hat = tl.zeros_like(grad_out)
    return grad, grad_out, x_hat


@autotune(_PROJECTION_CONFIGS, key=_PROJECTION_KEY, prune=_default_warps_with_norm)
@triton.jit(do_not_specialize=["num_tokens"], do_not_specialize_on_alignment=["num_visible_ptr"])
def _masked_patch_embed_fwd_kernel(
    out_ptr, image_ptr, weight_ptr, bias_ptr, mask_token_ptr, pos_ptr, norm_weight_ptr, norm_bias_ptr,
    order_ptr, num_visible_ptr,
    num_tokens, tokens_per_image, grid_w, D, K, eps,
    stride_b, stride_c, stride_h, stride_w, stride_wd, stride_wk,
    PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_NORM: tl.constexpr,
    DOT_DTYPE: tl.constexpr, NORM_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # D tiles of one token block are neighbouring programs, so the block's pixels are re-read from L2.
    num_d = tl.cdiv(D, BLOCK_D)
    pid_m = tl.program_id(0) // num_d
    d = (tl.program_id(0) % num_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d_valid = d < D
    rows_valid = rows < num_tokens
    tokens = tl.load(order_ptr + rows, mask=rows_valid, other=0)
    num_visible = tl.load(num_visible_ptr)
    visible = rows < num_visible

    mask_token = tl.load(mask_token_ptr + d, mask=d_valid, other=0.0).to(tl.float32)
    out = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32) + mask_token[None, :]
    if pid_m * BLOCK_M < num_visible:
        x = _project_patches(image_ptr, weight_ptr, bias_ptr, tokens, visible, d, d_valid, tokens_per_image, grid_w,
                             K, stride_b, stride_c, stride_h, stride_w, stride_wd, stride_wk, PATCH, HAS_BIAS,
                             DOT_DTYPE, BLOCK_M, BLOCK_D, BLOCK_K)
        if HAS_NORM:
            x_hat, _ = _normalize(x, d_valid, D, eps)
            gamma = tl.load(norm_weight_ptr + d, mask=d_valid, other=0.0).to(tl.float32)
            beta = tl.load(norm_bias_ptr + d, mask=d_valid, other=0.0).to(tl.float32)
            x = (x_hat * gamma[None, :] + beta[None, :]).to(NORM_DTYPE).to(tl.float32)
        out = tl.where(visible[:, None], x, out)
    if HAS_POS:
        cells = tokens % tokens_per_image
        out += tl.load(pos_ptr + cells[:, None] * D + d[None, :],
                       mask=rows_valid[:, None] & d_valid[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rows_valid[:, None] & d_valid[None, :])


@autotune(_WEIGHT_GRAD_CONFIGS, key=_PROJECTION_KEY)
@triton.jit(do_not_specialize=["num_splits"], do_not_specialize_on_alignment=["num_visible_ptr"])
def _masked_patch_embed_bwd_kernel(
    grad_weight_part_ptr, grad_bias_part_ptr, grad_norm_weight_part_ptr, grad_norm_bias_part_ptr,
    grad_out_ptr, image_ptr, weight_ptr, bias_ptr, norm_weight_ptr, order_ptr, num_visible_ptr,
    num_splits, tokens_per_image, grid_w, D, K, eps,
    stride_b, stride_c, stride_h, stride_w, stride_wd, stride_wk,
    PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, PROJECT_K: tl.constexpr,
):
    """Split s of the (D, K) weight tile sums over visible token blocks s, s + num_splits, ...; the bias and
    LayerNorm partials come from the programs of the first K tile."""
    pid_d = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    d_valid = d < D
    k_valid = k < K
    num_visible = tl.load(num_visible_ptr)

    grad_weight = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
    grad_bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    grad_gamma = tl.zeros((BLOCK_D,), dtype=tl.float32)
    grad_beta = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(split * BLOCK_M, num_visible, num_splits * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        visible = rows < num_visible
        tokens = tl.load(order_ptr + rows, mask=visible, other=0)
        grad, grad_out, x_hat = _grad_at_projection(
            grad_out_ptr, image_ptr, weight_ptr, bias_ptr, norm_weight_ptr, tokens, visible, d, d_valid,
            tokens_per_image, grid_w, D, K, eps, stride_b, stride_c, stride_h, stride_w, stride_wd, stride_wk,
            PATCH, HAS_BIAS, HAS_NORM, DOT_DTYPE, BLOCK_M, BLOCK_D, PROJECT_K)
        pixels = tl.load(image_ptr + _patch_offsets(tokens, k, tokens_per_image, grid_w, stride_b, stride_c,
                                                    stride_h, stride_w, PATCH),
                         mask=visible[:, None] & k_valid[None, :], other=0.0)
        grad_weight = tl.dot(tl.trans(grad.to(DOT_DTYPE)), pixels.to(DOT_DTYPE), grad_weight,
                             input_precision="ieee")
        grad_bias += tl.sum(grad, axis=0)
        if HAS_NORM:
            grad_gamma += tl.sum(grad_out * x_hat, axis=0)
            grad_beta += tl.sum(grad_out, axis=0)

    part_weight = grad_weight_part_ptr + split.to(tl.int64) * D * K
    tl.store(part_weight + d[:, None] * K + k[None, :], grad_weight, mask=d_valid[:, None] & k_valid[None, :])
    if pid_k == 0:
        if HAS_BIAS:
            tl.store(grad_bias_part_ptr + split * D + d, grad_bias, mask=d_valid)
        if HAS_NORM:
            tl.store(grad_norm_weight_part_ptr + split * D + d, grad_gamma, mask=d_valid)
            tl.store(grad_norm_bias_part_ptr + split * D + d, grad_beta, mask=d_valid)


# Warps fixed: the mask-token partial is a tl.sum over the tile's layout.
@autotune(_configs((4, 2), (4, 3)), key=["D", "POS_GRAD", "BLOCK_L", "BLOCK_D"])
@triton.jit(do_not_specialize=["batch", "num_splits"])
def _masked_patch_embed_bwd_tokens_kernel(
    grad_pos_part_ptr, grad_mask_token_part_ptr, grad_out_ptr, masked_ptr,
    batch, num_splits, tokens_per_image, D,
    POS_GRAD: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Over every token, images split, split + num_splits, ... of a block of positions: partial sums of
    pos_embed's grad (over the batch) and of mask_token's (over the masked tokens)."""
    cell_block = tl.program_id(0)
    split = tl.program_id(2)
    cells = cell_block * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cells_valid = cells < tokens_per_image
    d_valid = d < D
    valid = cells_valid[:, None] & d_valid[None, :]
    grad_pos = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    grad_mask_token = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for b in range(split, batch, num_splits):
        tokens = (b * tokens_per_image + cells).to(tl.int64)
        grad_out = tl.load(grad_out_ptr + tokens[:, None] * D + d[None, :], mask=valid, other=0.0).to(tl.float32)
        masked = tl.load(masked_ptr + tokens, mask=cells_valid, other=0) != 0
        grad_pos += grad_out
        grad_mask_token += tl.where(masked[:, None], grad_out, 0.0)
    if POS_GRAD:
        part_pos = grad_pos_part_ptr + split.to(tl.int64) * tokens_per_image * D
        tl.store(part_pos + cells[:, None] * D + d[None, :], grad_pos, mask=valid)
    part_mask_token = grad_mask_token_part_ptr + (split * tl.num_programs(0) + cell_block) * D
    tl.store(part_mask_token + d, tl.sum(grad_mask_token, axis=0), mask=d_valid)


@autotune(_PROJECTION_CONFIGS, key=_PROJECTION_KEY, prune=_default_warps_with_norm)
@triton.jit(do_not_specialize_on_alignment=["num_visible_ptr"])
def _masked_patch_embed_bwd_image_kernel(
    grad_image_ptr, grad_out_ptr, image_ptr, weight_ptr, bias_ptr, norm_weight_ptr, order_ptr, num_visible_ptr,
    tokens_per_image, grid_w, D, K, eps,
    stride_b, stride_c, stride_h, stride_w, stride_wd, stride_wk,
    grad_stride_b, grad_stride_c, grad_stride_h, grad_stride_w,
    PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, PROJECT_K: tl.constexpr,
):
    """Image grad of visible patches (grad @ W); masked patches keep the zeros they were allocated with."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    num_visible = tl.load(num_visible_ptr)
    if tl.program_id(0) * BLOCK_M < num_visible:
        visible = rows < num_visible
        tokens = tl.load(order_ptr + rows, mask=visible, other=0)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_valid = k < K
        grad_pixels = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):  # a single step with patch_norm, whose BLOCK_D covers D
            d = d0 + tl.arange(0, BLOCK_D)
            d_valid = d < D
            grad, _, _ = _grad_at_projection(
                grad_out_ptr, image_ptr, weight_ptr, bias_ptr, norm_weight_ptr, tokens, visible, d, d_valid,
                tokens_per_image, grid_w, D, K, eps, stride_b, stride_c, stride_h, stride_w, stride_wd, stride_wk,
                PATCH, HAS_BIAS, HAS_NORM, DOT_DTYPE, BLOCK_M, BLOCK_D, PROJECT_K)
            weight = tl.load(weight_ptr + d[:, None] * stride_wd + k[None, :] * stride_wk,
                             mask=d_valid[:, None] & k_valid[None, :], other=0.0)
            grad_pixels = tl.dot(grad.to(DOT_DTYPE), weight.to(DOT_DTYPE), grad_pixels,
                                 input_precision="ieee")
        offsets = _patch_offsets(tokens, k, tokens_per_image, grid_w, grad_stride_b, grad_stride_c, grad_stride_h,
                                 grad_stride_w, PATCH)
        tl.store(grad_image_ptr + offsets, grad_pixels.to(grad_image_ptr.dtype.element_ty),
                 mask=visible[:, None] & k_valid[None, :])


def _launch_shapes(dim: int, features: int, has_norm: bool):
    """(BLOCK_M, BLOCK_D, BLOCK_K) of the projection kernels. patch_norm needs a whole channel row per program,
    so BLOCK_M and BLOCK_K shrink as D grows."""
    block_d = max(16, next_power_of_2(dim)) if has_norm else max(16, min(128, next_power_of_2(dim)))
    block_m = max(16, min(64, _TILE_ELEMENTS // block_d))
    block_k = max(16, min(64, next_power_of_2(features), _TILE_ELEMENTS // 2 // block_d))
    return block_m, block_d, block_k


def _weight_grad_block_m(block_d: int, has_norm: bool) -> int:
    """The weight grad's token block: BLOCK_M x BLOCK_D within _TILE_ELEMENTS, and with patch_norm (whose recompute
    holds several such fp32 tiles) within 16 values per thread, beyond which sm_90 spills
    (tests/test_kernel_compile.py reads the compiled kernels' spills)."""
    limit = 16 * 32 * _WEIGHT_GRAD_WARPS if has_norm else _TILE_ELEMENTS
    return max(16, min(64, limit // block_d))


def _visible_first_order(mask: torch.Tensor):
    """A permutation of the B*L tokens with the visible ones first (each group in token order), the visible
    count as a device tensor (1,), and the 0/1 masked flag per token; no host sync."""
    masked = mask.reshape(-1) != 0
    order, num_visible = selected_first_order(~masked)
    return order, num_visible, masked.to(torch.uint8)


def _launch_forward(
    image: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    mask_token: torch.Tensor, pos_embed: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor], norm_eps: float, dot_dtype: torch.dtype, norm_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, visible-first token order, visible count, 0/1 masked flag per token): the output and what the
    backward needs."""
    batch, _, height, width = image.shape
    dim, _, patch, _ = weight.shape
    grid_w = width // patch
    tokens_per_image = (height // patch) * grid_w
    num_tokens = batch * tokens_per_image
    weight_2d = weight.reshape(dim, -1)
    features = weight_2d.shape[1]
    has_norm = norm_weight is not None
    # The kernels index the per-channel vectors and pos_embed densely.
    bias, norm_weight, norm_bias, pos = (None if t is None else t.contiguous()
                                         for t in (bias, norm_weight, norm_bias, pos_embed))
    order, num_visible, masked = _visible_first_order(mask)
    block_m, block_d, block_k = _launch_shapes(dim, features, has_norm)

    out = torch.empty((batch, tokens_per_image, dim), device=image.device, dtype=out_dtype)
    with on_device_of(image):
        _masked_patch_embed_fwd_kernel[(cdiv(dim, block_d) * cdiv(num_tokens, block_m),)](
            out, image, weight_2d, bias, mask_token.reshape(dim).contiguous(), pos, norm_weight, norm_bias,
            order, num_visible,
            num_tokens, tokens_per_image, grid_w, dim, features, norm_eps,
            *image.stride(), *weight_2d.stride(),
            PATCH=patch, HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None, HAS_NORM=has_norm,
            DOT_DTYPE=_TL_DTYPES[dot_dtype], NORM_DTYPE=_TL_DTYPES[norm_dtype],
            BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_K=block_k,
        )
    return out, order, num_visible, masked


_forward_op = custom_op("simmim_fast_triton::masked_patch_embed", _launch_forward)


@_forward_op.register_fake
def _(image, mask, weight, bias, mask_token, pos_embed, norm_weight, norm_bias, norm_eps, dot_dtype, norm_dtype,
      out_dtype):
    batch, _, height, width = image.shape
    dim, _, patch, _ = weight.shape
    num_tokens = batch * (height // patch) * (width // patch)
    return (image.new_empty((batch, num_tokens // batch, dim), dtype=out_dtype),
            image.new_empty((num_tokens,), dtype=torch.int32), image.new_empty((1,), dtype=torch.int32),
            image.new_empty((num_tokens,), dtype=torch.uint8))


_GRAD_NAMES = ("image", "weight", "bias", "mask_token", "pos_embed", "norm_weight", "norm_bias")


def _launch_backward(
    grad_out: torch.Tensor, image: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    mask_token: torch.Tensor, pos_embed: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor], order: torch.Tensor, num_visible: torch.Tensor, masked: torch.Tensor,
    norm_eps: float, dot_dtype: torch.dtype, needs: List[bool],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of _GRAD_NAMES where ``needs`` says so, an empty tensor for each other one."""
    (needs_image, needs_weight, needs_bias, needs_mask_token, needs_pos, needs_norm_weight,
     needs_norm_bias) = needs
    grad_out = grad_out.contiguous()
    batch, tokens_per_image, dim = grad_out.shape
    patch = weight.shape[-1]
    grid_w = image.shape[3] // patch
    weight_2d = weight.reshape(dim, -1)
    features = weight_2d.shape[1]
    has_norm = norm_weight is not None
    bias, norm_weight = (None if t is None else t.contiguous() for t in (bias, norm_weight))
    block_m, block_d, block_k = _launch_shapes(dim, features, has_norm)
    target_programs = 2 * sm_count(image.device)
    projection = dict(PATCH=patch, HAS_BIAS=bias is not None, HAS_NORM=has_norm,
                      DOT_DTYPE=_TL_DTYPES[dot_dtype], BLOCK_D=block_d, PROJECT_K=_RECOMPUTE_BLOCK_K)
    geometry = (tokens_per_image, grid_w, dim, features, norm_eps, *image.stride(), *weight_2d.stride())
    grads = [grad_out.new_empty(0) for _ in _GRAD_NAMES]

    if needs_weight or needs_bias or needs_norm_weight or needs_norm_bias:
        # Weight tiles are (BLOCK_D, 128 or less) accumulators; splits over token blocks fill the GPU
        # (at most one split per token block).
        weight_block_m = _weight_grad_block_m(block_d, has_norm)
        weight_block_k = max(16, min(128, _TILE_ELEMENTS // block_d, next_power_of_2(features)))
        tiles = cdiv(dim, block_d) * cdiv(features, weight_block_k)
        token_blocks = cdiv(batch * tokens_per_image, weight_block_m)
        num_splits = max(1, min(cdiv(target_programs, tiles), token_blocks))
        part_weight = torch.empty((num_splits, dim, features), device=image.device, dtype=torch.float32)
        part_vectors = torch.empty((3, num_splits, dim), device=image.device, dtype=torch.float32)
        with on_device_of(image):
            _masked_patch_embed_bwd_kernel[(cdiv(dim, block_d), cdiv(features, weight_block_k),
                                            num_splits)](
                part_weight, part_vectors[0], part_vectors[1], part_vectors[2],
                grad_out, image, weight_2d, bias, norm_weight, order, num_visible, num_splits, *geometry,
                BLOCK_M=weight_block_m, BLOCK_K=weight_block_k, **projection,
            )
        if needs_weight:
            grads[1] = part_weight.sum(0).view(weight.shape).to(weight.dtype)
        if needs_bias:
            grads[2] = part_vectors[0].sum(0).to(bias.dtype)
        if needs_norm_weight:
            grads[5] = part_vectors[1].sum(0).to(norm_weight.dtype)
        if needs_norm_bias:
            grads[6] = part_vectors[2].sum(0).to(norm_bias.dtype)

    if needs_mask_token or needs_pos:
        # A streaming reduction of grad_out: split the batch too, for enough loads in flight.
        block_l = 16
        token_block_d = max(16, min(64, next_power_of_2(dim)))
        num_cell_blocks = cdiv(tokens_per_image, block_l)
        tiles = num_cell_blocks * cdiv(dim, token_block_d)
        num_splits = max(1, min(batch, cdiv(4 * target_programs, tiles)))
        part_pos = (torch.empty((num_splits, tokens_per_image, dim), device=image.device, dtype=torch.float32)
                    if needs_pos else None)
        part_mask_token = torch.empty((num_splits, num_cell_blocks, dim), device=image.device, dtype=torch.float32)
        with on_device_of(image):
            _masked_patch_embed_bwd_tokens_kernel[(num_cell_blocks, cdiv(dim, token_block_d), num_splits)](
                part_pos, part_mask_token, grad_out, masked, batch, num_splits, tokens_per_image, dim,
                POS_GRAD=needs_pos, BLOCK_L=block_l, BLOCK_D=token_block_d,
            )
        if needs_mask_token:
            grads[3] = part_mask_token.sum((0, 1)).view(1, 1, dim).to(mask_token.dtype)
        if needs_pos:
            grads[4] = part_pos.sum(0).view(1, tokens_per_image, dim).to(pos_embed.dtype)

    if needs_image:
        # In the image's memory format; masked patches keep these zeros.
        grads[0] = grad_image = torch.zeros_like(image, memory_format=torch.preserve_format)
        with on_device_of(image):
            _masked_patch_embed_bwd_image_kernel[(cdiv(batch * tokens_per_image, block_m),
                                                  cdiv(features, block_k))](
                grad_image, grad_out, image, weight_2d, bias, norm_weight, order, num_visible, *geometry,
                *grad_image.stride(), BLOCK_M=block_m, BLOCK_K=block_k, **projection,
            )
    return tuple(grads)


_backward_op = custom_op("simmim_fast_triton::masked_patch_embed_backward", _launch_backward)


@_backward_op.register_fake
def _(grad_out, image, weight, bias, mask_token, pos_embed, norm_weight, norm_bias, order, num_visible, masked,
      norm_eps, dot_dtype, needs):
    like = (torch.zeros_like(image, memory_format=torch.preserve_format), weight, bias, mask_token, pos_embed,
            norm_weight, norm_bias)
    return tuple(tensor.new_empty(tensor.shape) if need else grad_out.new_empty(0)
                 for tensor, need in zip(like, needs))


def _save_for_backward(ctx, inputs, output):
    image, _, weight, bias, mask_token, pos_embed, norm_weight, norm_bias, norm_eps, dot_dtype, _, _ = inputs
    _, order, num_visible, masked = output
    ctx.save_for_backward(image, weight, bias, mask_token, pos_embed, norm_weight, norm_bias, order, num_visible,
                          masked)
    ctx.settings = (norm_eps, dot_dtype)


def _backward(ctx, grad_out, *_grad_saved_outputs):
    image, weight, bias, mask_token, pos_embed, norm_weight, norm_bias, order, num_visible, masked = ctx.saved_tensors
    needs = [ctx.needs_input_grad[i] for i in (0, 2, 3, 4, 5, 6, 7)]
    grads = _call_backward(grad_out, image, weight, bias, mask_token, pos_embed, norm_weight, norm_bias, order,
                           num_visible, masked, *ctx.settings, needs)
    grad_image, grad_weight, grad_bias, grad_mask_token, grad_pos, grad_norm_weight, grad_norm_bias = (
        grad if need else None for grad, need in zip(grads, needs))
    return (grad_image, None, grad_weight, grad_bias, grad_mask_token, grad_pos, grad_norm_weight, grad_norm_bias,
            None, None, None, None)


_call_backward = eager_or_op(_backward_op)
_call = eager_or_op_with_autograd(_forward_op, _backward, _save_for_backward)


def _dtypes(image, weight, bias, mask_token, pos_embed, norm_weight):
    """(projection dtype, LayerNorm output dtype, output dtype) as the reference has them."""
    device_type = image.device.type
    if torch.is_autocast_enabled(device_type):
        dot_dtype = torch.get_autocast_dtype(device_type)
        norm_dtype = torch.float32  # autocast runs layer_norm in fp32
    else:
        if weight.dtype != image.dtype or (bias is not None and bias.dtype != image.dtype):
            raise RuntimeError(f"image ({image.dtype}), weight ({weight.dtype}) and bias must share a dtype outside "
                               "autocast, as for Conv2d")
        dot_dtype = norm_dtype = image.dtype
    out_dtype = torch.promote_types(norm_dtype if norm_weight is not None else dot_dtype, mask_token.dtype)
    if pos_embed is not None:
        out_dtype = torch.promote_types(out_dtype, pos_embed.dtype)
    return dot_dtype, norm_dtype, out_dtype


def masked_patch_embed(image, mask, weight, bias, mask_token, pos_embed=None, norm_weight=None, norm_bias=None,
                       norm_eps=1e-5):
    """See ``simmim_fast.reference.masked_patch_embed``."""
    dot_dtype, norm_dtype, out_dtype = _dtypes(image, weight, bias, mask_token, pos_embed, norm_weight)
    return _call(image, mask, weight, bias, mask_token, pos_embed, norm_weight, norm_bias, norm_eps, dot_dtype,
                 norm_dtype, out_dtype)[0]
