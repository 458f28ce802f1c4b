"""Triton masked patch embedding on CUDA at the real shapes: ViT-B/16 at 224 and Swin-B at 192.

The oracle is the reference in float64; the kernel's error must stay within twice torch's own error in
the same precision (autocast bf16/fp16, or fp32 with TF32 off) plus the floor (tests/tolerances.py).
"""
import contextlib

import pytest
import torch

import simmim_fast
from simmim_fast import ops, reference
from tolerances import assert_within_torch_error

pytestmark = pytest.mark.gpu

MASK_PATCH, MASK_RATIO = 32, 0.6  # the SimMIM recipe's mask generator
# name: (batch, image size, patch, dim, patch_norm, pos_embed, image grad)
SHAPES = {
    "vit_b16_224": (64, 224, 16, 768, False, False, False),
    "vit_b16_224_pos_image_grad": (64, 224, 16, 768, False, True, True),
    "swin_b_192": (64, 192, 4, 128, True, False, False),
    "swin_b_192_image_grad": (64, 192, 4, 128, True, False, True),
}


@contextlib.contextmanager
def conv_without_tf32():
    """torch's fp32 error is that of fp32, not TF32, cuDNN's default for convolutions."""
    previous = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cudnn.conv.fp32_precision = previous


def simmim_mask(batch, image_size, patch, device):
    """60% of the 32x32 cells masked, per image, at token resolution."""
    cells = image_size // MASK_PATCH
    count = int(round(cells * cells * MASK_RATIO))
    chosen = torch.rand(batch, cells * cells, device=device).argsort(1)[:, :count]
    mask = torch.zeros(batch, cells * cells, device=device, dtype=torch.int64).scatter_(1, chosen, 1)
    scale = MASK_PATCH // patch
    return mask.view(batch, cells, cells).repeat_interleave(scale, 1).repeat_interleave(scale, 2)


def make_inputs(name):
    batch, size, patch, dim, norm, pos, image_grad = SHAPES[name]
    device = "cuda"
    proj = torch.nn.Conv2d(3, dim, patch, stride=patch, device=device)
    leaf = lambda t: t.detach().requires_grad_()  # noqa: E731
    grid = size // patch
    return dict(
        image=torch.randn(batch, 3, size, size, device=device).requires_grad_(image_grad),
        mask=simmim_mask(batch, size, patch, device),
        weight=leaf(proj.weight),
        bias=leaf(proj.bias),
        mask_token=leaf(0.02 * torch.randn(1, 1, dim, device=device)),
        pos_embed=leaf(0.02 * torch.randn(1, grid * grid, dim, device=device)) if pos else None,
        norm_weight=leaf(1.0 + 0.1 * torch.randn(dim, device=device)) if norm else None,
        norm_bias=leaf(0.1 * torch.randn(dim, device=device)) if norm else None,
    )


def run(op, inputs, grad_out, dtype):
    """Output and grads of every input that requires grad, under autocast for bf16/fp16."""
    leaves = {name: t for name, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = op(**inputs)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))
    return out, dict(zip(leaves, grads))


def triton_op(**inputs):
    with simmim_fast.use_backend("triton"):
        return ops.masked_patch_embed(**inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_reference(name, dtype):
    inputs = make_inputs(name)
    grad_out = torch.randn(*inputs["mask"].shape[:1], inputs["mask"][0].numel(), inputs["weight"].shape[0],
                           device="cuda")
    fp64_inputs = {key: t if t is None or key == "mask" else t.detach().double().requires_grad_(t.requires_grad)
                   for key, t in inputs.items()}
    expected, expected_grads = run(reference.masked_patch_embed, fp64_inputs, grad_out.double(), torch.float32)
    with conv_without_tf32():
        torch_out, torch_grads = run(reference.masked_patch_embed, inputs, grad_out, dtype)
    out, grads = run(triton_op, inputs, grad_out, dtype)

    assert out.dtype == torch_out.dtype == torch.float32  # the blend with the fp32 mask token promotes
    assert_within_torch_error(out, torch_out, expected, "output")
    assert grads.keys() == expected_grads.keys()
    for key, grad in grads.items():
        assert grad.dtype == inputs[key].dtype, key
        assert_within_torch_error(grad, torch_grads[key], expected_grads[key], f"grad of {key}")


@pytest.mark.parametrize("name", ["vit_b16_224_pos_image_grad", "swin_b_192_image_grad"])
def test_deterministic(name):
    inputs = make_inputs(name)
    grad_out = torch.randn(*inputs["mask"].shape[:1], inputs["mask"][0].numel(), inputs["weight"].shape[0],
                           device="cuda")
    first, first_grads = run(triton_op, inputs, grad_out, torch.bfloat16)
    second, second_grads = run(triton_op, inputs, grad_out, torch.bfloat16)
    assert torch.equal(first, second)
    for key, grad in first_grads.items():
        assert torch.equal(grad, second_grads[key]), key


@pytest.mark.parametrize("name", ["vit_b16_224_pos_image_grad", "swin_b_192"])
def test_torch_compile(name):
    """torch.compile through the op (an autograd.Function around the kernels) gives the eager results."""
    inputs = make_inputs(name)
    grad_out = torch.randn(*inputs["mask"].shape[:1], inputs["mask"][0].numel(), inputs["weight"].shape[0],
                           device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(triton_op)
    out, grads = run(compiled, inputs, grad_out, torch.bfloat16)
    eager_out, eager_grads = run(triton_op, inputs, grad_out, torch.bfloat16)
    torch.testing.assert_close(out, eager_out)  # the same kernels; only the partials' sums may be reordered
    for key, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[key], msg=key)
