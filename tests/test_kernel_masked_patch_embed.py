"""Triton masked patch embedding against the reference, fp32, on tiny odd shapes (TRITON_INTERPRET=1 on CPU).

Image 40x56 with patch 8 is a 5x7 token grid; D=24 and C*p*p=192 are not tile multiples, so every
tile has masked lanes. Forward and every gradient are compared with ``reference.masked_patch_embed``.
"""
import pytest
import torch

import simmim_fast
from simmim_fast import ops, reference
from simmim_fast.dispatch import BackendError
from conftest import kernel_device
from tolerances import assert_close_cpu, assert_within_torch_error

pytestmark = pytest.mark.interpreter

BATCH, CHANS, HEIGHT, WIDTH, PATCH, DIM = 3, 3, 40, 56, 8, 24
GRID = (HEIGHT // PATCH, WIDTH // PATCH)
TOKENS = GRID[0] * GRID[1]


def make_inputs(bias=True, pos=True, norm=True, mask="random", mask_dtype=torch.int64, image_grad=False, dim=DIM):
    """Parameters at realistic scales (outputs O(1)) so that fp32 rounding stays far below the tolerance."""
    features = CHANS * PATCH * PATCH
    image = torch.randn(BATCH, CHANS, HEIGHT, WIDTH, requires_grad=image_grad)
    token_mask = {
        "random": torch.rand(BATCH, *GRID) < 0.6,
        "zeros": torch.zeros(BATCH, *GRID, dtype=torch.bool),
        "ones": torch.ones(BATCH, *GRID, dtype=torch.bool),
    }[mask].to(mask_dtype)
    leaf = lambda t: t.requires_grad_()  # noqa: E731
    return dict(
        image=image,
        mask=token_mask,
        weight=leaf(torch.randn(dim, CHANS, PATCH, PATCH) * features ** -0.5),
        bias=leaf(torch.randn(dim) * 0.1) if bias else None,
        mask_token=leaf(torch.randn(1, 1, dim) * 0.5),
        pos_embed=leaf(torch.randn(1, TOKENS, dim) * 0.5) if pos else None,
        norm_weight=leaf(1.0 + 0.1 * torch.randn(dim)) if norm else None,
        norm_bias=leaf(0.1 * torch.randn(dim)) if norm else None,
    )


def triton_op(**inputs):
    with simmim_fast.use_backend("triton"):
        return ops.masked_patch_embed(**inputs)


def outputs_and_grads(op, inputs, grad_out):
    out = op(**inputs)
    leaves = {name: t for name, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    return out, dict(zip(leaves, grads))


def assert_matches_reference(inputs):
    grad_out = torch.randn(BATCH, TOKENS, inputs["weight"].shape[0])
    out, grads = outputs_and_grads(triton_op, inputs, grad_out)
    expected, expected_grads = outputs_and_grads(reference.masked_patch_embed, inputs, grad_out)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert_close_cpu(out, expected, "output")
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == expected_grads[name].dtype, name
        assert_close_cpu(grad, expected_grads[name], f"grad of {name}")
    return grads


# Every pair of (bias, pos_embed, patch_norm) settings appears once.
@pytest.mark.parametrize("bias, pos, norm", [(False, False, False), (False, True, True), (True, False, True),
                                             (True, True, False)], ids=["plain", "pos_norm", "bias_norm", "bias_pos"])
def test_matches_reference_random_mask(bias, pos, norm):
    assert_matches_reference(make_inputs(bias=bias, pos=pos, norm=norm))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32], ids=["bool", "float"])
@pytest.mark.parametrize("mask", ["zeros", "ones"])
def test_matches_reference_uniform_masks(mask, mask_dtype):
    grads = assert_matches_reference(make_inputs(mask=mask, mask_dtype=mask_dtype, image_grad=True))
    if mask == "ones":  # every embedding is replaced: nothing reaches the projection, the norm or the image
        for name in ("image", "weight", "bias", "norm_weight", "norm_bias"):
            assert not grads[name].any(), name


@pytest.mark.parametrize("norm", [False, True], ids=["no_norm", "patch_norm"])
def test_image_grad(norm):
    assert_matches_reference(make_inputs(norm=norm, image_grad=True))


@pytest.mark.parametrize("norm", [False, True], ids=["no_norm", "patch_norm"])
def test_several_channel_tiles(norm):
    """D=136: two channel tiles without the norm, a 256-wide row (and several weight-grad K tiles) with it."""
    assert_matches_reference(make_inputs(norm=norm, image_grad=True, dim=136))


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_non_contiguous_image(layout):
    inputs = make_inputs(image_grad=True)
    if layout == "channels_last":
        image = inputs["image"].detach().to(memory_format=torch.channels_last)
    else:  # every other column of a wider (B, H, C, 2W) buffer: no unit stride anywhere; a transposed mask
        image = torch.randn(BATCH, HEIGHT, CHANS, 2 * WIDTH).transpose(1, 2)[..., ::2]
        inputs["mask"] = (torch.rand(BATCH, GRID[1], GRID[0]) < 0.6).transpose(1, 2)
        assert not inputs["mask"].is_contiguous()
    assert not image.is_contiguous()
    inputs["image"] = image.requires_grad_()
    grads = assert_matches_reference(inputs)
    if layout == "channels_last":  # the gradient comes back in the image's memory format
        assert grads["image"].is_contiguous(memory_format=torch.channels_last)


def test_frozen_parameters_get_no_grad():
    inputs = make_inputs()
    for name in ("weight", "bias", "pos_embed", "norm_weight", "norm_bias"):
        inputs[name].requires_grad_(False)
    grads = assert_matches_reference(inputs)
    assert set(grads) == {"mask_token"}


def test_wide_patch_norm_is_refused():
    """A LayerNorm row must fit one program; wider ones are left to other backends."""
    dim = 1032
    inputs = dict(image=torch.randn(1, CHANS, PATCH, PATCH), mask=torch.zeros(1, 1, 1),
                  weight=torch.randn(dim, CHANS, PATCH, PATCH), bias=None, mask_token=torch.zeros(1, 1, dim),
                  norm_weight=torch.ones(dim), norm_bias=torch.zeros(dim))
    with pytest.raises(BackendError, match="patch_norm over 1032"):
        triton_op(**inputs)


def test_deterministic():
    inputs = make_inputs(image_grad=True)
    grad_out = torch.randn(BATCH, TOKENS, DIM)
    first, first_grads = outputs_and_grads(triton_op, inputs, grad_out)
    second, second_grads = outputs_and_grads(triton_op, inputs, grad_out)
    assert torch.equal(first, second)
    for name, grad in first_grads.items():
        assert torch.equal(grad, second_grads[name]), name


def assert_float16_within_torch_error(inputs, autocast):
    """fp16 rounds every dot operand, so compare as the GPU tests do: the kernel's error against the fp32
    reference within twice torch's own fp16 error (autocast, or fp16 parameters) plus the fp16 floor."""
    grad_out = torch.randn(BATCH, TOKENS, DIM)
    fp32_inputs = {name: t if t is None or name == "mask" else t.detach().float().requires_grad_(t.requires_grad)
                   for name, t in inputs.items()}
    expected, expected_grads = outputs_and_grads(reference.masked_patch_embed, fp32_inputs, grad_out)
    with torch.autocast(kernel_device().type, dtype=torch.float16, enabled=autocast):
        out, grads = outputs_and_grads(triton_op, inputs, grad_out.to(expected.dtype if autocast else torch.float16))
        torch_out, torch_grads = outputs_and_grads(reference.masked_patch_embed, inputs, grad_out.to(out.dtype))
    assert out.dtype == torch_out.dtype == (torch.float32 if autocast else torch.float16)
    assert_within_torch_error(out, torch_out, expected, "output")
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        assert_within_torch_error(grad, torch_grads[name], expected_grads[name], f"grad of {name}")


@pytest.mark.parametrize("norm", [False, True], ids=["no_norm", "patch_norm"])
def test_autocast_float16(norm):
    """Under autocast the conv runs in fp16 (its output rounded to fp16), the norm in fp32, and the blend
    with the fp32 mask token promotes back to fp32, exactly as the reference."""
    assert_float16_within_torch_error(make_inputs(norm=norm, image_grad=True), autocast=True)


def test_float16_parameters():
    inputs = {name: t if t is None or name == "mask" else t.detach().half().requires_grad_()
              for name, t in make_inputs().items()}
    assert_float16_within_torch_error(inputs, autocast=False)


@pytest.mark.parametrize("recipe", ["vit_b_224", "vit_b_384", "swin_b_192_w6", "swin_b_224_w7", "swin_l_192_w12"])
def test_grids_fit_cuda_limits_at_large_batch(recipe):
    """The launchers at batch 32768 on meta tensors (nothing runs). Token blocks are on grid axis 0: on axis 1, as
    the forward had them, Swin at 192 px passed 65535 from batch 1821."""
    from simmim_fast.kernels import masked_patch_embed
    from tests.kernel_launches import LARGE_BATCH, RECIPES, assert_grids_fit, recorded_launches

    image_size, patch, dim, _, _, norm = RECIPES[recipe]
    grid = image_size // patch
    meta = dict(device="meta")
    image = torch.empty(LARGE_BATCH, 3, image_size, image_size, **meta)
    mask = torch.empty(LARGE_BATCH, grid, grid, dtype=torch.bool, **meta)
    weight, bias, mask_token = (torch.empty(dim, 3, patch, patch, **meta), torch.empty(dim, **meta),
                                torch.empty(1, 1, dim, **meta))
    pos_embed = None if norm else torch.empty(1, grid * grid, dim, **meta)
    norm_weight, norm_bias = (torch.empty(dim, **meta), torch.empty(dim, **meta)) if norm else (None, None)
    with recorded_launches(masked_patch_embed) as launches:
        out, order, num_visible, masked = masked_patch_embed._launch_forward(
            image, mask, weight, bias, mask_token, pos_embed, norm_weight, norm_bias, 1e-5, torch.bfloat16,
            torch.float32, torch.float32)
        needs = [True, True, True, True, not norm, norm, norm]
        masked_patch_embed._launch_backward(out, image, weight, bias, mask_token, pos_embed, norm_weight, norm_bias,
                                            order, num_visible, masked, 1e-5, torch.bfloat16, needs)
    assert_grids_fit(launches, ["_masked_patch_embed_fwd_kernel", "_masked_patch_embed_bwd_kernel",
                                "_masked_patch_embed_bwd_tokens_kernel", "_masked_patch_embed_bwd_image_kernel"])


def test_torch_compile_fullgraph_matches_eager():
    from simmim_fast.kernels.masked_patch_embed import masked_patch_embed
    from tests.compiled import assert_compiled_matches_eager

    inputs = make_inputs(image_grad=True)
    names = ("image", "weight", "bias", "mask_token", "pos_embed", "norm_weight", "norm_bias")
    assert_compiled_matches_eager(
        lambda *tensors: masked_patch_embed(mask=inputs["mask"], **dict(zip(names, tensors))),
        *(inputs[name] for name in names))
