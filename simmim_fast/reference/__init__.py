"""Plain PyTorch versions of every op the fast backends fuse.

This is the CPU path and the oracle of every numerical test. Each function here
defines the signature that every backend's implementation of the same op must
accept (see ``simmim_fast.dispatch``), and computes exactly what the original
SimMIM code computes, in the same order, so that losses agree to float32
rounding. Inputs are validated once, by ``simmim_fast.ops``, not here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# Added to the masked-pixel count in the original loss so an all-zero mask gives 0, not NaN.
LOSS_EPS = 1e-5


def token_mask_weight(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, h, w) or (B, L) 0/1 mask -> (B, L, 1) blend weight in ``like``'s dtype (as the original)."""
    return mask.flatten(1).unsqueeze(-1).type_as(like)


def mask_token_blend(tokens: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """Replace masked tokens by the learned mask token: ``x*(1-w) + mask_token*w``.

    tokens (B, L, D); mask (B, h, w) with h*w == L, or (B, L); mask_token (1, 1, D).
    """
    w = token_mask_weight(mask, mask_token)
    return tokens * (1.0 - w) + mask_token.expand_as(tokens) * w


def masked_patch_embed(
    image: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    mask_token: torch.Tensor,
    pos_embed: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    norm_eps: float = 1e-5,
) -> torch.Tensor:
    """Patchify + linear projection (+ patch LayerNorm) + mask-token blend (+ abs. position embedding).

    image (B, C, H, W); mask (B, H/p, W/p); weight (D, C, p, p) (the Conv2d ``patch_embed.proj``);
    bias (D,) or None; mask_token (1, 1, D); pos_embed (1, L, D) for the patch positions only
    (the ViT's cls position is added outside); norm_weight/norm_bias (D,) for Swin's patch_norm,
    applied before the blend as in the original. Returns tokens (B, L, D).
    """
    patch = weight.shape[-1]
    x = F.conv2d(image, weight, bias, stride=patch).flatten(2).transpose(1, 2)
    if norm_weight is not None:
        x = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, norm_eps)
    w = token_mask_weight(mask, mask_token)
    x = x * (1.0 - w) + mask_token.expand_as(x) * w
    if pos_embed is not None:
        x = x + pos_embed
    return x


def _scaled_logits(q: torch.Tensor, k: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    """(q * scale) k^T, scaling q first as the original does; scale defaults to d^-0.5."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return (q * scale) @ k.transpose(-2, -1)


def _attend(logits: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v.  q, k, v (B, H, N, d); bias (H, N, N) shared over the batch."""
    logits = _scaled_logits(q, k, scale)
    if bias is not None:
        logits = logits + bias.unsqueeze(0)
    return _attend(logits, v, dropout_p)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    window_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Swin window attention.

    q, k, v (B*nW, H, T, d) with windows of one image consecutive; bias (H, T, T), the relative
    position bias already gathered from its table; window_mask (nW, T, T) of 0/-100 for shifted
    blocks (window b uses window_mask[b % nW]) or None.
    """
    logits = _scaled_logits(q, k, scale) + bias.unsqueeze(0)
    if window_mask is not None:
        num_windows = window_mask.shape[0]
        batch_windows, heads, tokens, _ = logits.shape
        logits = logits.view(batch_windows // num_windows, num_windows, heads, tokens, tokens)
        logits = logits + window_mask.unsqueeze(1).unsqueeze(0)
        logits = logits.view(batch_windows, heads, tokens, tokens)
    return _attend(logits, v, dropout_p)


def masked_l1_loss(
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    in_chans: int,
    shuffle_stride: int = 1,
) -> torch.Tensor:
    """The original SimMIM loss: mean |target - reconstruction| over masked pixels, per channel.

    target (B, C, H, W); mask (B, H/patch_size, W/patch_size) of 0/1; reconstruction is either the
    image-shaped (B, C, H, W) reconstruction (shuffle_stride == 1) or the decoder output before
    PixelShuffle, (B, C*s*s, H/s, W/s) with s == shuffle_stride.
    Returns ``sum(|x - x_rec| * mask_px) / (sum(mask_px) + 1e-5) / in_chans`` in float32 or the
    inputs' dtype as the original would.
    """
    if shuffle_stride > 1:
        reconstruction = F.pixel_shuffle(reconstruction, shuffle_stride)
    mask_px = mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1).contiguous()
    loss_recon = F.l1_loss(target, reconstruction, reduction="none")
    return (loss_recon * mask_px).sum() / (mask_px.sum() + LOSS_EPS) / in_chans


# The successor's norm target: variance floor under the square root.
NORM_TARGET_EPS = 1e-6


def normalized_target(target: torch.Tensor, window: int) -> torch.Tensor:
    """The successor's ``norm_targets``: each pixel of each channel as (x - mean) / sqrt(var + 1e-6), mean
    and variance over the ``window`` x ``window`` neighbourhood clipped to the image (n pixels), the
    variance unbiased (x n / (n - 1)) and clamped at 0. ``window`` is odd."""
    pool = dict(kernel_size=window, stride=1, padding=window // 2)
    mean = F.avg_pool2d(target, count_include_pad=False, **pool)
    square_mean = F.avg_pool2d(target ** 2.0, count_include_pad=False, **pool)
    count = F.avg_pool2d(torch.ones_like(target), count_include_pad=True, **pool) * window ** 2
    variance = torch.clamp((square_mean - mean ** 2.0) * (count / (count - 1)), min=0.0)
    return (target - mean) / (variance + NORM_TARGET_EPS) ** 0.5


def masked_decoder_loss(
    features: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    encoder_stride: int,
    patch_size: int,
    in_chans: int,
    norm_target_patch_size: Optional[int] = None,
) -> torch.Tensor:
    """The SimMIM decoder (1x1 conv + PixelShuffle) followed by the masked L1 loss.

    features (B, C_enc, H/s, W/s) from the encoder; weight (s*s*3, C_enc, 1, 1) and bias (s*s*3,)
    of ``decoder.0``; target (B, 3, H, W); mask (B, H/patch_size, W/patch_size);
    norm_target_patch_size: None for raw pixels, or the odd window of ``normalized_target`` (the
    successor's MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE), the target then being ``normalized_target(target)``.
    Fast backends compute the decoder only where the mask is set; the value and every gradient
    equal this plain version's.
    """
    if norm_target_patch_size is not None:
        target = normalized_target(target, norm_target_patch_size)
    decoded = F.conv2d(features, weight, bias)
    return masked_l1_loss(decoded, target, mask, patch_size, in_chans, shuffle_stride=encoder_stride)


OPS = {
    "mask_token_blend": mask_token_blend,
    "masked_patch_embed": masked_patch_embed,
    "attention": attention,
    "window_attention": window_attention,
    "masked_l1_loss": masked_l1_loss,
    "masked_decoder_loss": masked_decoder_loss,
}
