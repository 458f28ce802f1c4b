"""The SimMIM decoder (1x1 conv + PixelShuffle) and the masked L1 loss, computed only where the loss looks.

Same signature and meaning as ``simmim_fast.reference.masked_decoder_loss``. A decoder token (one
position of the (H/s, W/s) feature grid) decodes an s x s x 3 block of pixels; only tokens whose
block holds a masked pixel ("active") contribute to the loss or receive a gradient. Each call orders
the tokens active-first on the device (a cumsum and a scatter, no host sync); the kernels read the
active count from memory, the grids are sized for the worst case and blocks past the count skip
their matmul.

Forward: per (token block, output-channel block) program, ``tl.dot`` of the gathered features with
the conv weight, + bias, rounded to the conv's dtype as the reference's conv output; then, in the same
program, PixelShuffle is index arithmetic into the target and the (patch-granular) mask, and the
program writes its |rec - target| sum, its masked-pixel count, and sign(rec - target) * mask as int8
(all the backward needs of the comparison). One program then sums the partials in a fixed order
(``masked_l1_loss.finish_loss``).

Backward: d decoded = sign * grad / in_chans / denominator, rounded to the conv's dtype; d features =
d decoded @ W (zero for inactive tokens), d weight = d decoded^T @ features and d bias = its column
sums. The active tokens are split across programs (enough (o, k) tiles x splits to fill the device:
ViT-B's 144 tiles alone would leave a 132-SM GPU one program per SM and a tail of 12): each split
writes fp32 partials, summed in split order after (deterministic, no atomics; the split count
depends on the shapes and the SM count, never on timing).

Grids: token blocks and output tiles share grid axis 0 (up to 2^31 - 1 programs; axes 1 and 2 stop
at 65535, which ViT-B's token blocks pass from batch ~21k), neighbouring programs sharing a token
block. Registered as the custom ops ``simmim_fast_triton::masked_decoder_loss`` and ``..._backward``
(fake implementations, autograd): torch.compile treats them as opaque calls.

Normalised target (the successor's NORM_TARGET, ``reference.normalized_target``): a first kernel computes it
for the active tokens only, from the raw image, and the forward kernel reads it in place of the target (row p
of a (tokens, s*s*3) fp32 buffer, p the token's active-first position). Per (active token, channel) program,
the window sums of x and x^2 over the token's s x s pixels are two banded 0/1 matmuls over its neighbourhood
(s + window - 1 pixels a side, zeros outside the image): the rows band sums each column, the columns band sums
those; the window's in-image count is arithmetic. No normalised image is ever made, and no pixel outside an
active token's neighbourhood is read. The band matmuls use ``tf32x3`` (three TF32 products: fp32 accuracy on
tensor cores; the 0/1 bands are exact in TF32). The target then gets no gradient (the dispatch sends a target
that requires one to the reference).

Tokens with no masked pixel are never read, so non-finite features there do not reach the loss (the
reference's would give NaN); a NaN reconstruction at a masked pixel gives a NaN loss and, as the int8
sign holds no NaN, a zero gradient there.

dtypes follow the reference: under autocast the conv runs in the autocast dtype (fp32 accumulation,
output and conv gradients rounded to it) and the loss in fp32. fp32 convs use TF32 exactly when the
reference's would (``torch.backends.cudnn.allow_tf32`` on CUDA). Masks are 0/1; the encoder stride
must be a multiple of the patch size (ViT: equal; Swin: 32 and 4).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from simmim_fast.backends.triton import NORM_TARGET_MAX_NEIGHBOURHOOD
from simmim_fast.reference import NORM_TARGET_EPS

from ._autotune import autotune
from ._compaction import selected_first_order
from ._eager import custom_op, eager_or_op, eager_or_op_with_autograd
from ._launch import cdiv, next_power_of_2, on_device_of, sm_count
from .masked_l1_loss import finish_loss, loss_dtype

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _token_coordinates(order_ptr, rows, rows_valid, tokens_per_image, grid_w):
    """(image, feature row, feature column) of the tokens at positions ``rows`` of the active-first order."""
    tokens = tl.load(order_ptr + rows, mask=rows_valid, other=0)
    cell = tokens % tokens_per_image
    return tokens // tokens_per_image, cell // grid_w, cell % grid_w


@triton.jit
def _pixel_offsets(image, fy, fx, o, stride_b, stride_c, stride_h, stride_w, STRIDE: tl.constexpr):
    """Offsets in an image-shaped tensor of decoder output channel o = c*s*s + i*s + j of tokens (image, fy, fx):
    after PixelShuffle it is pixel (c, fy*s + i, fx*s + j)."""
    c = o // (STRIDE * STRIDE)
    i = (o // STRIDE) % STRIDE
    j = o % STRIDE
    return ((image.to(tl.int64) * stride_b + fy * STRIDE * stride_h + fx * STRIDE * stride_w)[:, None]
            + (c * stride_c + i * stride_h + j * stride_w)[None, :])


@triton.jit
def _mask_offsets(image, fy, fx, o, stride_b, stride_h, stride_w, STRIDE: tl.constexpr, PATCH: tl.constexpr):
    """Offsets of the mask entry over each pixel of ``_pixel_offsets``: (row // p, column // p), p | s."""
    i = (o // STRIDE) % STRIDE
    j = o % STRIDE
    per_token = STRIDE // PATCH
    return ((image.to(tl.int64) * stride_b + fy * per_token * stride_h + fx * per_token * stride_w)[:, None]
            + ((i // PATCH) * stride_h + (j // PATCH) * stride_w)[None, :])


_NORM_TARGET_EPS = tl.constexpr(NORM_TARGET_EPS)  # kernels see globals only as constexpr


@triton.jit(do_not_specialize_on_alignment=["num_active_ptr"])
def _normalized_target_kernel(
    normalized_ptr, target_ptr, order_ptr, num_active_ptr, tokens_per_image, grid_w, height, width, O,
    stride_tb, stride_tc, stride_th, stride_tw,
    STRIDE: tl.constexpr, RADIUS: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr,
):
    """Row p, channel c's s x s block of ``normalized``: the normalised target of the pixels of the token at
    active-first position p, (x - mean) / sqrt(var + eps) over each pixel's window clipped to the image."""
    position = tl.program_id(0)
    channel = tl.program_id(1)
    is_active = position < tl.load(num_active_ptr)
    token = tl.load(order_ptr + position, mask=is_active, other=0)
    cell = token % tokens_per_image
    top = (cell // grid_w) * STRIDE
    left = (cell % grid_w) * STRIDE
    channel_base = target_ptr + (token // tokens_per_image).to(tl.int64) * stride_tb + channel * stride_tc

    block = tl.arange(0, BLOCK_S)  # the token's rows i (and columns j) of pixels
    span = STRIDE + 2 * RADIUS  # the neighbourhood's side; region row r is image row top - RADIUS + r
    window_sum = tl.zeros((BLOCK_S, BLOCK_S), dtype=tl.float32)
    window_square_sum = tl.zeros((BLOCK_S, BLOCK_S), dtype=tl.float32)
    region_end = tl.where(is_active, span, 0)  # programs past the active tokens skip the sums
    for col_start in range(0, region_end, CHUNK):
        region_cols = col_start + tl.arange(0, CHUNK)
        image_cols = left - RADIUS + region_cols
        cols_inside = (region_cols < span) & (image_cols >= 0) & (image_cols < width)
        column_sums = tl.zeros((BLOCK_S, CHUNK), dtype=tl.float32)
        column_square_sums = tl.zeros((BLOCK_S, CHUNK), dtype=tl.float32)
        for row_start in range(0, region_end, CHUNK):
            region_rows = row_start + tl.arange(0, CHUNK)
            image_rows = top - RADIUS + region_rows
            rows_inside = (region_rows < span) & (image_rows >= 0) & (image_rows < height)
            pixels = tl.load(channel_base + image_rows[:, None] * stride_th + image_cols[None, :] * stride_tw,
                             mask=rows_inside[:, None] & cols_inside[None, :], other=0.0).to(tl.float32)
            # Pixel row i's window is region rows i .. i + 2 RADIUS.
            rows_band = ((region_rows[None, :] >= block[:, None])
                         & (region_rows[None, :] <= block[:, None] + 2 * RADIUS)).to(tl.float32)
            column_sums = tl.dot(rows_band, pixels, column_sums, input_precision="tf32x3")
            column_square_sums = tl.dot(rows_band, pixels * pixels, column_square_sums, input_precision="tf32x3")
        cols_band = ((region_cols[:, None] >= block[None, :])
                     & (region_cols[:, None] <= block[None, :] + 2 * RADIUS)).to(tl.float32)
        window_sum = tl.dot(column_sums, cols_band, window_sum, input_precision="tf32x3")
        window_square_sum = tl.dot(column_square_sums, cols_band, window_square_sum, input_precision="tf32x3")

    rows, cols = top + block, left + block
    rows_count = tl.minimum(rows + RADIUS, height - 1) - tl.maximum(rows - RADIUS, 0) + 1
    cols_count = tl.minimum(cols + RADIUS, width - 1) - tl.maximum(cols - RADIUS, 0) + 1
    inside = (block < STRIDE)[:, None] & (block < STRIDE)[None, :] & is_active
    count = tl.where(inside, rows_count[:, None] * cols_count[None, :], 2).to(tl.float32)  # 2: no 0/0 in padding
    mean = tl.math.div_rn(window_sum, count)
    square_mean = tl.math.div_rn(window_square_sum, count)
    # As the reference: the unbiased variance, clamped at 0 where rounding makes it negative.
    variance = tl.maximum((square_mean - mean * mean) * tl.math.div_rn(count, count - 1.0), 0.0)
    pixel = tl.load(channel_base + rows[:, None] * stride_th + cols[None, :] * stride_tw, mask=inside,
                    other=0.0).to(tl.float32)
    normalized = tl.math.div_rn(pixel - mean, tl.math.sqrt_rn(variance + _NORM_TARGET_EPS))
    outputs = channel * STRIDE * STRIDE + block[:, None] * STRIDE + block[None, :]
    tl.store(normalized_ptr + position.to(tl.int64) * O + outputs, normalized, mask=inside)


# Tiles are fixed by the launcher (their order of summation is the result's), and so are the warps of the kernels
# whose tl.sum reduces over a layout that num_warps sets (the loss partials, d bias): only their stages are tuned.
_TILE_KEY = ["K", "O", "DOT_DTYPE", "INPUT_PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_K"]


@autotune([triton.Config({}, num_warps=8, num_stages=3), triton.Config({}, num_warps=8, num_stages=4)],
          key=_TILE_KEY + ["STRIDE", "PATCH", "NORM_TARGET"])
@triton.jit(do_not_specialize_on_alignment=["num_active_ptr"])
def _masked_decoder_loss_fwd_kernel(
    sign_ptr, abs_partial_ptr, count_partial_ptr, features_ptr, weight_ptr, bias_ptr, target_ptr, normalized_ptr,
    mask_ptr, order_ptr, num_active_ptr,
    tokens_per_image, grid_w, K, O,
    stride_fb, stride_fc, stride_fh, stride_fw, stride_wo, stride_wk,
    stride_tb, stride_tc, stride_th, stride_tw, stride_mb, stride_mh, stride_mw,
    STRIDE: tl.constexpr, PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_TARGET: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The output-channel tiles of one token block are neighbouring programs: its features are re-read from L2.
    pid = tl.program_id(0)
    num_n = tl.cdiv(O, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_valid = o < O
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    num_active = tl.load(num_active_ptr)
    active = rows < num_active
    image, fy, fx = _token_coordinates(order_ptr, rows, active, tokens_per_image, grid_w)
    feature_rows = image.to(tl.int64) * stride_fb + fy * stride_fh + fx * stride_fw

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(pid_m * BLOCK_M < num_active, K, 0)  # blocks past the active tokens skip the matmul
    for k0 in range(0, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_valid = k < K
        features = tl.load(features_ptr + feature_rows[:, None] + k[None, :] * stride_fc,
                           mask=active[:, None] & k_valid[None, :], other=0.0)
        weight = tl.load(weight_ptr + k[:, None] * stride_wk + o[None, :] * stride_wo,
                         mask=k_valid[:, None] & o_valid[None, :], other=0.0)
        acc = tl.dot(features.to(DOT_DTYPE), weight.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=o_valid, other=0.0).to(DOT_DTYPE).to(tl.float32)[None, :]
    decoded = acc.to(DOT_DTYPE).to(tl.float32)

    valid = active[:, None] & o_valid[None, :]
    masked = tl.load(mask_ptr + _mask_offsets(image, fy, fx, o, stride_mb, stride_mh, stride_mw, STRIDE, PATCH),
                     mask=valid, other=0) != 0
    # Masked by the token and channel, not by the pixel's mask entry (loaded data, unknown to the compiler): rows of
    # STRIDE pixels are then vector loads. Only Swin-like tokens (stride > patch) can hold unmasked pixels it reads.
    if NORM_TARGET:  # rows of the normalised target, in the same active-first order
        target = tl.load(normalized_ptr + rows.to(tl.int64)[:, None] * O + o[None, :], mask=valid, other=0.0)
    else:
        target = tl.load(target_ptr + _pixel_offsets(image, fy, fx, o, stride_tb, stride_tc, stride_th, stride_tw,
                                                     STRIDE), mask=valid, other=0.0).to(tl.float32)
    diff = tl.where(masked, decoded - target, 0.0)
    sign = tl.where(diff > 0, 1, 0) - tl.where(diff < 0, 1, 0)
    tl.store(sign_ptr + rows.to(tl.int64)[:, None] * O + o[None, :], sign.to(tl.int8), mask=valid)

    counted = masked & (o < STRIDE * STRIDE)[None, :]  # the channel-0 outputs count each masked pixel once
    tl.store(abs_partial_ptr + pid, tl.sum(tl.sum(tl.abs(diff), axis=1), axis=0))
    tl.store(count_partial_ptr + pid, tl.sum(tl.sum(counted.to(tl.int32), axis=1), axis=0))


@autotune([triton.Config({}, num_warps=8, num_stages=3), triton.Config({}, num_warps=4, num_stages=3),
           triton.Config({}, num_warps=8, num_stages=4)], key=_TILE_KEY)
@triton.jit(do_not_specialize=["num_tokens"], do_not_specialize_on_alignment=["num_active_ptr"])
def _masked_decoder_loss_bwd_features_kernel(
    grad_features_ptr, sign_ptr, weight_ptr, order_ptr, num_active_ptr, grad_loss_ptr, denominator_ptr, in_chans,
    num_tokens, tokens_per_image, grid_w, K, O,
    stride_wo, stride_wk, stride_gb, stride_gc, stride_gh, stride_gw,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """d features = d decoded @ W for every token: active ones compute it, inactive ones get zeros."""
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_m = pid // num_k
    pid_k = pid % num_k
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_valid = k < K
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    num_active = tl.load(num_active_ptr)
    active = rows < num_active
    scale = tl.load(grad_loss_ptr).to(tl.float32) / in_chans / tl.load(denominator_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    o_end = tl.where(pid_m * BLOCK_M < num_active, O, 0)
    for o0 in range(0, o_end, BLOCK_N):
        o = o0 + tl.arange(0, BLOCK_N)
        o_valid = o < O
        sign = tl.load(sign_ptr + rows.to(tl.int64)[:, None] * O + o[None, :],
                       mask=active[:, None] & o_valid[None, :], other=0)
        weight = tl.load(weight_ptr + o[:, None] * stride_wo + k[None, :] * stride_wk,
                         mask=o_valid[:, None] & k_valid[None, :], other=0.0)
        acc = tl.dot((sign.to(tl.float32) * scale).to(DOT_DTYPE), weight.to(DOT_DTYPE), acc,
                     input_precision=INPUT_PRECISION)

    rows_valid = rows < num_tokens
    image, fy, fx = _token_coordinates(order_ptr, rows, rows_valid, tokens_per_image, grid_w)
    offsets = (image.to(tl.int64) * stride_gb + fy * stride_gh + fx * stride_gw)[:, None] + k[None, :] * stride_gc
    tl.store(grad_features_ptr + offsets, acc.to(DOT_DTYPE).to(grad_features_ptr.dtype.element_ty),
             mask=rows_valid[:, None] & k_valid[None, :])


@autotune([triton.Config({}, num_warps=4, num_stages=3), triton.Config({}, num_warps=4, num_stages=4)],
          key=_TILE_KEY + ["HAS_BIAS", "GRAD_TARGET"])
@triton.jit(do_not_specialize=["num_splits"], do_not_specialize_on_alignment=["num_active_ptr"])
def _masked_decoder_loss_bwd_weight_kernel(
    grad_weight_part_ptr, grad_bias_part_ptr, grad_target_ptr, sign_ptr, features_ptr, order_ptr, num_active_ptr,
    grad_loss_ptr, denominator_ptr, in_chans, num_splits,
    tokens_per_image, grid_w, K, O,
    stride_fb, stride_fc, stride_fh, stride_fw,
    stride_tb, stride_tc, stride_th, stride_tw,
    STRIDE: tl.constexpr, HAS_BIAS: tl.constexpr, GRAD_TARGET: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Split s of tile (o, k) of d weight: the sum over active token blocks s, s + num_splits, ... of
    d decoded^T @ features, in token order. The programs of the first K tile also write d bias's partial
    and, if asked, d target = -d decoded (before rounding)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_valid = o < O
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_valid = k < K
    num_active = tl.load(num_active_ptr)
    scale = tl.load(grad_loss_ptr).to(tl.float32) / in_chans / tl.load(denominator_ptr)

    grad_weight = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    grad_bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(split * BLOCK_M, num_active, num_splits * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        active = rows < num_active
        image, fy, fx = _token_coordinates(order_ptr, rows, active, tokens_per_image, grid_w)
        sign = tl.load(sign_ptr + rows.to(tl.int64)[:, None] * O + o[None, :],
                       mask=active[:, None] & o_valid[None, :], other=0)
        grad_decoded = sign.to(tl.float32) * scale
        grad_decoded_low = grad_decoded.to(DOT_DTYPE)
        features = tl.load(features_ptr + (image.to(tl.int64) * stride_fb + fy * stride_fh + fx * stride_fw)[:, None]
                           + k[None, :] * stride_fc, mask=active[:, None] & k_valid[None, :], other=0.0)
        grad_weight = tl.dot(tl.trans(grad_decoded_low), features.to(DOT_DTYPE), grad_weight,
                             input_precision=INPUT_PRECISION)
        grad_bias += tl.sum(grad_decoded_low.to(tl.float32), axis=0)
        if GRAD_TARGET:
            offsets = _pixel_offsets(image, fy, fx, o, stride_tb, stride_tc, stride_th, stride_tw, STRIDE)
            tl.store(grad_target_ptr + offsets, (-grad_decoded).to(grad_target_ptr.dtype.element_ty),
                     mask=active[:, None] & o_valid[None, :] & (pid_k == 0))

    part_weight = grad_weight_part_ptr + split.to(tl.int64) * O * K
    tl.store(part_weight + o[:, None] * K + k[None, :], grad_weight, mask=o_valid[:, None] & k_valid[None, :])
    if HAS_BIAS:
        tl.store(grad_bias_part_ptr + split * O + o, grad_bias, mask=o_valid & (pid_k == 0))


def _active_first_order(mask: torch.Tensor, encoder_stride: int, patch_size: int):
    """A permutation of the decoder tokens with the active ones (a masked pixel in their s x s block) first,
    each group in token order, and the active count as a device tensor (1,); no host sync."""
    batch, mask_h, mask_w = mask.shape
    per_token = encoder_stride // patch_size
    grid_h, grid_w = mask_h // per_token, mask_w // per_token
    active = (mask != 0).reshape(batch, grid_h, per_token, grid_w, per_token).any(dim=(2, 4)).reshape(-1)
    return selected_first_order(active)


def _launch_shapes(out_channels: int, in_channels: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K): tokens x output channels x encoder channels."""
    block_n = max(16, min(128, next_power_of_2(out_channels)))
    block_k = max(16, min(64, next_power_of_2(in_channels)))
    return 64, block_n, block_k


def _weight_grad_splits(num_tokens: int, tiles: int, block_m: int, device: torch.device) -> int:
    """Token splits of the weight grad: about 8 waves of programs over the device's SMs with the (o, k) tiles,
    at most one per token block. From the shapes and the SM count only, so the summation order is fixed."""
    return max(1, min(cdiv(num_tokens, block_m), cdiv(8 * sm_count(device), tiles)))


def _normalized_targets(target: torch.Tensor, order: torch.Tensor, num_active: torch.Tensor, encoder_stride: int,
                        window: int, grid_w: int, num_tokens: int) -> torch.Tensor:
    """(tokens, s*s*C) fp32: row p is the normalised target of the token at active-first position p, its
    outputs in the decoder's channel order (c, i, j); rows past the active count are left unwritten."""
    batch, channels, height, width = target.shape
    neighbourhood = encoder_stride + window - 1
    assert neighbourhood <= NORM_TARGET_MAX_NEIGHBOURHOOD, "the dispatch sends larger windows to the reference"
    normalized = torch.empty((num_tokens, channels * encoder_stride * encoder_stride), device=target.device,
                             dtype=torch.float32)
    with on_device_of(target):
        _normalized_target_kernel[(num_tokens, channels)](
            normalized, target, order, num_active, num_tokens // batch, grid_w, height, width, normalized.shape[1],
            *target.stride(), STRIDE=encoder_stride, RADIUS=window // 2,
            BLOCK_S=max(16, next_power_of_2(encoder_stride)),
            CHUNK=16, num_warps=4,
        )
    return normalized


def _launch_forward(
    features: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    target: torch.Tensor, encoder_stride: int, patch_size: int, in_chans: int, norm_target_patch_size: Optional[int],
    dot_dtype: torch.dtype, out_dtype: torch.dtype, input_precision: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, fp32 denominator, active-first token order, active count, int8 sign(rec - target) * mask per
    active token and output channel): the loss and what the backward needs."""
    batch, in_channels, _, grid_w = features.shape
    tokens_per_image = features.shape[2] * grid_w
    num_tokens = batch * tokens_per_image
    weight_2d = weight.reshape(weight.shape[0], in_channels)
    out_channels = weight_2d.shape[0]
    order, num_active = _active_first_order(mask, encoder_stride, patch_size)
    normalized = (None if norm_target_patch_size is None else
                  _normalized_targets(target, order, num_active, encoder_stride, norm_target_patch_size, grid_w,
                                      num_tokens))
    block_m, block_n, block_k = _launch_shapes(out_channels, in_channels)

    num_programs = cdiv(out_channels, block_n) * cdiv(num_tokens, block_m)
    sign = torch.empty((num_tokens, out_channels), device=features.device, dtype=torch.int8)
    abs_partials = torch.empty(num_programs, device=features.device, dtype=torch.float32)
    count_partials = torch.empty(num_programs, device=features.device, dtype=torch.int32)
    with on_device_of(features):
        _masked_decoder_loss_fwd_kernel[(num_programs,)](
            sign, abs_partials, count_partials, features, weight_2d, None if bias is None else bias.contiguous(),
            target, normalized, mask, order, num_active, tokens_per_image, grid_w, in_channels, out_channels,
            *features.stride(), *weight_2d.stride(), *target.stride(), *mask.stride(),
            STRIDE=encoder_stride, PATCH=patch_size, HAS_BIAS=bias is not None, NORM_TARGET=normalized is not None,
            DOT_DTYPE=_TL_DTYPES[dot_dtype], INPUT_PRECISION=input_precision,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        )
    loss, denominator = finish_loss(abs_partials, count_partials, in_chans, out_dtype)
    return loss, denominator, order, num_active, sign


_forward_op = custom_op("simmim_fast_triton::masked_decoder_loss", _launch_forward)


@_forward_op.register_fake
def _(features, mask, weight, bias, target, encoder_stride, patch_size, in_chans, norm_target_patch_size, dot_dtype,
      out_dtype, input_precision):
    num_tokens = features.shape[0] * features.shape[2] * features.shape[3]
    return (features.new_empty((), dtype=out_dtype), features.new_empty((), dtype=torch.float32),
            features.new_empty((num_tokens,), dtype=torch.int32), features.new_empty((1,), dtype=torch.int32),
            features.new_empty((num_tokens, weight.shape[0]), dtype=torch.int8))


def _launch_backward(
    grad_loss: torch.Tensor, denominator: torch.Tensor, features: torch.Tensor, weight: torch.Tensor,
    bias: Optional[torch.Tensor], target: torch.Tensor, order: torch.Tensor, num_active: torch.Tensor,
    sign: torch.Tensor, encoder_stride: int, in_chans: int, dot_dtype: torch.dtype, input_precision: str,
    grad_features_needed: bool, grad_parameters_needed: bool, grad_target_needed: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d features, d weight, d bias, d target); an empty tensor stands for a gradient not computed."""
    batch, in_channels, _, grid_w = features.shape
    tokens_per_image = features.shape[2] * grid_w
    num_tokens = batch * tokens_per_image
    weight_2d = weight.reshape(weight.shape[0], in_channels)
    out_channels = weight_2d.shape[0]
    block_m, block_n, block_k = _launch_shapes(out_channels, in_channels)
    common = dict(DOT_DTYPE=_TL_DTYPES[dot_dtype], INPUT_PRECISION=input_precision, BLOCK_M=block_m,
                  BLOCK_K=block_k)
    grad_features, grad_weight, grad_bias, grad_target = (features.new_empty(0) for _ in range(4))  # not computed

    if grad_features_needed:
        grad_features = torch.empty_like(features)
        num_programs = cdiv(in_channels, block_k) * cdiv(num_tokens, block_m)
        with on_device_of(features):
            _masked_decoder_loss_bwd_features_kernel[(num_programs,)](
                grad_features, sign, weight_2d, order, num_active, grad_loss, denominator, in_chans,
                num_tokens, tokens_per_image, grid_w, in_channels, out_channels,
                *weight_2d.stride(), *grad_features.stride(), BLOCK_N=block_n, **common,
            )
    if grad_parameters_needed or grad_target_needed:
        # Each (o, k) tile sums over the active tokens of its split: 64-wide o tiles, 144 tiles for ViT-B.
        weight_block_n = min(block_n, 64)
        tiles = (cdiv(out_channels, weight_block_n), cdiv(in_channels, block_k))
        num_splits = _weight_grad_splits(num_tokens, tiles[0] * tiles[1], block_m, features.device)
        part_weight = torch.empty((num_splits, out_channels, in_channels), device=features.device,
                                  dtype=torch.float32)
        part_bias = (torch.empty((num_splits, out_channels), device=features.device, dtype=torch.float32)
                     if bias is not None else None)
        # Inactive tokens' pixels keep these zeros; active tokens' are all written.
        if grad_target_needed:
            grad_target = torch.zeros_like(target)
        with on_device_of(features):
            _masked_decoder_loss_bwd_weight_kernel[(*tiles, num_splits)](
                part_weight, part_bias, grad_target, sign, features, order, num_active, grad_loss, denominator,
                in_chans, num_splits, tokens_per_image, grid_w, in_channels, out_channels, *features.stride(),
                *(grad_target.stride() if grad_target_needed else (0, 0, 0, 0)),
                STRIDE=encoder_stride, HAS_BIAS=bias is not None, GRAD_TARGET=grad_target_needed,
                BLOCK_N=weight_block_n, **common,
            )
        if grad_parameters_needed:
            # Rounded to the conv's dtype once, as the reference's conv weight grad.
            grad_weight = part_weight.sum(0).to(dot_dtype).to(weight.dtype).view(weight.shape)
            if bias is not None:
                grad_bias = part_bias.sum(0).to(dot_dtype).to(bias.dtype)
    return grad_features, grad_weight, grad_bias, grad_target


_backward_op = custom_op("simmim_fast_triton::masked_decoder_loss_backward", _launch_backward)


@_backward_op.register_fake
def _(grad_loss, denominator, features, weight, bias, target, order, num_active, sign, encoder_stride, in_chans,
      dot_dtype, input_precision, grad_features_needed, grad_parameters_needed, grad_target_needed):
    return (torch.empty_like(features) if grad_features_needed else features.new_empty(0),
            weight.new_empty(weight.shape) if grad_parameters_needed else features.new_empty(0),
            bias.new_empty(bias.shape) if grad_parameters_needed and bias is not None else features.new_empty(0),
            torch.zeros_like(target) if grad_target_needed else features.new_empty(0))


def _save_for_backward(ctx, inputs, output):
    features, _, weight, bias, target, encoder_stride, _, in_chans, _, dot_dtype, _, input_precision = inputs
    _, denominator, order, num_active, sign = output
    ctx.save_for_backward(features, weight, bias, target, order, num_active, sign, denominator)
    ctx.geometry = (encoder_stride, in_chans, dot_dtype, input_precision)


def _backward(ctx, grad_loss, *_grad_saved_outputs):
    features, weight, bias, target, order, num_active, sign, denominator = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads = _call_backward(grad_loss, denominator, features, weight, bias, target, order, num_active, sign,
                           *ctx.geometry, needs[0], needs[2] or needs[3], needs[4])
    grad_features, grad_weight, grad_bias, grad_target = (grad if need else None for grad, need in
                                                          zip(grads, (needs[0], needs[2], needs[3], needs[4])))
    return grad_features, None, grad_weight, grad_bias, grad_target, None, None, None, None, None, None, None


_call_backward = eager_or_op(_backward_op)
_call = eager_or_op_with_autograd(_forward_op, _backward, _save_for_backward)


def _dtypes(features, weight, bias, target, mask):
    """(conv dtype, loss dtype, tl.dot input precision) as the reference has them."""
    device_type = features.device.type
    if torch.is_autocast_enabled(device_type):
        dot_dtype = torch.get_autocast_dtype(device_type)
    else:
        if weight.dtype != features.dtype or (bias is not None and bias.dtype != features.dtype):
            raise RuntimeError(f"features ({features.dtype}), weight ({weight.dtype}) and bias must share a dtype "
                               "outside autocast, as for Conv2d")
        dot_dtype = features.dtype
    out_dtype = loss_dtype(dot_dtype, target.dtype, mask.dtype, device_type)
    use_tf32 = dot_dtype == torch.float32 and features.is_cuda and torch.backends.cudnn.allow_tf32
    return dot_dtype, out_dtype, "tf32" if use_tf32 else "ieee"


def masked_decoder_loss(
    features: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias,
    target: torch.Tensor,
    encoder_stride: int,
    patch_size: int,
    in_chans: int,
    norm_target_patch_size: Optional[int] = None,
) -> torch.Tensor:
    """``simmim_fast.reference.masked_decoder_loss``, the normalised target (norm_target_patch_size) included;
    with it, the target gets no gradient (the dispatch sends a target that requires one to the reference)."""
    if norm_target_patch_size is not None and target.requires_grad:
        raise RuntimeError("the fused normalised target gives the target no gradient; use the reference backend")
    dot_dtype, out_dtype, input_precision = _dtypes(features, weight, bias, target, mask)
    return _call(features, mask, weight, bias, target, encoder_stride, patch_size, in_chans,
                 norm_target_patch_size, dot_dtype, out_dtype, input_precision)[0]
