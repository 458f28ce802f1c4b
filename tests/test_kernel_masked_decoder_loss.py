"""Triton masked decoder + loss (kernels/masked_decoder_loss.py) against the reference, on the interpreter.

Tiny odd shapes: 3 images of 3x40x56, 24 encoder channels, a 5x7 feature grid (105 tokens: two token
blocks), s*s*3 = 192 decoder outputs (two output blocks); ViT-like (stride = patch = 8) and Swin-like
(stride 8, patch 4: a decoder token covers 2x2 mask entries, partly masked ones included) geometries.
Masks all-zero, all-one and random; features as the SimMIM ViT makes them (a (B, L, C) tensor viewed
as (B, C, h, w)); bias or none; target gradients; float16; determinism. The reference computes the
whole decoder, so equal values and gradients show that skipping inactive tokens loses nothing.
"""
import pytest
import torch

import simmim_fast
from simmim_fast import ops, reference
from tests.tolerances import assert_close_cpu

pytestmark = pytest.mark.interpreter

BATCH, CHANS, HEIGHT, WIDTH, ENC_CHANS = 3, 3, 40, 56, 24
NAMES = ("d features", "d weight", "d bias", "d target")


def make_inputs(stride, patch_size, mask_kind="random", bias=True, dtype=torch.float32, channels_last_view=False,
                size=(HEIGHT, WIDTH)):
    height, width = size
    grid = (height // stride, width // stride)
    if channels_last_view:  # z.transpose(1, 2).reshape(B, C, h, w), as SimMIM's ViT encoder returns it
        tokens = torch.randn(BATCH, grid[0] * grid[1], ENC_CHANS, dtype=dtype, requires_grad=True)
        features = tokens.transpose(1, 2).reshape(BATCH, ENC_CHANS, *grid)
        assert features.stride(1) == 1
    else:
        features = torch.randn(BATCH, ENC_CHANS, *grid, dtype=dtype, requires_grad=True)
    out_channels = stride * stride * CHANS
    weight = (torch.randn(out_channels, ENC_CHANS, 1, 1, dtype=dtype) * ENC_CHANS ** -0.5).requires_grad_()
    bias = torch.randn(out_channels, dtype=dtype, requires_grad=True) if bias else None
    target = torch.randn(BATCH, CHANS, height, width, dtype=dtype, requires_grad=True)
    mask_grid = (BATCH, height // patch_size, width // patch_size)
    mask = {"random": torch.rand(mask_grid) < 0.4, "zeros": torch.zeros(mask_grid, dtype=torch.bool),
            "ones": torch.ones(mask_grid, dtype=torch.bool)}[mask_kind]
    return features, mask, weight, bias, target


def run(op, features, mask, weight, bias, target, stride, patch_size, norm_target=None):
    """Loss and the gradients of (features, weight, bias, target) that exist (bias may be None)."""
    inputs = [t for t in (features, weight, bias, target) if t is not None and t.requires_grad]
    loss = op(features, mask, weight, bias, target, stride, patch_size, CHANS, norm_target)
    return loss.detach(), torch.autograd.grad(loss, inputs)


def fast(*args, norm_target=None):
    with simmim_fast.use_backend("triton"):
        return run(ops.masked_decoder_loss, *args, norm_target=norm_target)


def assert_matches_reference(*args, dtype=torch.float32, norm_target=None):
    loss, grads = fast(*args, norm_target=norm_target)
    ref_loss, ref_grads = run(reference.masked_decoder_loss, *args, norm_target=norm_target)
    assert loss.dtype == ref_loss.dtype
    assert_close_cpu(loss, ref_loss, "loss", dtype)
    assert len(grads) == len(ref_grads)
    for name, grad, ref_grad in zip(NAMES, grads, ref_grads):
        assert grad.dtype == ref_grad.dtype, name
        assert_close_cpu(grad, ref_grad, name, dtype)
    return loss, grads


@pytest.mark.parametrize("stride, patch_size", [(8, 8), (8, 4)], ids=["vit_like", "swin_like"])
@pytest.mark.parametrize("mask_kind", ["random", "ones"])
def test_matches_reference(stride, patch_size, mask_kind):
    assert_matches_reference(*make_inputs(stride, patch_size, mask_kind), stride, patch_size)


def test_stride_not_a_power_of_two():
    """36x60 images, stride 6 and patch 3: 108 decoder outputs, a token covering 2x2 mask entries."""
    assert_matches_reference(*make_inputs(6, 3, size=(36, 60)), 6, 3)


def test_channels_last_features_without_bias():
    assert_matches_reference(*make_inputs(8, 4, bias=False, channels_last_view=True), 8, 4)


def test_target_without_grad_and_sliced_mask_transposed():
    features, mask, weight, bias, _ = make_inputs(8, 4)
    target = torch.randn(BATCH, CHANS, HEIGHT, WIDTH + 8)[..., 5:5 + WIDTH]
    mask = mask.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (target.is_contiguous() or mask.is_contiguous())
    assert_matches_reference(features, mask, weight, bias, target, 8, 4)


def test_all_zero_mask_gives_zero_loss_and_zero_grads():
    loss, grads = fast(*make_inputs(8, 4, "zeros"), 8, 4)
    assert loss.item() == 0.0
    assert len(grads) == 4 and all(torch.count_nonzero(g) == 0 for g in grads)


def test_float16():
    assert_matches_reference(*make_inputs(8, 4, dtype=torch.float16), 8, 4, dtype=torch.float16)


def test_deterministic():
    inputs = make_inputs(8, 4)
    first_loss, first_grads = fast(*inputs, 8, 4)
    second_loss, second_grads = fast(*inputs, 8, 4)
    assert torch.equal(first_loss, second_loss)
    assert all(torch.equal(a, b) for a, b in zip(first_grads, second_grads))


def test_stride_not_a_multiple_of_patch_is_refused():
    features, mask, weight, bias, target = make_inputs(4, 8)
    with simmim_fast.use_backend("triton"), pytest.raises(simmim_fast.dispatch.BackendError, match="multiple"):
        ops.masked_decoder_loss(features, mask, weight, bias, target, 4, 8, CHANS)


def test_cpu_bfloat16_autocast_is_refused_on_the_interpreter(device):
    """The conv would run in bf16 there, and the interpreter's bf16 tl.dot is wrong."""
    if device.type != "cpu":
        pytest.skip("native kernels take bf16 autocast")
    features, mask, weight, bias, target = make_inputs(8, 8)
    with simmim_fast.use_backend("triton"), torch.autocast("cpu", dtype=torch.bfloat16), \
            pytest.raises(simmim_fast.dispatch.BackendError, match="autocast"):
        ops.masked_decoder_loss(features, mask, weight, bias, target, 8, 8, CHANS)


@pytest.mark.parametrize("recipe", ["vit_b_224", "vit_b_384", "swin_b_192_w6", "swin_l_192_w12"])
def test_grids_fit_cuda_limits_at_large_batch(recipe):
    """The launchers at batch 32768 on meta tensors (nothing runs). Token blocks share grid axis 0 with the channel
    tiles: on axis 1, as before, ViT-B's pass 65535 from batch ~21k."""
    from simmim_fast.kernels import masked_decoder_loss, masked_l1_loss
    from tests.kernel_launches import LARGE_BATCH, RECIPES, assert_grids_fit, recorded_launches

    image, patch, _, stride, enc_chans, _ = RECIPES[recipe]
    meta = dict(device="meta")
    features = torch.empty(LARGE_BATCH, enc_chans, image // stride, image // stride, **meta)
    mask = torch.empty(LARGE_BATCH, image // patch, image // patch, dtype=torch.bool, **meta)
    weight = torch.empty(stride * stride * 3, enc_chans, 1, 1, **meta)
    bias = torch.empty(stride * stride * 3, **meta)
    target = torch.empty(LARGE_BATCH, 3, image, image, **meta)
    with recorded_launches(masked_decoder_loss, masked_l1_loss) as launches:
        loss, denominator, order, num_active, sign = masked_decoder_loss._launch_forward(
            features, mask, weight, bias, target, stride, patch, 3, None, torch.bfloat16, torch.float32, "ieee")
        masked_decoder_loss._launch_backward(loss, denominator, features, weight, bias, target, order, num_active,
                                             sign, stride, 3, torch.bfloat16, "ieee", True, True, True)
        masked_decoder_loss._launch_forward(features, mask, weight, bias, target, stride, patch, 3, 47,
                                            torch.bfloat16, torch.float32, "ieee")
    assert_grids_fit(launches, ["_masked_decoder_loss_fwd_kernel", "_masked_l1_loss_finish_kernel",
                                "_masked_decoder_loss_bwd_features_kernel", "_masked_decoder_loss_bwd_weight_kernel",
                                "_normalized_target_kernel"])


def test_weight_grad_splits_tokens_across_programs():
    """ViT-B on an H100: 144 (o, k) tiles alone leave 132 SMs with one program each and a tail of 12; the tokens
    are split so the device sees ~8 waves, each split a fixed-order fp32 partial."""
    from simmim_fast.kernels import masked_decoder_loss
    from tests.kernel_launches import recorded_launches

    meta = dict(device="meta")
    features = torch.empty(128, 768, 14, 14, **meta)
    mask = torch.empty(128, 14, 14, dtype=torch.bool, **meta)
    weight, bias = torch.empty(768, 768, 1, 1, **meta), torch.empty(768, **meta)
    target = torch.empty(128, 3, 224, 224, **meta)
    with recorded_launches(masked_decoder_loss) as launches:
        masked_decoder_loss._launch_backward(torch.empty((), **meta), torch.empty((), **meta), features, weight, bias,
                                             target, torch.empty(128 * 196, dtype=torch.int32, **meta),
                                             torch.empty(1, dtype=torch.int32, **meta),
                                             torch.empty(128 * 196, 768, dtype=torch.int8, **meta), 16, 3,
                                             torch.bfloat16, "ieee", False, True, False)
    (name, grid, _), = launches
    assert name == "_masked_decoder_loss_bwd_weight_kernel" and grid == (12, 12, 8)


def test_torch_compile_fullgraph_matches_eager():
    from simmim_fast.kernels.masked_decoder_loss import masked_decoder_loss
    from tests.compiled import assert_compiled_matches_eager

    features, mask, weight, bias, target = make_inputs(8, 4)
    assert_compiled_matches_eager(
        lambda features, weight, bias, target: masked_decoder_loss(features, mask, weight, bias, target, 8, 4, CHANS),
        features, weight, bias, target)


# ---- the normalised target (the successor's NORM_TARGET) ----------------------------------------------

@pytest.mark.parametrize("stride, patch_size, size, window, mask_kind", [
    (8, 8, (HEIGHT, WIDTH), 47, "random"),  # the window wider than the image: every window clipped
    (8, 4, (HEIGHT, WIDTH), 5, "ones"),
    (8, 4, (HEIGHT, WIDTH), 3, "random"),
    (6, 3, (36, 60), 7, "random"),  # a stride that is not a power of two
], ids=["vit_like_w47", "swin_like_w5_all_masked", "swin_like_w3", "stride6_w7"])
def test_norm_target_matches_reference(stride, patch_size, size, window, mask_kind):
    features, mask, weight, bias, target = make_inputs(stride, patch_size, mask_kind, size=size)
    target = target.detach()  # the fused normalised target gives the target no gradient
    target[0, :, :10, :12] = 0.7  # a flat region: variance 0 there
    assert_matches_reference(features, mask, weight, bias, target, stride, patch_size, norm_target=window)


def test_norm_target_all_zero_mask_and_channels_last_target_without_bias():
    features, mask, weight, _, target = make_inputs(8, 4, "zeros", bias=False)
    loss, grads = fast(features, mask, weight, None, target.detach(), 8, 4, norm_target=5)
    assert loss.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads)
    features, mask, weight, _, target = make_inputs(8, 4, bias=False, channels_last_view=True)
    target = target.detach().to(memory_format=torch.channels_last)
    assert_matches_reference(features, mask, weight, None, target, 8, 4, norm_target=9)


def test_normalized_targets_within_twice_torch_error():
    """The kernel's normalised target itself, at every active token's pixels, against the float64 oracle:
    no further from it than twice the fp32 reference (the variance's E[x^2] - E[x]^2 cancels in both).
    Unnormalised pixels in 0..255 and a flat region make the cancellation real."""
    from simmim_fast.kernels.masked_decoder_loss import _active_first_order, _normalized_targets
    from tests.tolerances import assert_within_torch_error

    stride, patch, window, (height, width) = 8, 4, 11, (40, 56)
    target = torch.randint(0, 256, (BATCH, CHANS, height, width)).float()
    target[1, :, 8:30, 8:30] = 117.0
    mask = torch.rand(BATCH, height // patch, width // patch) < 0.5
    grid = (height // stride, width // stride)
    order, num_active = _active_first_order(mask, stride, patch)
    active = order[:int(num_active)].long()
    got = _normalized_targets(target, order, num_active, stride, window, grid[1], BATCH * grid[0] * grid[1])

    def per_token(image):  # (B, C, H, W) -> the kernel's rows: (token, c * s * s + i * s + j)
        tokens = image.reshape(BATCH, CHANS, grid[0], stride, grid[1], stride).permute(0, 2, 4, 1, 3, 5)
        return tokens.reshape(-1, CHANS * stride * stride)[active]

    assert_within_torch_error(got[:len(active)], per_token(reference.normalized_target(target, window)),
                              per_token(reference.normalized_target(target.double(), window)), "normalised target")


def test_norm_target_deterministic():
    features, mask, weight, bias, target = make_inputs(8, 4)
    first = fast(features, mask, weight, bias, target.detach(), 8, 4, norm_target=7)
    second = fast(features, mask, weight, bias, target.detach(), 8, 4, norm_target=7)
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


@pytest.mark.parametrize("window, target_grad, reason", [(251, False, "neighbourhood 258 > 256"),
                                                         (5, True, "target requires grad")])
def test_norm_target_refusals_name_the_reason(window, target_grad, reason):
    features, mask, weight, bias, target = make_inputs(8, 4)
    target.requires_grad_(target_grad)
    with simmim_fast.use_backend("triton"), pytest.raises(simmim_fast.dispatch.BackendError, match=reason):
        ops.masked_decoder_loss(features, mask, weight, bias, target, 8, 4, CHANS, window)
