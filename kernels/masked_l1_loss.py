"""The SimMIM masked L1 loss, read straight from the token mask and (optionally) the pre-shuffle decoder output.

Same signature and meaning as ``simmim_fast.reference.masked_l1_loss``:
``sum(|x - x_rec| * mask_px) / (sum(mask_px) + 1e-5) / in_chans`` with mask_px the token mask repeated
patch_size times along both axes. Neither mask_px, nor the shuffled reconstruction, nor a per-pixel loss
is ever materialised: PixelShuffle(s) folds into the index arithmetic (pixel (c, h*s + i, w*s + j) is
channel c*s*s + i*s + j, position (h, w) of the reconstruction). A tile is (rows, w, j): image rows
h*s + i of one (b, c, i), by columns x = w*s + j. Along a tile the target is contiguous in (w, j) and the
reconstruction in (rows, w) (one contiguous chunk per (b, c, i)), so both loads are coalesced, each in
its own order; the mask is read at token granularity.

Masks are 0/1: pixels with mask 0 are not read at all (40% of a SimMIM batch), so non-finite values
there do not reach the loss or the gradients (the reference would give NaN).

Deterministic: each program of a fixed-size grid sums its tiles (a grid-stride loop), then one
program sums the per-program partials in a fixed order. Masked pixels are counted in integers
(int64 per lane in the grid-stride loop, so that no count can wrap whatever the trip count, and
int64 in total), exact as the reference's count: an fp32 count is off by ulps
above 2^24 masked pixels (a ViT batch of 2048 has 61.6 M). The backward writes the gradients in one
pass, from the loss's denominator that the forward stored.

Registered as the custom ops ``simmim_fast_triton::masked_l1_loss`` and ``..._backward`` (fake
implementations, autograd): torch.compile treats them as opaque calls and traces no kernel.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from simmim_fast.reference import LOSS_EPS

from ._eager import custom_op, eager_or_op, eager_or_op_with_autograd
from ._launch import cdiv, next_power_of_2, on_device_of, sm_count

# Pixels per tile: 16 per thread at 4 warps; several programs fit on an SM to keep loads in flight.
_TILE_ELEMENTS = 2048
# Partials the finish kernel sums per step: one fixed block (8 per thread), not one sized to the partial
# count, which grows with the batch and would compile the kernel again for every new power of two.
FINISH_BLOCK = 1024


@triton.jit
def _pixel_offsets(tile, num_rows, height, channels, width, grid_w,
                   SHUFFLE: tl.constexpr, PATCH: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_WS: tl.constexpr,
                   BLOCK_S: tl.constexpr):
    """Offsets of one (rows, w, j) tile of pixels x = w*s + j in the reconstruction, the target and the mask
    (all contiguous), the tile's validity, and whether each row is of channel 0 (those count masked pixels).
    The reconstruction is contiguous along w, the target along (w, j): each load is coalesced in its own
    order and the compiler moves the tile between the two through shared memory."""
    rec_height = height // SHUFFLE
    rec_width = width // SHUFFLE
    num_col_blocks = tl.cdiv(rec_width, BLOCK_WS)
    rows = (tile // num_col_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # r = (b*C + c)*H + i*H/s + h
    w = (tile % num_col_blocks) * BLOCK_WS + tl.arange(0, BLOCK_WS)
    j = tl.arange(0, BLOCK_S)  # BLOCK_S = SHUFFLE rounded up to a power of 2
    x = w[:, None] * SHUFFLE + j[None, :]
    image = rows // height  # b*C + c
    within = rows % height
    i = within // rec_height
    h = within % rec_height
    y = h * SHUFFLE + i
    plane = rec_height * rec_width
    image_base = image.to(tl.int64) * height * width
    rec_offsets = ((image_base + i * SHUFFLE * plane + h * rec_width)[:, None, None] + w[None, :, None]
                   + (j * plane)[None, None, :])
    target_offsets = (image_base + y * width)[:, None, None] + x[None, :, :]
    mask_offsets = ((image // channels).to(tl.int64) * (height // PATCH) * grid_w
                    + (y // PATCH) * grid_w)[:, None, None] + (x // PATCH)[None, :, :]
    valid = (rows < num_rows)[:, None, None] & (w < rec_width)[None, :, None] & (j < SHUFFLE)[None, None, :]
    counted = ((image % channels) == 0)[:, None, None]
    return rec_offsets, target_offsets, mask_offsets, valid, counted


@triton.jit(do_not_specialize=["num_rows", "num_tiles"])
def _masked_l1_loss_fwd_kernel(
    abs_partial_ptr, count_partial_ptr, rec_ptr, target_ptr, mask_ptr,
    num_rows, height, channels, width, grid_w, num_tiles,
    SHUFFLE: tl.constexpr, PATCH: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_WS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Per program: sum of |rec - target| over its masked pixels, and the count of masked pixels (channel 0)."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    abs_sum = tl.zeros((BLOCK_ROWS, BLOCK_WS, BLOCK_S), dtype=tl.float32)
    count = tl.zeros((BLOCK_ROWS, BLOCK_WS, BLOCK_S), dtype=tl.int64)
    for tile in range(pid, num_tiles, num_programs):
        rec_offsets, target_offsets, mask_offsets, valid, counted = _pixel_offsets(
            tile, num_rows, height, channels, width, grid_w, SHUFFLE, PATCH, BLOCK_ROWS, BLOCK_WS, BLOCK_S)
        masked = tl.load(mask_ptr + mask_offsets, mask=valid, other=0) != 0
        rec = tl.load(rec_ptr + rec_offsets, mask=masked, other=0.0).to(tl.float32)
        target = tl.load(target_ptr + target_offsets, mask=masked, other=0.0).to(tl.float32)
        abs_sum += tl.abs(rec - target)
        count += (masked & counted).to(tl.int64)
    tl.store(abs_partial_ptr + pid, tl.sum(tl.sum(tl.sum(abs_sum, axis=2), axis=1), axis=0))
    tl.store(count_partial_ptr + pid, tl.sum(tl.sum(tl.sum(count, axis=2), axis=1), axis=0))


@triton.jit(do_not_specialize=["num_partials"])
def _masked_l1_loss_finish_kernel(loss_ptr, denominator_ptr, abs_partial_ptr, count_partial_ptr, num_partials,
                                  in_chans, eps, BLOCK: tl.constexpr):
    """loss = sum(partial abs sums) / (sum(partial counts) + eps) / in_chans, summed in a fixed order; the count
    in int64, rounded to fp32 once before + eps as the reference's int64 count is."""
    abs_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    count = tl.zeros((BLOCK,), dtype=tl.int64)
    for start in range(0, num_partials, BLOCK):
        index = start + tl.arange(0, BLOCK)
        valid = index < num_partials
        abs_sum += tl.load(abs_partial_ptr + index, mask=valid, other=0.0)
        count += tl.load(count_partial_ptr + index, mask=valid, other=0).to(tl.int64)
    denominator = tl.sum(count, axis=0).to(tl.float32) + eps
    tl.store(denominator_ptr, denominator)
    tl.store(loss_ptr, (tl.sum(abs_sum, axis=0) / denominator / in_chans).to(loss_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["num_rows", "num_tiles"])
def _masked_l1_loss_bwd_kernel(
    grad_rec_ptr, grad_target_ptr, rec_ptr, target_ptr, mask_ptr, grad_loss_ptr, denominator_ptr, in_chans,
    num_rows, height, channels, width, grid_w, num_tiles,
    GRAD_REC: tl.constexpr, GRAD_TARGET: tl.constexpr,
    SHUFFLE: tl.constexpr, PATCH: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_WS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """d rec = sign(rec - target) * mask_px * (grad / in_chans / denominator); d target = -d rec."""
    scale = tl.load(grad_loss_ptr).to(tl.float32) / in_chans / tl.load(denominator_ptr)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        rec_offsets, target_offsets, mask_offsets, valid, _ = _pixel_offsets(
            tile, num_rows, height, channels, width, grid_w, SHUFFLE, PATCH, BLOCK_ROWS, BLOCK_WS, BLOCK_S)
        masked = tl.load(mask_ptr + mask_offsets, mask=valid, other=0) != 0
        rec = tl.load(rec_ptr + rec_offsets, mask=masked, other=0.0).to(tl.float32)
        target = tl.load(target_ptr + target_offsets, mask=masked, other=0.0).to(tl.float32)
        diff = rec - target  # 0 where unmasked (not loaded)
        grad = tl.where(diff > 0, scale, tl.where(diff < 0, -scale, diff))  # sign(diff) * scale; NaN stays NaN
        if GRAD_REC:
            tl.store(grad_rec_ptr + rec_offsets, grad.to(grad_rec_ptr.dtype.element_ty), mask=valid)
        if GRAD_TARGET:
            tl.store(grad_target_ptr + target_offsets, (-grad).to(grad_target_ptr.dtype.element_ty), mask=valid)


def finish_loss(abs_partials: torch.Tensor, count_partials: torch.Tensor, in_chans: int, out_dtype: torch.dtype):
    """(loss in out_dtype, fp32 denominator count + eps) from per-program fp32 |diff| sums and integer masked-pixel
    counts (int64 here, int32 from the decoder's one-tile programs). Shared with masked_decoder_loss, whose programs produce the same partials."""
    loss = torch.empty((), device=abs_partials.device, dtype=out_dtype)
    denominator = torch.empty((), device=abs_partials.device, dtype=torch.float32)
    with on_device_of(abs_partials):
        _masked_l1_loss_finish_kernel[(1,)](loss, denominator, abs_partials, count_partials, abs_partials.numel(),
                                            in_chans, LOSS_EPS, BLOCK=FINISH_BLOCK, num_warps=4)
    return loss, denominator


def loss_dtype(rec_dtype: torch.dtype, target_dtype: torch.dtype, mask_dtype: torch.dtype,
               device_type: str) -> torch.dtype:
    """The dtype of the reference's loss: l1_loss runs in fp32 under autocast, the mask multiplies and
    counts in its own dtype (an integer or bool count is int64, + 1e-5 makes it the default float)."""
    if torch.is_autocast_enabled(device_type):
        per_pixel = torch.float32
    else:
        per_pixel = torch.promote_types(rec_dtype, target_dtype)
    if mask_dtype.is_floating_point:
        return torch.promote_types(per_pixel, mask_dtype)
    return torch.promote_types(per_pixel, torch.get_default_dtype())


def _launch_geometry(target: torch.Tensor, patch_size: int, shuffle_stride: int) -> dict:
    batch, channels, height, width = target.shape
    rec_width = width // shuffle_stride
    block_s = next_power_of_2(shuffle_stride)
    block_ws = max(1, min(next_power_of_2(rec_width), _TILE_ELEMENTS // block_s))
    block_rows = max(1, _TILE_ELEMENTS // (block_ws * block_s))
    num_rows = batch * channels * height
    num_tiles = cdiv(num_rows, block_rows) * cdiv(rec_width, block_ws)
    return dict(
        num_programs=min(num_tiles, 8 * sm_count(target.device)),
        args=(num_rows, height, channels, width, width // patch_size, num_tiles),
        meta=dict(SHUFFLE=shuffle_stride, PATCH=patch_size, BLOCK_ROWS=block_rows, BLOCK_WS=block_ws,
                  BLOCK_S=block_s, num_warps=4),
    )


def _launch_forward(reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch_size: int,
                       in_chans: int, shuffle_stride: int, out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, fp32 denominator that the backward divides by)."""
    launch = _launch_geometry(target, patch_size, shuffle_stride)
    abs_partials = torch.empty(launch["num_programs"], device=target.device, dtype=torch.float32)
    count_partials = torch.empty(launch["num_programs"], device=target.device, dtype=torch.int64)
    with on_device_of(target):
        _masked_l1_loss_fwd_kernel[(launch["num_programs"],)](
            abs_partials, count_partials, reconstruction.contiguous(), target.contiguous(), mask.contiguous(),
            *launch["args"], **launch["meta"])
    return finish_loss(abs_partials, count_partials, in_chans, out_dtype)


_forward_op = custom_op("simmim_fast_triton::masked_l1_loss", _launch_forward)


@_forward_op.register_fake
def _(reconstruction, target, mask, patch_size, in_chans, shuffle_stride, out_dtype):
    return target.new_empty((), dtype=out_dtype), target.new_empty((), dtype=torch.float32)


def _launch_backward(grad_loss: torch.Tensor, denominator: torch.Tensor, reconstruction: torch.Tensor,
                                target: torch.Tensor, mask: torch.Tensor, patch_size: int, in_chans: int,
                                shuffle_stride: int, grad_rec_needed: bool,
                                grad_target_needed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d reconstruction, d target), contiguous; an empty tensor stands for a gradient not needed."""
    reconstruction, target, mask = reconstruction.contiguous(), target.contiguous(), mask.contiguous()
    grad_rec = torch.empty_like(reconstruction) if grad_rec_needed else reconstruction.new_empty(0)
    grad_target = torch.empty_like(target) if grad_target_needed else target.new_empty(0)
    if grad_rec_needed or grad_target_needed:
        launch = _launch_geometry(target, patch_size, shuffle_stride)
        with on_device_of(target):
            _masked_l1_loss_bwd_kernel[(launch["num_programs"],)](
                grad_rec, grad_target, reconstruction, target, mask, grad_loss, denominator, in_chans,
                *launch["args"], GRAD_REC=grad_rec_needed, GRAD_TARGET=grad_target_needed, **launch["meta"])
    return grad_rec, grad_target


_backward_op = custom_op("simmim_fast_triton::masked_l1_loss_backward", _launch_backward)


@_backward_op.register_fake
def _(grad_loss, denominator, reconstruction, target, mask, patch_size, in_chans, shuffle_stride, grad_rec_needed,
      grad_target_needed):
    return (reconstruction.new_empty(reconstruction.shape if grad_rec_needed else (0,)),
            target.new_empty(target.shape if grad_target_needed else (0,)))


def _save_for_backward(ctx, inputs, output):
    reconstruction, target, mask, patch_size, in_chans, shuffle_stride, _ = inputs
    ctx.save_for_backward(reconstruction, target, mask, output[1])
    ctx.geometry = (patch_size, in_chans, shuffle_stride)


def _backward(ctx, grad_loss, _grad_denominator):
    reconstruction, target, mask, denominator = ctx.saved_tensors
    grad_rec_needed, grad_target_needed = ctx.needs_input_grad[:2]
    grad_rec, grad_target = _call_backward(grad_loss, denominator, reconstruction, target, mask, *ctx.geometry,
                                           grad_rec_needed, grad_target_needed)
    return (grad_rec if grad_rec_needed else None, grad_target if grad_target_needed else None,
            None, None, None, None, None)


_call_backward = eager_or_op(_backward_op)
_call = eager_or_op_with_autograd(_forward_op, _backward, _save_for_backward)


def masked_l1_loss(
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    in_chans: int,
    shuffle_stride: int = 1,
) -> torch.Tensor:
    out_dtype = loss_dtype(reconstruction.dtype, target.dtype, mask.dtype, target.device.type)
    loss, _ = _call(reconstruction, target, mask, patch_size, in_chans, shuffle_stride, out_dtype)
    return loss
