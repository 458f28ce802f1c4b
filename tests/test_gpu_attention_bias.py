"""kernels/attention_bias.py on CUDA: the ViT-B shape and odd ones, in bf16/fp16 under autocast (as
the model runs it: q, k, v in the low dtype, the bias an fp32 parameter) and in fp32.

Rule (tests/tolerances.py): err(triton, high-precision ref) <= 2 x err(torch reference in the
same dtype and autocast state, high-precision ref) + floor, for the output and every gradient.
The high-precision reference is fp32 for the low dtypes and fp64 for fp32.
"""
import contextlib

import pytest
import torch

import simmim_fast
from simmim_fast import ops, reference
from tests.tolerances import assert_within_torch_error

pytestmark = pytest.mark.gpu

SHAPES = [  # (B, H, N, d)
    (64, 12, 197, 64),  # ViT-B/16 at 224: one key chunk
    (3, 2, 50, 32),
    (2, 4, 77, 80),     # d padded to 128
    (4, 2, 300, 128),   # several key chunks: dq from per-chunk partials
    (2, 2, 33, 256),
]


def make_inputs(shape, dtype, bias_kind="random"):
    batch, heads, tokens, head_dim = shape
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, device="cuda").to(dtype).permute(2, 0, 3, 1, 4)
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(0))
    if bias_kind == "none":
        bias = None
    elif bias_kind == "random":
        bias = (0.5 * torch.randn(heads, tokens, tokens, device="cuda")).requires_grad_()
    else:  # "large": +-100 and one query row fully at -100
        bias = 100.0 * torch.randn(heads, tokens, tokens, device="cuda").sign()
        bias[0, tokens // 3, :] = -100.0
        bias.requires_grad_()
    grad_out = torch.randn(batch, heads, tokens, head_dim, device="cuda").to(dtype)
    return q, k, v, bias, grad_out


def autocast_for(dtype):
    low = dtype in (torch.bfloat16, torch.float16)
    return torch.autocast("cuda", dtype=dtype) if low else contextlib.nullcontext()


def output_and_grads(fn, q, k, v, bias, grad_out, dtype, backend=None):
    inputs = [t for t in (q, k, v, bias) if t is not None]
    with simmim_fast.use_backend(backend), autocast_for(dtype):
        out = fn(q, k, v, bias)
    return [out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype))]


def check_against_torch(q, k, v, bias, grad_out, dtype):
    fast = output_and_grads(ops.attention, q, k, v, bias, grad_out, dtype, backend="triton")
    torch_lowp = output_and_grads(reference.attention, q, k, v, bias, grad_out, dtype)
    high = torch.float64 if dtype == torch.float32 else torch.float32
    exact_inputs = [t.detach().to(high).requires_grad_() if t is not None else None for t in (q, k, v, bias)]
    exact = output_and_grads(reference.attention, *exact_inputs, grad_out.to(high), high)
    names = ["output", "dq", "dk", "dv"] + ([] if bias is None else ["dbias"])
    for name, a, b, c in zip(names, fast, torch_lowp, exact):
        assert a.dtype == b.dtype, f"{name}: {a.dtype} vs torch's {b.dtype}"
        assert torch.isfinite(a).all(), name
        assert_within_torch_error(a, b, c, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_within_torch_error(shape, dtype):
    check_against_torch(*make_inputs(shape, dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias_kind", ["none", "large"])
def test_no_bias_and_large_bias(bias_kind, dtype):
    check_against_torch(*make_inputs((4, 3, 197, 64), dtype, bias_kind), dtype)


def test_dbias_is_deterministic():
    q, k, v, bias, grad_out = make_inputs((64, 12, 197, 64), torch.bfloat16)
    runs = [output_and_grads(ops.attention, q, k, v, bias, grad_out, torch.bfloat16, "triton")[-1] for _ in range(3)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_torch_compile():
    q, k, v, bias, grad_out = make_inputs((2, 3, 197, 64), torch.bfloat16)

    def step(q, k, v, bias):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return (ops.attention(q, k, v, bias) * 2.0).float().square().sum()

    with simmim_fast.use_backend("triton"):
        loss = torch.compile(step)(q, k, v, bias)
        grads = torch.autograd.grad(loss, (q, k, v, bias))
        eager_loss = step(q, k, v, bias)
        eager_grads = torch.autograd.grad(eager_loss, (q, k, v, bias))
    torch.testing.assert_close(loss, eager_loss)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad)
