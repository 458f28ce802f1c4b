"""kernels/attention_bias.py through ``ops.attention`` on the triton backend vs the reference (fp32).

Tiny odd shapes for the interpreter, whose blocks and key chunks are 64 wide: N=13 is one ragged
block; N=70 spans two blocks and two key chunks, which takes the per-chunk dq partials. The
interpreter puts 2 batches in a dbias group, so B=3 has a ragged second group.
"""
import pytest
import torch

import simmim_fast
from simmim_fast import ops, reference
from simmim_fast.kernels import attention_bias
from tests.tolerances import assert_close_cpu, assert_within_torch_error

pytestmark = pytest.mark.interpreter

HEADS = 3


def packed_qkv(batch, tokens, head_dim, dtype=torch.float32):
    """q, k, v as the ViT makes them: strided views of one (B, N, 3, H, d) projection."""
    qkv = torch.randn(batch, tokens, 3, HEADS, head_dim, dtype=dtype).permute(2, 0, 3, 1, 4)
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(0))
    assert not q.is_contiguous()
    return q, k, v


def make_bias(kind, tokens):
    if kind == "none":
        return None
    if kind == "zeros":
        bias = torch.zeros(HEADS, tokens, tokens)
    elif kind == "random":
        bias = torch.randn(HEADS, tokens, tokens)
    else:  # "large": entries of +-100 and one query row fully at -100
        bias = 100.0 * torch.randn(HEADS, tokens, tokens).sign()
        bias[1, tokens // 2, :] = -100.0
    return bias.requires_grad_()


def run_both(q, k, v, bias, scale=None, grad_out=None):
    """(output, grads) of the triton op and of the reference, for every input that requires grad."""
    inputs = [t for t in (q, k, v, bias) if t is not None and t.requires_grad]
    results = []
    for fn in (ops.attention, reference.attention):
        with simmim_fast.use_backend("triton"):
            out = fn(q, k, v, bias, scale)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        results.append((out, torch.autograd.grad(out, inputs, grad_out)))
    return results


def assert_matches(results, names):
    (out, grads), (ref_out, ref_grads) = results
    assert out.dtype == ref_out.dtype
    assert torch.isfinite(out).all()
    assert_close_cpu(out, ref_out, "output")
    for name, grad, ref_grad in zip(names, grads, ref_grads):
        assert grad.dtype == ref_grad.dtype, name
        assert_close_cpu(grad, ref_grad, name)


@pytest.mark.parametrize("tokens, head_dim, bias_kind", [
    (13, 16, "random"),
    (13, 24, "none"),
    (13, 16, "zeros"),
    (70, 24, "random"),
])
def test_matches_reference(tokens, head_dim, bias_kind):
    q, k, v = packed_qkv(2, tokens, head_dim)
    bias = make_bias(bias_kind, tokens)
    names = ["dq", "dk", "dv"] + ([] if bias is None else ["dbias"])
    assert_matches(run_both(q, k, v, bias), names)


@pytest.mark.parametrize("query_block", sorted({config.kwargs["BLOCK_M"] for config in attention_bias._DKDV_CONFIGS}))
def test_every_dkdv_query_block_matches_reference(query_block, monkeypatch):
    """dk/dv/dBias's query block is a tuner config (a GPU may choose any); the interpreter runs the
    default, so each block is made the default here, at N = 70 (ragged in 16- and 32-query blocks)."""
    tuner = attention_bias._bwd_dkdv_dbias
    chosen = [config for config in tuner.configs if config.kwargs["BLOCK_M"] == query_block]
    monkeypatch.setattr(tuner, "configs", chosen + [config for config in tuner.configs if config not in chosen])
    q, k, v = packed_qkv(3, 70, 24)
    assert_matches(run_both(q, k, v, make_bias("random", 70)), ["dq", "dk", "dv", "dbias"])


def test_large_bias_and_fully_masked_row():
    """Logits near +-100 carry fp32 rounding of ~1e-5 in any implementation, and the backward
    recomputes the probabilities from the log-sum-exp: judged against float64 by torch's own
    fp32 error (tests/tolerances.py), as the GPU tests are."""
    q, k, v = packed_qkv(2, 13, 24)
    bias = make_bias("large", 13)
    grad_out = torch.randn(2, HEADS, 13, 24)
    (out, grads), (ref_out, ref_grads) = run_both(q, k, v, bias, grad_out=grad_out)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    exact_out = reference.attention(*exact)
    exact_grads = torch.autograd.grad(exact_out, exact, grad_out.double())
    for name, fast, torch_fp32, fp64 in zip(["output", "dq", "dk", "dv", "dbias"], (out, *grads),
                                            (ref_out, *ref_grads), (exact_out, *exact_grads)):
        assert torch.isfinite(fast).all(), name
        assert_within_torch_error(fast, torch_fp32, fp64, name)


def test_custom_scale_strided_bias_and_ragged_batch_groups():
    q, k, v = packed_qkv(3, 13, 16)
    bias = torch.randn(13, 13, HEADS, requires_grad=True).permute(2, 0, 1)  # the table gather, before .contiguous()
    assert_matches(run_both(q, k, v, bias, scale=0.3), ["dq", "dk", "dv", "dbias"])


def test_grads_only_where_required():
    q, k, v = packed_qkv(2, 13, 16)
    k.requires_grad_(False)
    bias = make_bias("random", 13).requires_grad_(False)
    assert_matches(run_both(q, k, v, bias), ["dq", "dv"])
    with simmim_fast.use_backend("triton"):
        out = ops.attention(q, k, v, bias)
    out.sum().backward()  # a stride-0 upstream gradient
    assert bias.grad is None and k.grad is None and q.grad is not None


def test_dbias_is_deterministic():
    q, k, v = packed_qkv(3, 13, 16)
    bias = make_bias("random", 13)
    grad_out = torch.randn(3, HEADS, 13, 16)
    dbias = []
    for _ in range(2):
        with simmim_fast.use_backend("triton"):
            out = ops.attention(q, k, v, bias)
        dbias.append(torch.autograd.grad(out, bias, grad_out)[0])
    assert torch.equal(dbias[0], dbias[1])


def test_autocast_output_dtype(device):
    """Under autocast the reference's matmuls, and so its output, are in the autocast dtype."""
    q, k, v = packed_qkv(2, 13, 16)
    bias = make_bias("random", 13)
    with torch.autocast(device.type, dtype=torch.float16):
        (out, grads), (ref_out, ref_grads) = run_both(q, k, v, bias)
    assert out.dtype == ref_out.dtype == torch.float16
    assert_close_cpu(out, ref_out, "output", dtype=torch.float16)
    for name, grad, ref_grad in zip(["dq", "dk", "dv", "dbias"], grads, ref_grads):
        assert grad.dtype == ref_grad.dtype, name
        assert_close_cpu(grad, ref_grad, name, dtype=torch.float16)


def test_torch_compile():
    q, k, v = packed_qkv(2, 13, 16)
    bias = make_bias("random", 13)

    def loss_fn(q, k, v, bias):
        return ops.attention(q, k, v, bias).square().sum()

    with simmim_fast.use_backend("triton"):
        loss = torch.compile(loss_fn, backend="aot_eager")(q, k, v, bias)
        grads = torch.autograd.grad(loss, (q, k, v, bias))
    ref_loss = reference.attention(q, k, v, bias).square().sum()
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v, bias))
    assert_close_cpu(loss, ref_loss, "loss")
    for name, grad, ref_grad in zip(["dq", "dk", "dv", "dbias"], grads, ref_grads):
        assert_close_cpu(grad, ref_grad, name)


def assert_within_torch_error_of_fp64(q, k, v, bias, grad_out, dtype):
    """The training configuration (fp32 tensors under autocast to ``dtype``) by flash-attention's rule:
    the op's error against float64 at most twice torch's own under the same autocast, for the output
    and every gradient (tests/tolerances.py)."""
    names = ["output", "dq", "dk", "dv"] + ([] if bias is None else ["dbias"])
    results = []
    for fn, exact in ((ops.attention, False), (reference.attention, False), (reference.attention, True)):
        inputs = [t.detach().to(torch.float64 if exact else t.dtype).requires_grad_()
                  for t in (q, k, v, bias) if t is not None]
        with simmim_fast.use_backend("triton"), torch.autocast("cpu", dtype=dtype, enabled=not exact):
            out = fn(*inputs[:3], inputs[3] if bias is not None else None)
        results.append((out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype))))
    for name, fast, torch_lowp, fp64 in zip(names, *results):
        assert fast.dtype == torch_lowp.dtype, name
        assert torch.isfinite(fast).all(), name
        assert_within_torch_error(fast, torch_lowp, fp64, name)


@pytest.mark.parametrize("batch, tokens, head_dim, bias_kind", [
    (2, 197, 64, "random"),  # ViT-B 224's sequence: ragged query and key blocks
    (2, 50, 80, "none"),  # head dim padded to 128, scale * log2(e) folded
    (1, 321, 32, "random"),  # 6 blocks, the last holding one row
    (3, 64, 32, "random"),  # every block full: no masks at all (EVEN_M, EVEN_N, EVEN_HEADDIM)
    (1, 90, 16, "random"),  # the forward's 32-row, 32-key tail blocks (197 and 321 take 16, 50 one 64-block)
], ids=["N197-d64", "N50-d80-nobias", "N321-d32", "N64-even", "N90-d16"])
def test_odd_shapes_fp32(batch, tokens, head_dim, bias_kind):
    q, k, v = packed_qkv(batch, tokens, head_dim)
    bias = make_bias(bias_kind, tokens)
    names = ["dq", "dk", "dv"] + ([] if bias is None else ["dbias"])
    assert_matches(run_both(q, k, v, bias), names)


@pytest.mark.parametrize("tokens, head_dim, bias_kind", [(197, 64, "random"), (50, 80, "none"), (70, 32, "large")])
def test_odd_shapes_fp16(tokens, head_dim, bias_kind):
    q, k, v = packed_qkv(2, tokens, head_dim)
    bias = make_bias(bias_kind, tokens)
    assert_within_torch_error_of_fp64(q, k, v, bias, torch.randn(2, HEADS, tokens, head_dim), torch.float16)


def test_minus_inf_over_the_first_key_block():
    """Rows whose whole first key block (64 keys here) has a -inf bias: the reference is finite
    there, and the online softmax must not make -inf - (-inf) = NaN (FlashAttention's guard)."""
    q, k, v = packed_qkv(2, 70, 16)
    bias = torch.randn(HEADS, 70, 70)
    bias[0, 3, :64] = float("-inf")
    bias[2, 69, :64] = float("-inf")
    bias.requires_grad_()
    results = run_both(q, k, v, bias)
    for tensor in (results[0][0], *results[0][1]):
        assert torch.isfinite(tensor).all()
    assert_matches(results, ["dq", "dk", "dv", "dbias"])


def test_output_and_gradient_layouts():
    """The output is a (B, H, N, d) view of a (B, N, H, d) tensor, so the caller's transpose-reshape is
    free; dq, dk, dv are views of one (B, N, 3, H, d) buffer, which the encoders' split_qkv takes whole."""
    from simmim_fast.models.layers import split_qkv

    qkv = torch.randn(2, 13, 3 * HEADS * 16, requires_grad=True)
    with simmim_fast.use_backend("triton"):
        q, k, v = split_qkv(qkv, HEADS)
        out = ops.attention(q, k, v, make_bias("random", 13))
        assert out.transpose(1, 2).is_contiguous()
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert dq._base is not None and dq._base is dk._base is dv._base
    assert dq._base.shape == (2, 13, 3, HEADS, 16) and dq._base.is_contiguous()


def test_torch_compile_fullgraph_matches_eager():
    """Registered through torch.library, the op is one opaque node: fullgraph compiles it, forward
    and backward, with no graph break."""
    from simmim_fast.kernels.attention_bias import attention as triton_attention

    q, k, v = packed_qkv(2, 70, 16)
    bias = make_bias("random", 70)

    def loss_fn(q, k, v, bias):
        return triton_attention(q, k, v, bias, 0.3).square().sum()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    loss = compiled(q, k, v, bias)
    grads = torch.autograd.grad(loss, (q, k, v, bias))
    eager_loss = loss_fn(q, k, v, bias)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v, bias))
    assert torch.equal(loss, eager_loss)
    for grad, eager_grad in zip(grads, eager_grads):
        assert torch.equal(grad, eager_grad)
