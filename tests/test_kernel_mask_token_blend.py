"""Triton mask-token blend (kernels/mask_token_blend.py) against the reference, on the interpreter.

Tiny odd shapes (3 images of 5x7 tokens, D = 24; D = 300 for two column blocks; 800 rows so the
backward's programs walk several row blocks), masks all-zero, all-one and random as (B, h, w) or
(B, L), non-contiguous tokens and mask token, dtype promotion, inputs left untouched, determinism.
"""
import pytest
import torch

import simmim_fast
from simmim_fast import ops, reference
from tests.tolerances import assert_close_cpu

pytestmark = pytest.mark.interpreter


def make_mask(kind, shape):
    return {"random": torch.rand(shape) < 0.6, "zeros": torch.zeros(shape, dtype=torch.bool),
            "ones": torch.ones(shape, dtype=torch.bool)}[kind]


def run(op, tokens, mask, mask_token, grad_out):
    """Output and (d tokens, d mask_token) on fresh grads; the inputs may be non-leaf views."""
    out = op(tokens, mask, mask_token)
    grads = torch.autograd.grad(out, (tokens, mask_token), grad_out)
    return out.detach(), grads


def fast(*args):
    with simmim_fast.use_backend("triton"):
        return run(ops.mask_token_blend, *args)


def assert_matches_reference(tokens, mask, mask_token, grad_out=None):
    batch, length, dim = tokens.shape
    if grad_out is None:
        grad_out = torch.randn(batch, length, dim, dtype=torch.promote_types(tokens.dtype, mask_token.dtype))
    out, grads = fast(tokens, mask, mask_token, grad_out)
    ref_out, ref_grads = run(reference.mask_token_blend, tokens, mask, mask_token, grad_out)
    assert out.dtype == ref_out.dtype
    assert_close_cpu(out, ref_out, "output")
    for name, grad, ref_grad in zip(("d tokens", "d mask_token"), grads, ref_grads):
        assert grad.dtype == ref_grad.dtype, name
        assert_close_cpu(grad, ref_grad, name, grad.dtype)
    return out, grads


@pytest.mark.parametrize("mask_kind", ["random", "zeros", "ones"])
@pytest.mark.parametrize("flat_mask", [False, True], ids=["mask_bhw", "mask_bl"])
def test_matches_reference(mask_kind, flat_mask):
    tokens = torch.randn(3, 35, 24, requires_grad=True)
    mask_token = torch.randn(1, 1, 24, requires_grad=True)
    mask = make_mask(mask_kind, (3, 35) if flat_mask else (3, 5, 7))
    out, (grad_tokens, grad_mask_token) = assert_matches_reference(tokens, mask, mask_token)
    if mask_kind == "zeros":
        assert torch.equal(out, tokens.detach()) and torch.count_nonzero(grad_mask_token) == 0
    if mask_kind == "ones":
        assert torch.equal(out, mask_token.detach().expand_as(out)) and torch.count_nonzero(grad_tokens) == 0


def test_many_rows_and_column_blocks():
    for length, dim in ((200, 24), (12, 300)):
        tokens = torch.randn(4, length, dim, requires_grad=True)
        mask_token = torch.randn(1, 1, dim, requires_grad=True)
        assert_matches_reference(tokens, make_mask("random", (4, length)).long(), mask_token)


def test_non_contiguous_inputs():
    """Tokens as a transposed (B, D, L) tensor, the mask token a strided slice, a float mask sliced."""
    tokens = torch.randn(3, 24, 35, requires_grad=True).transpose(1, 2)
    mask_token = torch.randn(1, 1, 48, requires_grad=True)[..., ::2]
    mask = make_mask("random", (3, 5, 14)).float()[..., ::2]
    assert not (tokens.is_contiguous() or mask_token.is_contiguous() or mask.is_contiguous())
    assert_matches_reference(tokens, mask, mask_token)


def test_dtype_promotion():
    """float16 tokens with an fp32 mask token give fp32, and a float16 tokens gradient."""
    tokens = torch.randn(3, 35, 24, dtype=torch.float16, requires_grad=True)
    mask_token = torch.randn(1, 1, 24, requires_grad=True)
    assert_matches_reference(tokens, make_mask("random", (3, 5, 7)), mask_token)


def test_inputs_untouched_and_deterministic():
    tokens = torch.randn(4, 200, 24, requires_grad=True)
    mask_token = torch.randn(1, 1, 24, requires_grad=True)
    mask = make_mask("random", (4, 200))
    saved = (tokens.detach().clone(), mask.clone(), mask_token.detach().clone())
    grad_out = torch.randn(4, 200, 24)
    first = fast(tokens, mask, mask_token, grad_out)
    second = fast(tokens, mask, mask_token, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(saved, (tokens, mask, mask_token)))
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


@pytest.mark.parametrize("recipe", ["vit_b_224", "swin_b_192_w6"])
def test_grids_fit_cuda_limits_at_large_batch(recipe):
    """The launchers at batch 32768 on meta tensors (nothing runs): token rows on grid axis 0."""
    from simmim_fast.kernels import mask_token_blend
    from tests.kernel_launches import LARGE_BATCH, RECIPES, assert_grids_fit, recorded_launches

    image, patch, dim, _, _, _ = RECIPES[recipe]
    length = (image // patch) ** 2
    tokens = torch.empty(LARGE_BATCH, length, dim, device="meta")
    mask = torch.empty(LARGE_BATCH, length, dtype=torch.bool, device="meta")
    with recorded_launches(mask_token_blend) as launches:
        out = mask_token_blend._launch_forward(tokens, mask, torch.empty(1, 1, dim, device="meta"))
        mask_token_blend._launch_backward(out, mask, torch.float32, torch.float32, True, True)
    assert_grids_fit(launches, ["_mask_token_blend_fwd_kernel", "_mask_token_blend_bwd_kernel"])


def test_torch_compile_fullgraph_matches_eager():
    from simmim_fast.kernels.mask_token_blend import mask_token_blend
    from tests.compiled import assert_compiled_matches_eager

    tokens = torch.randn(3, 35, 24, requires_grad=True)
    mask_token = torch.randn(1, 1, 24, requires_grad=True)
    mask = make_mask("random", (3, 5, 7))
    assert_compiled_matches_eager(lambda tokens, mask_token: mask_token_blend(tokens, mask, mask_token),
                                  tokens, mask_token)
