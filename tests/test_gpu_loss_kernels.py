"""kernels/masked_l1_loss.py, masked_decoder_loss.py and mask_token_blend.py on CUDA, at the real shapes:
ViT-B/16 at 224 (features (64, 768, 14, 14), stride = patch = 16) and Swin-B at 192 (features
(64, 1024, 6, 6), stride 32, patch 4), batch 64, SimMIM's masks (32-pixel mask patches, ratio 0.6)
and, for Swin, a mask random at the 4-pixel patch (decoder tokens partly masked).

Rule (tests/tolerances.py): err(triton, high-precision ref) <= 2 x err(torch reference in the same
dtype and autocast state, high-precision ref) + floor, for the loss and every gradient. bf16/fp16 run
the decoder as the model does, under autocast with fp32 parameters; the high-precision reference is
fp32 without TF32 for those, fp64 for fp32.
"""
import contextlib

import pytest
import torch

import simmim_fast
from simmim_fast import ops, reference
from simmim_fast.masking import MaskGenerator
from tests.tolerances import assert_within_torch_error

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOW_DTYPES = [torch.bfloat16, torch.float16]
# name: (image size, encoder channels, encoder stride, patch size, mask patch size; None: random per patch)
GEOMETRIES = {
    "vit_b16_224": (224, 768, 16, 16, 32),
    "swin_b_192": (192, 1024, 32, 4, 32),
    "swin_b_192_patch_mask": (192, 1024, 32, 4, None),
}
BATCH, CHANS = 64, 3


def make_mask(image_size, patch_size, mask_patch_size):
    if mask_patch_size is None:
        side = image_size // patch_size
        return (torch.rand(BATCH, side, side, device="cuda") < 0.6).long()
    generator = MaskGenerator(image_size, mask_patch_size, patch_size, 0.6)
    return generator.generate(BATCH, device="cuda")


@contextlib.contextmanager
def exact_fp32():
    """The high-precision reference's convs without TF32 (cuDNN allows it by default)."""
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = allowed


def autocast_for(dtype):
    low = dtype in (torch.bfloat16, torch.float16)
    return torch.autocast("cuda", dtype=dtype) if low else contextlib.nullcontext()


def loss_and_grads(fn, args, backend=None, autocast=contextlib.nullcontext()):
    inputs = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
    with simmim_fast.use_backend(backend), autocast:
        loss = fn(*args)
    return [loss, *torch.autograd.grad(loss, inputs)]


def high_precision(args, dtype):
    high = torch.float64 if dtype == torch.float32 else torch.float32
    return [t.detach().to(high).requires_grad_(t.requires_grad)
            if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]


def check_against_torch(fast_fn, torch_fn, args, dtype, names, autocast=contextlib.nullcontext()):
    fast = loss_and_grads(fast_fn, args, "triton", autocast)
    torch_lowp = loss_and_grads(torch_fn, args, None, autocast)
    with exact_fp32():
        exact = loss_and_grads(torch_fn, high_precision(args, dtype))
    for name, a, b, c in zip(names, fast, torch_lowp, exact):
        assert a.dtype == b.dtype, f"{name}: {a.dtype} vs torch's {b.dtype}"
        assert torch.isfinite(a).all(), name
        assert_within_torch_error(a, b, c, name)


def decoder_inputs(geometry, dtype):
    """features, mask, weight, bias, target, stride, patch, in_chans; low dtypes as the model has them
    under autocast: fp32 features (the encoder's final LayerNorm) and fp32 parameters."""
    image_size, enc_chans, stride, patch, mask_patch = GEOMETRIES[geometry]
    grid = image_size // stride
    # The ViT's (B, L, C) tokens viewed as (B, C, h, w), as SimMIM's encoder returns them.
    features = torch.randn(BATCH, grid * grid, enc_chans, device="cuda").transpose(1, 2).reshape(
        BATCH, enc_chans, grid, grid).detach().requires_grad_()
    out_chans = stride * stride * CHANS
    weight = (torch.randn(out_chans, enc_chans, 1, 1, device="cuda") * enc_chans ** -0.5).requires_grad_()
    bias = (0.1 * torch.randn(out_chans, device="cuda")).requires_grad_()
    target = torch.randn(BATCH, CHANS, image_size, image_size, device="cuda")
    return [features, make_mask(image_size, patch, mask_patch), weight, bias, target, stride, patch, CHANS]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_masked_decoder_loss_within_torch_error(geometry, dtype):
    check_against_torch(ops.masked_decoder_loss, reference.masked_decoder_loss, decoder_inputs(geometry, dtype), dtype,
                        ["loss", "d features", "d weight", "d bias"], autocast_for(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", ["vit_b16_224", "swin_b_192_patch_mask"])
def test_masked_decoder_loss_norm_target_within_torch_error(geometry, dtype):
    """The successor's normalised target (window 47, as its Swin V2 recipe) fused: its band sums run as
    tf32x3 on tensor cores, which the interpreter cannot show."""
    check_against_torch(ops.masked_decoder_loss, reference.masked_decoder_loss,
                        decoder_inputs(geometry, dtype) + [47], dtype, ["loss", "d features", "d weight", "d bias"],
                        autocast_for(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry, shuffled", [("vit_b16_224", True), ("vit_b16_224", False),
                                                 ("swin_b_192", True), ("swin_b_192_patch_mask", True)])
def test_masked_l1_loss_within_torch_error(geometry, shuffled, dtype):
    """The decoder output before PixelShuffle (or the image-shaped reconstruction) and the target in dtype.
    Small values keep the fp16 reference's sum of |x - x_rec| (an fp16 tensor) finite."""
    image_size, _, stride, patch, mask_patch = GEOMETRIES[geometry]
    s = stride if shuffled else 1
    reconstruction = 0.005 * torch.randn(BATCH, CHANS * s * s, image_size // s, image_size // s, device="cuda")
    target = 0.005 * torch.randn(BATCH, CHANS, image_size, image_size, device="cuda")
    args = [reconstruction.to(dtype).requires_grad_(), target.to(dtype).requires_grad_(),
            make_mask(image_size, patch, mask_patch), patch, CHANS, s]
    check_against_torch(ops.masked_l1_loss, reference.masked_l1_loss, args, dtype,
                        ["loss", "d reconstruction", "d target"])


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_masked_l1_loss_under_autocast(dtype):
    """The decoder output in the low dtype against the fp32 image, as in training: an fp32 loss."""
    reconstruction = torch.randn(BATCH, CHANS * 256, 14, 14, device="cuda").to(dtype).requires_grad_()
    target = torch.randn(BATCH, CHANS, 224, 224, device="cuda")
    args = [reconstruction, target, make_mask(224, 16, 32), 16, CHANS, 16]
    check_against_torch(ops.masked_l1_loss, reference.masked_l1_loss, args, dtype, ["loss", "d reconstruction"],
                        autocast_for(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("length, dim, patch", [(196, 768, 16), (48 * 48, 128, 4)], ids=["vit", "swin"])
def test_mask_token_blend_within_torch_error(length, dim, patch, dtype):
    side = int(length ** 0.5)
    tokens = torch.randn(BATCH, length, dim, device="cuda").to(dtype).requires_grad_()
    mask_token = (0.02 * torch.randn(1, 1, dim, device="cuda")).to(dtype).requires_grad_()
    mask = make_mask(side * patch, patch, 32)
    grad_out = torch.randn(BATCH, length, dim, device="cuda").to(dtype)
    with simmim_fast.use_backend("triton"):
        out = ops.mask_token_blend(tokens, mask, mask_token)
    ref_out = reference.mask_token_blend(tokens, mask, mask_token)
    assert out.dtype == ref_out.dtype and torch.equal(out, ref_out)  # a select: exact

    def against(op):  # a linear functional of the output: its gradients are the op's vector-Jacobian products
        return lambda tokens, mask, mask_token: (op(tokens, mask, mask_token).float() * grad_out.float()).sum()

    check_against_torch(against(ops.mask_token_blend), against(reference.mask_token_blend), [tokens, mask, mask_token],
                        dtype, ["sum(out * grad_out)", "d tokens", "d mask_token"])


def test_deterministic_at_real_shapes():
    args = decoder_inputs("swin_b_192_patch_mask", torch.bfloat16)
    runs = [loss_and_grads(ops.masked_decoder_loss, args, "triton", autocast_for(torch.bfloat16)) for _ in range(3)]
    for first, other in zip(runs[0], runs[1] + runs[2]):
        assert torch.equal(first, other)
    reconstruction = torch.randn(BATCH, 3 * 256, 14, 14, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = torch.randn(BATCH, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    loss_args = [reconstruction, target, make_mask(224, 16, 32), 16, CHANS, 16]
    runs = [loss_and_grads(ops.masked_l1_loss, loss_args, "triton") for _ in range(3)]
    for first, other in zip(runs[0], runs[1] + runs[2]):
        assert torch.equal(first, other)


def test_all_zero_mask():
    features, mask, *rest = decoder_inputs("vit_b16_224", torch.bfloat16)
    results = loss_and_grads(ops.masked_decoder_loss, [features, torch.zeros_like(mask), *rest], "triton",
                             autocast_for(torch.bfloat16))
    assert all(torch.count_nonzero(t) == 0 for t in results)


def test_torch_compile():
    features, mask, weight, bias, target, stride, patch, chans = decoder_inputs("vit_b16_224", torch.bfloat16)

    def step(features, weight, bias):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return ops.masked_decoder_loss(features * 2.0, mask, weight, bias, target, stride, patch, chans) * 3.0

    with simmim_fast.use_backend("triton"):
        loss = torch.compile(step)(features, weight, bias)
        grads = torch.autograd.grad(loss, (features, weight, bias))
        eager_loss = step(features, weight, bias)
        eager_grads = torch.autograd.grad(eager_loss, (features, weight, bias))
    torch.testing.assert_close(loss, eager_loss)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad)
