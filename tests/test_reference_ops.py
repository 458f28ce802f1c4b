"""The reference ops against independent computations (loops, numpy, the unfused formula)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simmim_fast import ops, reference

from discriminating import assert_discriminates


def loss_by_loops(x_rec, x, mask, patch, in_chans):
    x_rec, x, mask = x_rec.double().numpy(), x.double().numpy(), mask.numpy()
    total, count = 0.0, 0.0
    B, C, H, W = x.shape
    for b in range(B):
        for i in range(H):
            for j in range(W):
                if mask[b, i // patch, j // patch]:
                    count += 1
                    total += np.abs(x[b, :, i, j] - x_rec[b, :, i, j]).sum()
    return total / (count + 1e-5) / in_chans


@pytest.mark.parametrize("fill", ["random", "zeros", "ones"])
def test_masked_l1_loss_equals_loop_count(fill):
    g = torch.Generator().manual_seed(0)
    x, rec = torch.randn(2, 3, 12, 20, generator=g), torch.randn(2, 3, 12, 20, generator=g)
    mask = {"random": torch.randint(0, 2, (2, 3, 5), generator=g), "zeros": torch.zeros(2, 3, 5, dtype=torch.long),
            "ones": torch.ones(2, 3, 5, dtype=torch.long)}[fill]
    loss = ops.masked_l1_loss(rec, x, mask, 4, 3)
    expected = loss_by_loops(rec, x, mask, 4, 3)
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-9)
    if fill == "random":  # the planted wrong versions: the mask one patch off, the mean over every pixel
        for name, wrong in (("mask shifted by a patch", ops.masked_l1_loss(rec, x, mask.roll(1, -1), 4, 3)),
                            ("unmasked mean", (rec - x).abs().mean())):
            assert_discriminates(wrong, torch.tensor(expected), rtol=1e-6, atol=1e-9, name=name)
    if fill == "zeros":
        rec.requires_grad_(True)
        ops.masked_l1_loss(rec, x, mask, 4, 3).backward()
        assert torch.equal(rec.grad, torch.zeros_like(rec))  # 0, not NaN


def test_pre_shuffle_and_decoder_forms_agree():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 10, 3, 4, generator=g)
    weight, bias = torch.randn(48, 10, 1, 1, generator=g), torch.randn(48, generator=g)
    target = torch.randn(2, 3, 12, 16, generator=g)
    mask = torch.randint(0, 2, (2, 6, 8), generator=g)  # patch 2 under a stride-4 decoder (Swin-like)
    decoded = F.conv2d(features, weight, bias)
    image_form = ops.masked_l1_loss(F.pixel_shuffle(decoded, 4), target, mask, 2, 3)
    shuffle_form = ops.masked_l1_loss(decoded, target, mask, 2, 3, shuffle_stride=4)
    fused_form = ops.masked_decoder_loss(features, mask, weight, bias, target, 4, 2, 3)
    assert image_form.item() == pytest.approx(loss_by_loops(F.pixel_shuffle(decoded, 4), target, mask, 2, 3), rel=1e-6)
    torch.testing.assert_close(shuffle_form, image_form, rtol=0, atol=0)
    torch.testing.assert_close(fused_form, image_form, rtol=0, atol=0)


def softmax_attention_numpy(q, k, v, bias, scale):
    logits = np.einsum("bhnd,bhmd->bhnm", q, k) * scale + bias
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhnm,bhmd->bhnd", p, v)


def test_attention_and_window_attention_match_numpy():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(4, 3, 9, 8, generator=g, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(3, 9, 9, generator=g, dtype=torch.float64)
    want = softmax_attention_numpy(q.numpy(), k.numpy(), v.numpy(), bias.numpy()[None], 0.3)
    np.testing.assert_allclose(ops.attention(q, k, v, bias, 0.3).numpy(), want, rtol=1e-10)
    for name, wrong in (("bias transposed", ops.attention(q, k, v, bias.transpose(-2, -1), 0.3)),
                        ("q and k swapped", ops.attention(k, q, v, bias, 0.3)),
                        ("default scale instead of 0.3", ops.attention(q, k, v, bias))):
        assert_discriminates(wrong, torch.from_numpy(want), rtol=1e-10, atol=0, name=name)
    window_mask = torch.zeros(2, 9, 9, dtype=torch.float64)
    window_mask[1, :4, 4:] = -100.0
    per_window = bias.numpy()[None] + window_mask.numpy()[np.arange(4) % 2][:, None]
    want = softmax_attention_numpy(q.numpy(), k.numpy(), v.numpy(), per_window, 8 ** -0.5)
    np.testing.assert_allclose(ops.window_attention(q, k, v, bias, window_mask).numpy(), want, rtol=1e-10)
    # Windows are batch-major (window i of an image is row b * nW + i): the mask of window i % nW.
    wrong = ops.window_attention(q, k, v, bias, window_mask.flip(0))
    assert_discriminates(wrong, torch.from_numpy(want), rtol=1e-10, atol=0, name="masks of the wrong windows")


def test_mask_token_blend_and_patch_embed():
    g = torch.Generator().manual_seed(3)
    tokens, token = torch.randn(2, 6, 5, generator=g), torch.randn(1, 1, 5, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0]])
    out = ops.mask_token_blend(tokens, mask, token)
    assert torch.equal(out[mask.bool()], token.view(5).expand(3, 5))
    assert torch.equal(out[~mask.bool()], tokens[~mask.bool()])
    image = torch.randn(2, 3, 8, 12, generator=g)
    weight, bias = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, generator=g)
    grid_mask = mask.view(2, 2, 3)
    patches = image.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(2, 6, 48)
    expected = patches @ weight.reshape(5, 48).T + bias
    expected = torch.where(mask.bool()[..., None], token.expand(2, 6, 5), expected)
    torch.testing.assert_close(ops.masked_patch_embed(image, grid_mask, weight, bias, token), expected)
    channels_last_patches = image.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 4, 5, 1).reshape(2, 6, 48)
    wrong = torch.where(mask.bool()[..., None], token.expand(2, 6, 5), channels_last_patches @ weight.reshape(5, 48).T + bias)
    assert_discriminates(wrong, expected, rtol=1.3e-6, atol=1e-5, name="patches flattened channels-last")
    assert reference.OPS.keys() == set(__import__("simmim_fast").backends.ALL_OPS)


def test_the_originals_epsilons_in_float64():
    """The original's constants, where they change the result: the loss divides by the masked pixel count
    + 1e-5 (SimMIM), and Swin's patch LayerNorm has nn.LayerNorm's eps 1e-5. float64 and a one-patch mask
    (a count of 4) or a near-constant patch (variance ~ eps) make a factor of 2 in either eps visible."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(1, 3, 4, 4, generator=generator, dtype=torch.float64)
    reconstruction = torch.randn(1, 3, 4, 4, generator=generator, dtype=torch.float64)
    mask = torch.zeros(1, 2, 2, dtype=torch.float64)
    mask[0, 1, 0] = 1
    expected = (target - reconstruction).abs()[:, :, 2:, :2].sum() / (4 + 1e-5) / 3
    torch.testing.assert_close(reference.masked_l1_loss(reconstruction, target, mask, 2, 3), expected,
                               rtol=1e-12, atol=0)

    image = torch.randn(1, 3, 4, 4, generator=generator, dtype=torch.float64)
    weight = 0.1 + 1e-3 * torch.randn(8, 3, 2, 2, generator=generator, dtype=torch.float64)  # near-equal channels
    norm_weight, norm_bias = torch.ones(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    tokens = reference.masked_patch_embed(image, torch.zeros(1, 2, 2), weight, None,
                                          torch.zeros(1, 1, 8, dtype=torch.float64), None, norm_weight, norm_bias)
    projected = torch.nn.functional.conv2d(image, weight, stride=2).flatten(2).transpose(1, 2)
    assert projected.var(-1, unbiased=False).max() < 1e-3  # eps is not negligible against it
    expected = torch.nn.functional.layer_norm(projected, (8,), norm_weight, norm_bias, eps=1e-5)
    torch.testing.assert_close(tokens, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dropout_p", [0.25, 1.0])
def test_attention_dropout_drops_probabilities_as_the_original(dropout_p):
    """attn_drop of the original blocks: dropout on the softmax probabilities (kept ones scaled by
    1/(1-p)), for every p in (0, 1]; p = 1 drops them all."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 9, 8, generator=g) for _ in range(3))
    torch.manual_seed(0)
    out = reference.attention(q, k, v, dropout_p=dropout_p)
    torch.manual_seed(0)
    expected = F.dropout(((q * 8 ** -0.5) @ k.transpose(-2, -1)).softmax(-1), p=dropout_p) @ v
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.allclose(out, reference.attention(q, k, v))


def test_loss_of_a_stride_2_decoder_before_its_pixel_shuffle():
    """shuffle_stride 2 (a decoder at half resolution): the pre-shuffle form equals the image form."""
    g = torch.Generator().manual_seed(3)
    decoded = torch.randn(2, 12, 4, 4, generator=g)
    target = torch.randn(2, 3, 8, 8, generator=g)
    mask = torch.randint(0, 2, (2, 4, 4), generator=g)
    image_form = reference.masked_l1_loss(F.pixel_shuffle(decoded, 2), target, mask, 2, 3)
    torch.testing.assert_close(reference.masked_l1_loss(decoded, target, mask, 2, 3, shuffle_stride=2), image_form,
                               rtol=0, atol=0)
