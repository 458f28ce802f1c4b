"""Bad input is a ValueError naming what was expected, at the model and at each op."""
import pytest
import torch

import simmim_fast as sf
from simmim_fast import ops


@pytest.fixture(scope="module")
def vit():
    return sf.build_simmim("vit-tiny")


@pytest.fixture(scope="module")
def swin():
    return sf.build_simmim("swin-tiny")


def good_inputs(model, batch=2):
    grid = 64 // model.patch_size
    return torch.randn(batch, 3, 64, 64), torch.randint(0, 2, (batch, grid, grid))


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_model_rejects_bad_inputs(which, vit, swin):
    model = vit if which == "vit" else swin
    x, mask = good_inputs(model)
    grid = mask.shape[-1]
    with pytest.raises(ValueError, match=r"image size \(32, 32\) does not match the model's img_size \(64, 64\)"):
        model(torch.randn(2, 3, 32, 32), mask)
    with pytest.raises(ValueError, match="must have 3 channels"):
        model(torch.randn(2, 1, 64, 64), mask)
    with pytest.raises(ValueError, match="floating"):
        model(x.to(torch.uint8), mask)
    with pytest.raises(ValueError, match=rf"mask must have shape \(2, {grid}, {grid}\)"):
        model(x, mask[:, :-1])
    with pytest.raises(ValueError, match=rf"mask must have shape \(2, {grid}, {grid}\)"):
        model(x, mask[:1])  # batch mismatch
    with pytest.raises(ValueError, match="only 0 and 1"):
        model(x, mask * 2)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(x[0], mask)
    assert torch.isfinite(model(x, mask.bool()))  # bool and float 0/1 masks are fine
    assert torch.isfinite(model(x, mask.float()))


def test_ops_reject_bad_inputs():
    image, mask = torch.randn(2, 3, 16, 16), torch.ones(2, 2, 2)
    with pytest.raises(ValueError, match="reconstruction must have shape"):
        ops.masked_l1_loss(torch.randn(2, 3, 8, 8), image, mask, 8, 3)
    with pytest.raises(ValueError, match="decoder output before PixelShuffle"):
        ops.masked_l1_loss(torch.randn(2, 3, 4, 4), image, mask, 8, 3, shuffle_stride=4)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 2, 2\)"):
        ops.masked_l1_loss(image, image, torch.ones(2, 4, 4), 8, 3)
    q = torch.randn(2, 3, 5, 8)
    with pytest.raises(ValueError, match=r"bias must have shape \(3, 5, 5\)"):
        ops.attention(q, q, q, torch.zeros(3, 5, 4))
    with pytest.raises(ValueError, match="share a dtype"):
        ops.attention(q, q.double(), q.double())
    with pytest.raises(ValueError, match="window_mask must be"):
        ops.window_attention(q, q, q, torch.zeros(3, 5, 5), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="not a multiple of the mask's window count"):
        ops.window_attention(q, q, q, torch.zeros(3, 5, 5), torch.zeros(3, 5, 5))
    tokens, token = torch.randn(2, 4, 6), torch.randn(1, 1, 6)
    with pytest.raises(ValueError, match=r"mask_token must have shape \(1, 1, 6\)"):
        ops.mask_token_blend(tokens, torch.ones(2, 2, 2), torch.randn(1, 1, 5))
    with pytest.raises(ValueError, match="cover L=4 tokens"):
        ops.mask_token_blend(tokens, torch.ones(2, 3, 3), token)
    weight = torch.randn(6, 3, 8, 8)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        ops.masked_patch_embed(torch.randn(2, 3, 12, 16), mask, weight, None, token)
    with pytest.raises(ValueError, match="patch positions only"):
        ops.masked_patch_embed(image, mask, weight, None, token, torch.zeros(1, 5, 6))
    with pytest.raises(ValueError, match="decoder.0, a 1x1 conv"):
        ops.masked_decoder_loss(torch.randn(2, 4, 1, 1), mask, torch.randn(768, 5, 1, 1), None, image, 16, 8, 3)
