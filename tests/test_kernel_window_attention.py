"""Triton window attention (kernels/window_attention.py) against the reference, on the interpreter.

Tiny odd shapes (3x3 windows, T = 9, on a 6x6 image with shift 1; head dims 16 and 24) with q, k, v as
strided views of a qkv tensor, as the Swin block makes them; the real Swin shift mask.
"""
import pytest
import torch

import simmim_fast
from simmim_fast import ops, reference
from tests.tolerances import assert_close_cpu

pytestmark = pytest.mark.interpreter


def swin_shift_mask(resolution: int, window: int, shift: int) -> torch.Tensor:
    """The (nW, T, T) 0/-100 mask of Swin's shifted blocks, built as the original does."""
    regions = torch.zeros(resolution, resolution)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for index, (rows, cols) in enumerate((r, c) for r in cuts for c in cuts):
        regions[rows, cols] = index
    per_window = regions.view(resolution // window, window, resolution // window, window)
    per_window = per_window.permute(0, 2, 1, 3).reshape(-1, window * window)
    different = (per_window.unsqueeze(1) - per_window.unsqueeze(2)) != 0
    return torch.zeros(different.shape).masked_fill(different, -100.0)


def make_inputs(batch_windows, heads, tokens, head_dim, bias_scale=1.0, dtype=torch.float32):
    """q, k, v as the Swin block's views of one qkv tensor (non-contiguous), a leaf bias, a grad_out."""
    qkv = torch.randn(batch_windows, tokens, 3, heads, head_dim, dtype=dtype, requires_grad=True)
    bias = (torch.randn(heads, tokens, tokens) * bias_scale).requires_grad_()
    grad_out = torch.randn(batch_windows, heads, tokens, head_dim, dtype=dtype)
    return qkv, bias, grad_out


def run(op, qkv, bias, window_mask, grad_out, scale=None):
    """Output and (dq, dk, dv, dbias) of ``op`` on fresh grads."""
    qkv.grad = bias.grad = None
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = op(q, k, v, bias, window_mask, scale)
    out.backward(grad_out)
    grads = qkv.grad.unbind(2)
    return out.detach(), (grads[0].transpose(1, 2), grads[1].transpose(1, 2), grads[2].transpose(1, 2), bias.grad)


def fast(*args, **kwargs):
    with simmim_fast.use_backend("triton"):
        return run(ops.window_attention, *args, **kwargs)


def assert_matches_reference(qkv, bias, window_mask, grad_out, scale=None, dtype=torch.float32):
    out, grads = fast(qkv, bias, window_mask, grad_out, scale)
    ref_out, ref_grads = run(reference.window_attention, qkv, bias, window_mask, grad_out, scale)
    assert out.dtype == ref_out.dtype
    assert_close_cpu(out, ref_out, "output", dtype)
    for name, grad, ref_grad in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert grad.dtype == ref_grad.dtype, name
        assert_close_cpu(grad, ref_grad, name, dtype)


@pytest.mark.parametrize("head_dim", [16, 24])
@pytest.mark.parametrize("shifted", [True, False], ids=["shifted", "plain"])
@pytest.mark.parametrize("bias_scale", [0.0, 1.0, 20.0], ids=["bias0", "bias1", "bias20"])
def test_matches_reference(head_dim, shifted, bias_scale):
    window_mask = swin_shift_mask(6, 3, 1) if shifted else None  # nW = 4
    qkv, bias, grad_out = make_inputs(2 * 4, 3, 9, head_dim, bias_scale)
    assert_matches_reference(qkv, bias, window_mask, grad_out)


@pytest.mark.parametrize("tokens", [33, 36, 48])
@pytest.mark.parametrize("shifted", [True, False], ids=["shifted", "plain"])
def test_split_windows_match_reference(tokens, shifted):
    """33 to 48 tokens (Swin-B's 6x6 windows: 36) run as a 32-row head block and a 16-row tail block,
    rows and keys alike: every (query block, key block) pair, the softmax across both key blocks and
    the dk/dv sums across both query blocks. A peaked bias (scale 8) makes a lost tile or a row sum over
    one key block only show far above the tolerance; 36 takes Swin's real shift mask (12x12, window 6)."""
    window_mask = None
    if shifted:
        window_mask = swin_shift_mask(12, 6, 3) if tokens == 36 else torch.randn(4, tokens, tokens).clamp(max=0) * 50
    qkv, bias, grad_out = make_inputs(2 * 4, 2, tokens, 16, bias_scale=8.0)
    assert_matches_reference(qkv, bias, window_mask, grad_out)


def test_split_windows_cover_every_tile():
    """The split's block sizes: 36 tokens in 48 x 48 tiles (1.78x the useful MMA work, not 64's 3.16x);
    none below 33 or at 49 and above, where one power-of-two block pads as little."""
    from simmim_fast.kernels.window_attention import token_blocks

    assert token_blocks(36) == dict(BLOCK_HEAD=32, BLOCK_TAIL=16)
    assert token_blocks(48) == dict(BLOCK_HEAD=32, BLOCK_TAIL=16) == token_blocks(33)
    assert token_blocks(49) == dict(BLOCK_HEAD=64, BLOCK_TAIL=0) and token_blocks(32) == dict(BLOCK_HEAD=32, BLOCK_TAIL=0)
    assert token_blocks(9) == dict(BLOCK_HEAD=16, BLOCK_TAIL=0) and token_blocks(25) == dict(BLOCK_HEAD=32, BLOCK_TAIL=0)


def test_explicit_scale_and_fully_masked_row():
    """A query row masked against every key (all -100) is a uniform softmax, not NaN."""
    window_mask = swin_shift_mask(6, 3, 1)
    window_mask[1, 4, :] = -100.0
    qkv, bias, grad_out = make_inputs(2 * 4, 3, 9, 16)
    out, grads = fast(qkv, bias, window_mask, grad_out, scale=0.3)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert_matches_reference(qkv, bias, window_mask, grad_out, scale=0.3)


def test_several_images_per_program(monkeypatch):
    """Few programs: each loops over 2 images (the last slice holds 1), accumulating dbias across them in
    the backward; the forward's slices are set alike."""
    from simmim_fast.kernels import window_attention as kernel_module

    for target in ("TARGET_PROGRAMS", "FORWARD_TARGET_PROGRAMS"):
        monkeypatch.setattr(kernel_module, target, 2 * 4 * 3)  # heads * nW * 3 slices of 5 images
    qkv, bias, grad_out = make_inputs(5 * 4, 2, 9, 16)
    assert_matches_reference(qkv, bias, swin_shift_mask(6, 3, 1), grad_out)


def test_several_row_blocks():
    """T = 81 (9x9 windows) takes the flash kernels: 2 ragged 64-row and 64-key blocks."""
    qkv, bias, grad_out = make_inputs(1 * 4, 2, 81, 16)
    assert_matches_reference(qkv, bias, swin_shift_mask(18, 9, 4), grad_out)


def test_gradients_are_deterministic():
    qkv, bias, grad_out = make_inputs(2 * 4, 3, 9, 16)
    window_mask = swin_shift_mask(6, 3, 1)
    _, first = fast(qkv, bias, window_mask, grad_out)
    _, second = fast(qkv, bias, window_mask, grad_out)
    for grad, again in zip(first, second):
        assert torch.equal(grad, again)


def test_autocast_runs_in_the_autocast_dtype(device):
    """Under autocast the output dtype is the reference's (the autocast dtype), with fp32 q, k, v, bias."""
    qkv, bias, grad_out = make_inputs(2 * 4, 2, 9, 16)
    with torch.autocast(device.type, dtype=torch.float16):
        assert_matches_reference(qkv, bias, swin_shift_mask(6, 3, 1), grad_out.half(), dtype=torch.float16)


def test_dispatch_refuses_what_the_kernel_cannot_take():
    from simmim_fast.backends import registry

    triton_backend = registry()["triton"]

    def reasons(tokens, head_dim, window_mask=None):
        q = torch.empty(4, 2, tokens, head_dim)
        args = dict(q=q, k=q, v=q, bias=torch.empty(2, tokens, tokens), window_mask=window_mask, scale=None,
                    dropout_p=0.0)
        return triton_backend.reasons("window_attention", args)

    # Any window size: whole-window kernels up to 64 tokens at d <= 64, the flash kernels beyond.
    assert reasons(196, 64) == [] and reasons(9, 16, torch.zeros(4, 9, 9)) == []
    assert reasons(289, 32) == [] and reasons(576, 32) == [] and reasons(49, 80) == []
    assert reasons(49, 300)
    assert reasons(9, 16, torch.zeros(4, 9, 9, requires_grad=True))


def test_wide_heads_in_small_windows_on_the_flash_kernels():
    """T = 9 at head dim 80 is past the whole-window kernels' d <= 64: the flash path, shift mask included."""
    qkv, bias, grad_out = make_inputs(2 * 4, 2, 9, 80)
    assert_matches_reference(qkv, bias, swin_shift_mask(6, 3, 1), grad_out)


@pytest.mark.parametrize("head_dim", [32])
@pytest.mark.parametrize("shifted", [True, False], ids=["shifted", "plain"])
def test_large_windows_on_the_flash_kernels(head_dim, shifted):
    """12x12 windows (T = 144, Swin-L w12) take the flash kernels with the shift mask as a second
    additive term: 3 ragged 64-key blocks; 8 images of 4 windows make several ragged batch groups."""
    window_mask = swin_shift_mask(24, 12, 6) if shifted else None
    qkv, bias, grad_out = make_inputs(2 * 4, 2, 144, head_dim)
    assert_matches_reference(qkv, bias, window_mask, grad_out)


def test_large_windows_fp16_autocast():
    """The training configuration (fp32 tensors under autocast) at T = 144, within fp16's tolerance."""
    qkv, bias, grad_out = make_inputs(1 * 4, 2, 144, 32)
    with torch.autocast("cpu", dtype=torch.float16):
        assert_matches_reference(qkv, bias, swin_shift_mask(24, 12, 6), grad_out.half(), dtype=torch.float16)


def test_minus_inf_over_the_first_key_block():
    """A mask row at -inf over the whole first 64-key block (finite in the reference) is not NaN."""
    window_mask = swin_shift_mask(18, 9, 4)
    window_mask[0, 5, :64] = float("-inf")
    window_mask[3, 80, :64] = float("-inf")
    qkv, bias, grad_out = make_inputs(1 * 4, 2, 81, 16)
    out, grads = fast(qkv, bias, window_mask, grad_out)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert_matches_reference(qkv, bias, window_mask, grad_out)


@pytest.mark.parametrize("tokens", [9, 81], ids=["whole-window", "flash"])
def test_gradient_layout_is_the_qkv_projection(tokens):
    """dq, dk, dv come as views of one (B*nW, T, 3, H, d) buffer, the qkv projection's layout, and the
    output as a view of (B*nW, T, H, d): Swin's split and merge of heads then copy nothing."""
    from simmim_fast.models.layers import split_qkv

    qkv = torch.randn(4, tokens, 3 * 2 * 16, requires_grad=True)
    with simmim_fast.use_backend("triton"):
        q, k, v = split_qkv(qkv, 2)
        out = ops.window_attention(q, k, v, torch.randn(2, tokens, tokens))
        assert out.transpose(1, 2).is_contiguous()
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert grads[0]._base is not None and all(grad._base is grads[0]._base for grad in grads)
    assert grads[0]._base.shape == (4, tokens, 3, 2, 16)


@pytest.mark.parametrize("tokens", [9, 81], ids=["whole-window", "flash"])
def test_torch_compile_fullgraph_matches_eager(tokens):
    """Registered through torch.library: one opaque op that fullgraph compiles, forward and backward."""
    from simmim_fast.kernels.window_attention import window_attention as triton_window_attention

    side = {9: (6, 3, 1), 81: (18, 9, 4)}[tokens]
    qkv, bias, grad_out = make_inputs(1 * 4, 2, tokens, 16)
    window_mask = swin_shift_mask(*side)

    def loss_fn(qkv, bias):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return (triton_window_attention(q, k, v, bias, window_mask) * grad_out).sum()

    loss = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(qkv, bias)
    grads = torch.autograd.grad(loss, (qkv, bias))
    eager_loss = loss_fn(qkv, bias)
    eager_grads = torch.autograd.grad(eager_loss, (qkv, bias))
    assert torch.equal(loss, eager_loss)
    for grad, eager_grad in zip(grads, eager_grads):
        assert torch.equal(grad, eager_grad)
