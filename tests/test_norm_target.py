"""The successor's normalised pixel target (NORM_TARGET) in the reference decoder+loss: forward and
every gradient against a direct transcription of its norm_targets, odd shapes, the mask extremes, the
argument checks, and what the Triton backend (which fuses it, tests/test_kernel_masked_decoder_loss.py)
cannot take."""
import pytest
import torch
import torch.nn.functional as F

import simmim_fast as sf
from simmim_fast import dispatch, ops, reference
from simmim_fast.backends import registry
from successor_forward import norm_targets
from original_forward import original_loss
from tolerances import assert_close_cpu


def test_normalized_target_matches_transcription_forward_and_backward():
    # Non-square, window wider than the image's height, non-contiguous input, constant regions (var = 0).
    base = torch.randn(2, 20, 26, 3, dtype=torch.float64)
    base[0, :5, :5] = 0.7
    target = base.permute(0, 3, 1, 2).requires_grad_(True)
    assert not target.is_contiguous()
    for window in (3, 7, 47):
        got = reference.normalized_target(target, window)
        want = norm_targets(target, window)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        weights = torch.randn_like(got)
        (got_grad,) = torch.autograd.grad((got * weights).sum(), target)
        (want_grad,) = torch.autograd.grad((want * weights).sum(), target)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)
    flat = reference.normalized_target(torch.full((1, 1, 8, 8), 3.0), 5)
    assert not flat.any()  # a constant image normalises to 0, not NaN


def decoder_case(mask_kind, batch=3, channels=12, stride=8, patch=4, size=(32, 48)):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(batch, channels, size[0] // stride, size[1] // stride, generator=g)
    features = features.transpose(2, 3).contiguous().transpose(2, 3).requires_grad_(True)  # non-contiguous
    weight = (0.2 * torch.randn(stride * stride * 3, channels, 1, 1, generator=g)).requires_grad_(True)
    bias = (0.1 * torch.randn(stride * stride * 3, generator=g)).requires_grad_(True)
    target = torch.randn(batch, 3, *size, generator=g)
    grid = (size[0] // patch, size[1] // patch)
    mask = {"random": torch.randint(0, 2, (batch, *grid), generator=g), "zeros": torch.zeros(batch, *grid, dtype=torch.long),
            "ones": torch.ones(batch, *grid, dtype=torch.long)}[mask_kind]
    return features, mask, weight, bias, target, stride, patch


@pytest.mark.parametrize("mask_kind", ["random", "zeros", "ones"])
@pytest.mark.parametrize("window", [5, 47])
def test_decoder_loss_with_norm_target_matches_successor(mask_kind, window):
    features, mask, weight, bias, target, stride, patch = decoder_case(mask_kind)
    with sf.use_backend("reference"):
        loss = ops.masked_decoder_loss(features, mask, weight, bias, target, stride, patch, 3, window)
    decoded = F.pixel_shuffle(F.conv2d(features, weight, bias), stride)
    expected = original_loss(norm_targets(target, window), decoded, mask, patch, 3)
    assert_close_cpu(loss, expected, "loss")
    inputs = (features, weight, bias)
    for name, got, want in zip(("features", "weight", "bias"), torch.autograd.grad(loss, inputs),
                               torch.autograd.grad(expected, inputs)):
        assert_close_cpu(got, want, name)
    if mask_kind == "zeros":
        assert loss == 0


def test_norm_target_changes_the_loss_and_model_option():
    model = sf.build_simmim(sf.get_config("swin-tiny"))
    x = torch.randn(2, 3, 64, 64)
    mask = sf.MaskGenerator(64, 16, model.patch_size, 0.6).generate(2)
    raw = model(x, mask)
    model.norm_target_patch_size = 15
    assert model(x, mask) != raw


@pytest.mark.parametrize("bad", [4, 1, 0, -3, 2.0, True, "47"])
def test_bad_window_is_a_value_error(bad):
    features, mask, weight, bias, target, stride, patch = decoder_case("random")
    with pytest.raises(ValueError, match="norm_target_patch_size must be None or an odd int >= 3"):
        ops.masked_decoder_loss(features, mask, weight, bias, target, stride, patch, 3, bad)


def test_triton_takes_norm_target_and_names_what_it_cannot(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton backend is available; its reasons are what we test
    features, mask, weight, bias, target, stride, patch = decoder_case("random")
    args = dict(features=features.detach(), mask=mask, weight=weight.detach(), bias=bias.detach(), target=target,
                encoder_stride=stride, patch_size=patch, in_chans=3, norm_target_patch_size=47)
    triton = registry()["triton"]
    assert triton.reasons("masked_decoder_loss", args) == []
    assert triton.reasons("masked_decoder_loss", dict(args, norm_target_patch_size=249)) == []  # 256 a side
    too_wide = triton.reasons("masked_decoder_loss", dict(args, norm_target_patch_size=251))
    assert len(too_wide) == 1 and "NORM_TARGET window 251" in too_wide[0] and "258 > 256" in too_wide[0]
    with_grad = triton.reasons("masked_decoder_loss", dict(args, target=target.requires_grad_()))
    assert len(with_grad) == 1 and "NORM_TARGET" in with_grad[0]
    assert triton.reasons("masked_decoder_loss", dict(args, target=target, norm_target_patch_size=None)) == []
    with sf.use_backend("triton"), pytest.raises(dispatch.BackendError, match="NORM_TARGET"):
        ops.masked_decoder_loss(**dict(args, norm_target_patch_size=251))
