"""kernels/window_attention.py on CUDA at the Swin-B 192 window-6 stage shapes and a few others, in
bf16/fp16 under autocast (as the model runs it: q, k, v in the low dtype, the gathered bias an fp32
parameter, the shift mask an fp32 buffer) and in fp32.

Rule (tests/tolerances.py): err(triton, high-precision ref) <= 2 x err(torch reference in the same
dtype and autocast state, high-precision ref) + floor, for the output and dq, dk, dv, dbias. The
high-precision reference is fp32 for the low dtypes and fp64 for fp32.
"""
import contextlib

import pytest
import torch

import simmim_fast
from simmim_fast import ops, reference
from tests.test_kernel_window_attention import swin_shift_mask
from tests.tolerances import assert_within_torch_error

pytestmark = pytest.mark.gpu

# (images, resolution in tokens, window, shift, heads, head dim): Swin-B at 192 px, window 6, batch 64,
# then 7x7 windows (fine-tuning at 224) and 12x12 windows (Swin-L at 192: several query-row blocks).
SHAPES = [
    (64, 48, 6, 3, 4, 32),
    (64, 24, 6, 3, 8, 32),
    (64, 12, 6, 3, 16, 32),
    (64, 6, 6, 0, 32, 32),  # last stage: one window per image, no shift, no mask
    (8, 56, 7, 3, 4, 32),
    (4, 48, 12, 6, 6, 32),
]


def make_inputs(shape, dtype, bias_scale=1.0):
    images, resolution, window, shift, heads, head_dim = shape
    windows, tokens = images * (resolution // window) ** 2, window * window
    qkv = torch.randn(windows, tokens, 3, heads, head_dim, device="cuda").to(dtype).permute(2, 0, 3, 1, 4)
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(0))
    bias = (bias_scale * torch.randn(heads, tokens, tokens, device="cuda")).requires_grad_()
    window_mask = swin_shift_mask(resolution, window, shift).cuda() if shift else None
    grad_out = torch.randn(windows, heads, tokens, head_dim, device="cuda").to(dtype)
    return q, k, v, bias, window_mask, grad_out


def autocast_for(dtype):
    low = dtype in (torch.bfloat16, torch.float16)
    return torch.autocast("cuda", dtype=dtype) if low else contextlib.nullcontext()


def output_and_grads(fn, q, k, v, bias, window_mask, grad_out, dtype, backend=None):
    with simmim_fast.use_backend(backend), autocast_for(dtype):
        out = fn(q, k, v, bias, window_mask)
    return [out, *torch.autograd.grad(out, (q, k, v, bias), grad_out.to(out.dtype))]


def check_against_torch(q, k, v, bias, window_mask, grad_out, dtype):
    fast = output_and_grads(ops.window_attention, q, k, v, bias, window_mask, grad_out, dtype, backend="triton")
    torch_lowp = output_and_grads(reference.window_attention, q, k, v, bias, window_mask, grad_out, dtype)
    high = torch.float64 if dtype == torch.float32 else torch.float32
    exact_inputs = [t.detach().to(high).requires_grad_() for t in (q, k, v, bias)]
    exact_mask = None if window_mask is None else window_mask.to(high)
    exact = output_and_grads(reference.window_attention, *exact_inputs, exact_mask, grad_out.to(high), high)
    for name, a, b, c in zip(["output", "dq", "dk", "dv", "dbias"], fast, torch_lowp, exact):
        assert a.dtype == b.dtype, f"{name}: {a.dtype} vs torch's {b.dtype}"
        assert torch.isfinite(a).all(), name
        assert_within_torch_error(a, b, c, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"img{s[0]}-res{s[1]}-w{s[2]}-s{s[3]}-h{s[4]}")
def test_within_torch_error(shape, dtype):
    check_against_torch(*make_inputs(shape, dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_bias_and_fully_masked_row(dtype):
    q, k, v, bias, window_mask, grad_out = make_inputs((8, 24, 6, 3, 8, 32), dtype, bias_scale=20.0)
    window_mask[5, 7, :] = -100.0
    check_against_torch(q, k, v, bias, window_mask, grad_out, dtype)


def test_dbias_is_deterministic():
    q, k, v, bias, window_mask, grad_out = make_inputs(SHAPES[0], torch.bfloat16)
    runs = [output_and_grads(ops.window_attention, q, k, v, bias, window_mask, grad_out, torch.bfloat16, "triton")
            for _ in range(3)]
    for first, *others in zip(*runs):
        assert all(torch.equal(first, other) for other in others)


def test_torch_compile():
    q, k, v, bias, window_mask, grad_out = make_inputs((2, 12, 6, 3, 4, 32), torch.bfloat16)

    def step(q, k, v, bias, window_mask):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = ops.window_attention(q, k, v, bias, window_mask)
            return (out.transpose(1, 2).reshape(out.shape[0], -1) * 2.0).float().square().sum()

    with simmim_fast.use_backend("triton"):
        loss = torch.compile(step)(q, k, v, bias, window_mask)
        grads = torch.autograd.grad(loss, (q, k, v, bias))
        eager_loss = step(q, k, v, bias, window_mask)
        eager_grads = torch.autograd.grad(eager_loss, (q, k, v, bias))
    torch.testing.assert_close(loss, eager_loss)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad)
