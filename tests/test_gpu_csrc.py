"""The CUDA C++ ops (csrc/) on a GPU against the reference: values and gradients, every mask kind,
odd and misaligned shapes (scalar fallback path), non-contiguous inputs, determinism, torch.compile
and torch.library.opcheck. Needs a CUDA device and the built extension."""
import pytest
import torch
import torch.nn.functional as F

from simmim_fast import cuda_ops, reference
from tests.tolerances import assert_close_cpu, assert_within_torch_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(bool(cuda_ops.load_error()), reason=f"CUDA extension unavailable: {cuda_ops.load_error()}"),
]

DEVICE = "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (batch, channels, height, width, patch, shuffle stride): SimMIM's two geometries, then widths
# that defeat 16-byte vectors (scalar path), patches that are not a multiple of the vector width.
LOSS_GEOMETRIES = [
    (2, 3, 64, 64, 4, 32),   # Swin: patch 4, decoder stride 32
    (2, 3, 64, 64, 16, 16),  # ViT: patch 16 = stride
    (3, 3, 48, 40, 8, 1),    # image-shaped reconstruction
    (1, 3, 12, 18, 3, 3),    # odd: width 18 is no multiple of 4 or 8
    (2, 1, 20, 28, 2, 4),    # patch 2 < vector width, stride 4
    (1, 3, 6, 10, 1, 2),     # patch 1: the mask is per pixel
]
MASK_KINDS = ("random", "all_zero", "all_one")


def make_mask(kind, shape, dtype=torch.int64):
    if kind == "all_zero":
        return torch.zeros(shape, device=DEVICE, dtype=dtype)
    if kind == "all_one":
        return torch.ones(shape, device=DEVICE, dtype=dtype)
    return torch.randint(0, 2, shape, device=DEVICE).to(dtype)


def loss_case(geometry, dtype, mask_kind):
    batch, channels, height, width, patch, stride = geometry
    recon = torch.randn(batch, channels * stride * stride, height // stride, width // stride, device=DEVICE)
    target = torch.randn(batch, channels, height, width, device=DEVICE)
    mask = make_mask(mask_kind, (batch, height // patch, width // patch))
    return recon.to(dtype), target.to(dtype), mask, patch, channels, stride


def loss_and_grads(loss_fn, recon, target, mask, patch, channels, stride):
    recon = recon.detach().requires_grad_(True)
    target = target.detach().requires_grad_(True)
    loss = loss_fn(recon, target, mask, patch, channels, stride)
    return (loss, *torch.autograd.grad(loss, (recon, target)))


def assert_loss_matches_reference(fast_outputs, inputs):
    """fp32: tight; fp16/bf16: within FACTOR x the error of torch's own run in that dtype."""
    names = ("loss", "d reconstruction", "d target")
    if inputs[0].dtype == torch.float32:
        for name, got, want in zip(names, fast_outputs, loss_and_grads(reference.masked_l1_loss, *inputs)):
            assert_close_cpu(got, want, name)
        return
    fp32_inputs = [t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs]
    exact = loss_and_grads(reference.masked_l1_loss, *fp32_inputs)
    torch_lowp = loss_and_grads(reference.masked_l1_loss, *inputs)
    for name, got, lowp, ref in zip(names, fast_outputs, torch_lowp, exact):
        assert got.dtype == lowp.dtype, name
        assert_within_torch_error(got, lowp, ref, name)


@pytest.mark.parametrize("geometry", LOSS_GEOMETRIES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_masked_l1_loss_matches_reference(geometry, dtype, mask_kind):
    inputs = loss_case(geometry, dtype, mask_kind)
    fast = loss_and_grads(cuda_ops.masked_l1_loss, *inputs)
    if mask_kind == "all_zero":
        # Exactly 0 and zero gradients. (torch's own fp16 run is no yardstick here: with in_chans 1
        # its gradient scale 1 / 1e-5 overflows fp16, and inf * 0 gives NaN.)
        assert fast[0].item() == 0.0 and not any(grad.any() for grad in fast[1:])
        return
    assert_loss_matches_reference(fast, inputs)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float32, torch.bfloat16])
def test_masked_l1_loss_mask_dtypes(mask_dtype):
    recon, target, mask, patch, channels, stride = loss_case(LOSS_GEOMETRIES[0], torch.float32, "random")
    mask = mask.to(mask_dtype)
    fast = cuda_ops.masked_l1_loss(recon, target, mask, patch, channels, stride)
    expected = reference.masked_l1_loss(recon, target, mask, patch, channels, stride)
    assert fast.dtype == expected.dtype
    assert_close_cpu(fast.float(), expected.float(), "loss")


def test_masked_l1_loss_non_contiguous_inputs():
    recon, target, mask, patch, channels, stride = loss_case(LOSS_GEOMETRIES[1], torch.float32, "random")
    recon_view = recon.transpose(2, 3).contiguous().transpose(2, 3)  # same values, transposed strides
    target_view = target.contiguous(memory_format=torch.channels_last)
    mask_view = mask.transpose(1, 2).contiguous().transpose(1, 2)
    misaligned = torch.empty(recon.numel() + 1, device=DEVICE)[1:].view_as(recon).copy_(recon)
    assert not recon_view.is_contiguous() and not target_view.is_contiguous() and not mask_view.is_contiguous()
    expected = loss_and_grads(reference.masked_l1_loss, recon, target, mask, patch, channels, stride)
    for case in ((recon_view, target_view, mask_view), (misaligned, target, mask)):
        fast = loss_and_grads(cuda_ops.masked_l1_loss, *case, patch, channels, stride)
        for name, got, want in zip(("loss", "d reconstruction", "d target"), fast, expected):
            assert_close_cpu(got, want, name)


def test_masked_l1_loss_is_deterministic():
    inputs = loss_case((8, 3, 192, 192, 4, 32), torch.bfloat16, "random")
    first = loss_and_grads(cuda_ops.masked_l1_loss, *inputs)
    for _ in range(3):
        again = loss_and_grads(cuda_ops.masked_l1_loss, *inputs)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


BLEND_SHAPES = [(2, 49, 96), (3, 64, 37), (1, 1, 8), (4, 144, 768), (2, 5, 3)]


def blend_and_grads(blend_fn, tokens, mask, mask_token, grad_out):
    tokens = tokens.detach().requires_grad_(True)
    mask_token = mask_token.detach().requires_grad_(True)
    out = blend_fn(tokens, mask, mask_token)
    return (out, *torch.autograd.grad(out, (tokens, mask_token), grad_out))


@pytest.mark.parametrize("shape", BLEND_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_mask_token_blend_matches_reference(shape, dtype, mask_kind):
    batch, length, dim = shape
    tokens = torch.randn(shape, device=DEVICE)
    mask_token = torch.randn(1, 1, dim, device=DEVICE)
    grad_out = torch.randn(shape, device=DEVICE)
    mask = make_mask(mask_kind, (batch, length))
    lowp = [t.to(dtype) for t in (tokens, mask_token, grad_out)]
    fast = blend_and_grads(cuda_ops.mask_token_blend, lowp[0], mask, lowp[1], lowp[2])
    names = ("output", "d tokens", "d mask_token")
    if dtype == torch.float32:
        expected = blend_and_grads(reference.mask_token_blend, tokens, mask, mask_token, grad_out)
        for name, got, want in zip(names, fast, expected):
            assert_close_cpu(got, want, name)
        return
    exact = blend_and_grads(reference.mask_token_blend, lowp[0].float(), mask, lowp[1].float(), lowp[2].float())
    torch_lowp = blend_and_grads(reference.mask_token_blend, lowp[0], mask, lowp[1], lowp[2])
    for name, got, lp, ref in zip(names, fast, torch_lowp, exact):
        assert got.dtype == lp.dtype == dtype, name
        assert_within_torch_error(got, lp, ref, name)


def test_mask_token_blend_non_contiguous_and_misaligned():
    tokens = torch.randn(2, 96, 49, device=DEVICE).transpose(1, 2)  # (2, 49, 96), not contiguous
    misaligned = torch.empty(tokens.numel() + 1, device=DEVICE)[1:].view(2, 49, 96).copy_(tokens)
    mask = torch.randint(0, 2, (2, 7, 7), device=DEVICE).transpose(1, 2)
    mask_token = torch.randn(1, 1, 96, device=DEVICE)
    grad_out = torch.randn(2, 49, 96, device=DEVICE)
    expected = blend_and_grads(reference.mask_token_blend, tokens, mask, mask_token, grad_out)
    for case in (tokens, misaligned):
        fast = blend_and_grads(cuda_ops.mask_token_blend, case, mask, mask_token, grad_out)
        for name, got, want in zip(("output", "d tokens", "d mask_token"), fast, expected):
            assert_close_cpu(got, want, name)


def test_mask_token_grad_is_deterministic():
    # 128 x 2304 rows: the d mask_token reduction runs over the maximum number of chunks.
    tokens = torch.randn(128, 2304, 128, device=DEVICE, dtype=torch.bfloat16)
    mask = torch.randint(0, 2, (128, 48, 48), device=DEVICE)
    mask_token = torch.randn(1, 1, 128, device=DEVICE, dtype=torch.bfloat16)
    grad_out = torch.randn_like(tokens)
    first = blend_and_grads(cuda_ops.mask_token_blend, tokens, mask, mask_token, grad_out)
    again = blend_and_grads(cuda_ops.mask_token_blend, tokens, mask, mask_token, grad_out)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_compiled_matches_eager():
    recon, target, mask, patch, channels, stride = loss_case(LOSS_GEOMETRIES[0], torch.bfloat16, "random")
    compiled = torch.compile(cuda_ops.masked_l1_loss, fullgraph=True)
    eager = loss_and_grads(cuda_ops.masked_l1_loss, recon, target, mask, patch, channels, stride)
    traced = loss_and_grads(compiled, recon, target, mask, patch, channels, stride)
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)


def test_opcheck():
    recon, target, mask, patch, channels, stride = loss_case(LOSS_GEOMETRIES[0], torch.float32, "random")
    torch.library.opcheck(torch.ops.simmim_fast.masked_l1_loss,
                          (recon.requires_grad_(True), target, mask, patch, channels, stride))
    tokens = torch.randn(2, 49, 96, device=DEVICE, requires_grad=True)
    mask_token = torch.randn(1, 1, 96, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.simmim_fast.mask_token_blend,
                          (tokens, torch.randint(0, 2, (2, 49), device=DEVICE), mask_token))


def test_decoder_output_layout_is_read_in_place():
    """The pre-shuffle path equals shuffling first and using the image-shaped path."""
    recon, target, mask, patch, channels, stride = loss_case(LOSS_GEOMETRIES[0], torch.float32, "random")
    folded = cuda_ops.masked_l1_loss(recon, target, mask, patch, channels, stride)
    shuffled = cuda_ops.masked_l1_loss(F.pixel_shuffle(recon, stride), target, mask, patch, channels, 1)
    assert_close_cpu(folded, shuffled, "loss")
