"""Triton masked L1 loss (kernels/masked_l1_loss.py) against the reference, on the interpreter.

Tiny odd shapes (3 images of 3x40x56, patch 8), image-shaped and pre-PixelShuffle reconstructions
(stride 8 = patch, stride 8 with patch 4 as Swin's decoder, stride 4 under patch 8), masks all-zero,
all-one and random in bool/int/float, non-contiguous views, target gradients, autocast dtypes.
"""
import numpy as np
import pytest
import torch

import simmim_fast
from simmim_fast import ops, reference
from tests.tolerances import assert_close_cpu

pytestmark = pytest.mark.interpreter

BATCH, CHANS, HEIGHT, WIDTH = 3, 3, 40, 56


def make_inputs(shuffle_stride, patch_size, mask_kind="random", mask_dtype=torch.bool, dtype=torch.float32,
                size=(HEIGHT, WIDTH)):
    s, (height, width) = shuffle_stride, size
    reconstruction = torch.randn(BATCH, CHANS * s * s, height // s, width // s, dtype=dtype, requires_grad=True)
    target = torch.randn(BATCH, CHANS, height, width, dtype=dtype, requires_grad=True)
    grid = (BATCH, height // patch_size, width // patch_size)
    mask = {"random": torch.rand(grid) < 0.6, "zeros": torch.zeros(grid, dtype=torch.bool),
            "ones": torch.ones(grid, dtype=torch.bool)}[mask_kind].to(mask_dtype)
    return reconstruction, target, mask


def run(op, reconstruction, target, mask, patch_size, shuffle_stride, in_chans=CHANS):
    """Loss and (d reconstruction, d target) on fresh grads; the inputs may be non-leaf views."""
    leaves = [t for t in (reconstruction, target) if t.requires_grad]
    loss = op(reconstruction, target, mask, patch_size, in_chans, shuffle_stride)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


def fast(*args, **kwargs):
    with simmim_fast.use_backend("triton"):
        return run(ops.masked_l1_loss, *args, **kwargs)


def assert_matches_reference(*args, dtype=torch.float32):
    loss, grads = fast(*args)
    ref_loss, ref_grads = run(reference.masked_l1_loss, *args)
    assert loss.dtype == ref_loss.dtype
    assert_close_cpu(loss, ref_loss, "loss", dtype)
    for name, grad, ref_grad in zip(("d reconstruction", "d target"), grads, ref_grads):
        assert grad.dtype == ref_grad.dtype, name
        assert_close_cpu(grad, ref_grad, name, dtype)
    return loss, grads


@pytest.mark.parametrize("shuffle_stride, patch_size", [(1, 8), (8, 8), (8, 4), (4, 8)])
@pytest.mark.parametrize("mask_kind", ["random", "ones"])
def test_matches_reference(shuffle_stride, patch_size, mask_kind):
    assert_matches_reference(*make_inputs(shuffle_stride, patch_size, mask_kind), patch_size, shuffle_stride)


def test_stride_not_a_power_of_two():
    """36x60 images, PixelShuffle(6) and patch 3: the sub-pixel axis is padded to 8 and masked."""
    assert_matches_reference(*make_inputs(6, 3, size=(36, 60)), 3, 6)


@pytest.mark.parametrize("mask_dtype", [torch.long, torch.float32, torch.float16])
def test_mask_dtypes(mask_dtype):
    """The loss's dtype follows the mask's as the reference's does (a float16 mask promotes fp32 to fp32)."""
    assert_matches_reference(*make_inputs(8, 8, mask_dtype=mask_dtype), 8, 8)


def test_all_zero_mask_gives_zero_loss_and_zero_grads():
    loss, grads = fast(*make_inputs(8, 4, "zeros"), 4, 8)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_non_contiguous_inputs_and_other_in_chans():
    """A transposed reconstruction, a target cut from a wider image, an int mask sliced along its width."""
    s, p = 8, 8
    rec_t = torch.randn(BATCH, CHANS * s * s, WIDTH // s, HEIGHT // s, requires_grad=True)
    wide = torch.randn(BATCH, CHANS, HEIGHT, WIDTH + 8, requires_grad=True)
    mask = (torch.rand(BATCH, HEIGHT // p, 2 * WIDTH // p) < 0.5).long()[:, :, ::2]
    reconstruction, target = rec_t.transpose(2, 3), wide[..., 3:3 + WIDTH]
    assert not (reconstruction.is_contiguous() or target.is_contiguous() or mask.is_contiguous())
    assert_matches_reference(reconstruction, target, mask, p, s)
    assert_matches_reference(reconstruction, target, mask, p, s, 5)


def test_target_without_grad():
    reconstruction, target, mask = make_inputs(1, 8)
    target.requires_grad_(False)
    assert_matches_reference(reconstruction, target, mask, 8, 1)


def test_float16_inputs():
    assert_matches_reference(*make_inputs(8, 4, dtype=torch.float16), 4, 8, dtype=torch.float16)


def test_autocast_dtypes(device):
    """Under autocast l1_loss runs in fp32: a bfloat16 reconstruction against an fp32 target gives fp32."""
    reconstruction, target, mask = make_inputs(8, 8)
    reconstruction = reconstruction.detach().bfloat16().requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss, grads = fast(reconstruction, target, mask, 8, 8)
        ref_loss, ref_grads = run(reference.masked_l1_loss, reconstruction, target, mask, 8, 8)
    assert loss.dtype == ref_loss.dtype == torch.float32
    assert_close_cpu(loss, ref_loss, "loss")
    assert [g.dtype for g in grads] == [g.dtype for g in ref_grads] == [torch.bfloat16, torch.float32]
    for name, grad, ref_grad in zip(("d reconstruction", "d target"), grads, ref_grads):
        assert_close_cpu(grad.float(), ref_grad.float(), name)


def test_deterministic():
    inputs = make_inputs(8, 4)
    first_loss, first_grads = fast(*inputs, 4, 8)
    second_loss, second_grads = fast(*inputs, 4, 8)
    assert torch.equal(first_loss, second_loss)
    assert all(torch.equal(a, b) for a, b in zip(first_grads, second_grads))


def test_masked_pixel_count_is_exact_in_integers():
    """The denominator is the integer sum of the per-program counts, rounded to fp32 once as the reference's int64
    count: 3000 counts of ~1.5 M (4.5e9 in all, past int32 too) over three blocks of the finishing loop, a total
    that a float32 accumulation gets wrong."""
    from simmim_fast.kernels.masked_l1_loss import finish_loss
    from simmim_fast.reference import LOSS_EPS

    counts = torch.randint(2 ** 20, 2 ** 21, (3000,), dtype=torch.int32)
    exact = counts.sum(dtype=torch.int64)
    assert exact > 2 ** 32
    expected = exact.float() + LOSS_EPS
    float32_count = np.cumsum(counts.numpy().astype(np.float32), dtype=np.float32)[-1]  # counting in fp32
    assert torch.tensor(float32_count) + LOSS_EPS != expected
    loss, denominator = finish_loss(torch.ones(3000), counts, 3, torch.float32)
    assert denominator.dtype == torch.float32 and torch.equal(denominator, expected)
    assert torch.equal(loss, torch.tensor(3000.0) / expected / 3)


@pytest.mark.parametrize("recipe", ["vit_b_224", "swin_b_192_w6"])
def test_grids_fit_cuda_limits_at_large_batch(recipe):
    """The launchers at batch 32768 on meta tensors (nothing runs): a 1-D grid-stride grid of fixed size."""
    from simmim_fast.kernels import masked_l1_loss
    from tests.kernel_launches import LARGE_BATCH, RECIPES, assert_grids_fit, recorded_launches

    image, patch, _, stride, _, _ = RECIPES[recipe]
    target = torch.empty(LARGE_BATCH, 3, image, image, device="meta")
    reconstruction = torch.empty(LARGE_BATCH, 3 * stride * stride, image // stride, image // stride, device="meta")
    mask = torch.empty(LARGE_BATCH, image // patch, image // patch, dtype=torch.bool, device="meta")
    with recorded_launches(masked_l1_loss) as launches:
        loss, denominator = masked_l1_loss._launch_forward(reconstruction, target, mask, patch, 3, stride,
                                                           torch.float32)
        masked_l1_loss._launch_backward(loss, denominator, reconstruction, target, mask, patch, 3, stride, True, True)
    assert_grids_fit(launches, ["_masked_l1_loss_fwd_kernel", "_masked_l1_loss_finish_kernel",
                                "_masked_l1_loss_bwd_kernel"])


def test_torch_compile_fullgraph_matches_eager():
    from simmim_fast.kernels.masked_l1_loss import masked_l1_loss
    from tests.compiled import assert_compiled_matches_eager

    reconstruction, target, mask = make_inputs(8, 4)
    assert_compiled_matches_eager(lambda rec, tgt: masked_l1_loss(rec, tgt, mask, 4, CHANS, 8), reconstruction, target)
