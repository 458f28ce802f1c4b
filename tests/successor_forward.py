"""The successor SimMIM's computations (microsoft/Swin-Transformer: models/simmim.py with
models/swin_transformer_v2.py), transcribed step by step and run on the parameters of our modules; and
a ConvNeXt SimMIM forward written the same plain way.

An independent oracle for the model-level tests: our Swin V2 folds the logit scale into q and sends
cosine attention through ops.window_attention, gathers the bias before the sigmoid is taken, fuses the
patch embedding with the blend and the decoder with the loss; none of that happens here.
"""

import functools

import numpy as np
import torch
import torch.nn.functional as F

from original_forward import _window_partition, _window_reverse, original_loss, swin_encoder


def norm_targets(targets, patch_size):
    assert patch_size % 2 == 1
    pad = patch_size // 2
    targets_mean = F.avg_pool2d(targets, kernel_size=patch_size, stride=1, padding=pad, count_include_pad=False)
    targets_square_mean = F.avg_pool2d(targets ** 2.0, kernel_size=patch_size, stride=1, padding=pad,
                                       count_include_pad=False)
    targets_count = F.avg_pool2d(torch.ones_like(targets), kernel_size=patch_size, stride=1, padding=pad,
                                 count_include_pad=True) * (patch_size ** 2)
    targets_var = (targets_square_mean - targets_mean ** 2.0) * (targets_count / (targets_count - 1))
    targets_var = torch.clamp(targets_var, min=0.0)
    return (targets - targets_mean) / (targets_var + 1.0e-6) ** 0.5


def _coords_table(window_size, pretrained_window_size):
    h = torch.arange(-(window_size[0] - 1), window_size[0], dtype=torch.float32)
    w = torch.arange(-(window_size[1] - 1), window_size[1], dtype=torch.float32)
    table = torch.stack(torch.meshgrid([h, w], indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    if pretrained_window_size[0] > 0:
        table[:, :, :, 0] /= pretrained_window_size[0] - 1
        table[:, :, :, 1] /= pretrained_window_size[1] - 1
    else:
        table[:, :, :, 0] /= window_size[0] - 1
        table[:, :, :, 1] /= window_size[1] - 1
    table *= 8
    return torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / np.log2(8)


def _v2_window_attention(attn, x, mask):
    B_, N, C = x.shape
    qkv_bias = None
    if attn.q_bias is not None:
        qkv_bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias, requires_grad=False), attn.v_bias))
    qkv = F.linear(input=x, weight=attn.qkv.weight, bias=qkv_bias)
    qkv = qkv.reshape(B_, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    logit_scale = torch.clamp(attn.logit_scale, max=torch.log(torch.tensor(1.0 / 0.01))).exp()
    a = a * logit_scale
    # The buffer must be the successor's table, computed here independently.
    expected_table = _coords_table(attn.window_size, attn.pretrained_window_size)
    torch.testing.assert_close(attn.relative_coords_table, expected_table.to(attn.relative_coords_table.dtype),
                               rtol=0, atol=0)
    table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)
    T = attn.window_size[0] * attn.window_size[1]
    bias = table[attn.relative_position_index.view(-1)].view(T, T, -1).permute(2, 0, 1).contiguous()
    a = a + 16 * torch.sigmoid(bias).unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        a = a.view(B_ // nW, nW, attn.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        a = a.view(-1, attn.num_heads, N, N)
    a = a.softmax(dim=-1)
    return attn.proj((a @ v).transpose(1, 2).reshape(B_, N, C))


def _v2_block(blk, x):
    H, W = blk.input_resolution
    B, L, C = x.shape
    shortcut = x
    x = x.view(B, H, W, C)
    if blk.shift_size > 0:
        x = torch.roll(x, shifts=(-blk.shift_size, -blk.shift_size), dims=(1, 2))
    xw = _window_partition(x, blk.window_size).view(-1, blk.window_size * blk.window_size, C)
    aw = _v2_window_attention(blk.attn, xw, blk.attn_mask).view(-1, blk.window_size, blk.window_size, C)
    x = _window_reverse(aw, blk.window_size, H, W)
    if blk.shift_size > 0:
        x = torch.roll(x, shifts=(blk.shift_size, blk.shift_size), dims=(1, 2))
    x = shortcut + blk.norm1(x.view(B, H * W, C))
    return x + blk.norm2(blk.mlp(x))


def _v2_patch_merging(merge, x):
    H, W = merge.input_resolution
    B, L, C = x.shape
    x = x.view(B, H, W, C)
    x = torch.cat([x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :], x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]], -1)
    return merge.norm(merge.reduction(x.view(B, -1, 4 * C)))


swinv2_encoder = functools.partial(swin_encoder, block=_v2_block, merge=_v2_patch_merging)


def _channels_first_layer_norm(norm, x):
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + norm.eps)
    return norm.weight[:, None, None] * x + norm.bias[:, None, None]


def _convnext_block(blk, x):
    y = blk.dwconv(x).permute(0, 2, 3, 1)
    y = blk.pwconv2(blk.act(blk.pwconv1(blk.norm(y))))
    if blk.gamma is not None:
        y = blk.gamma * y
    return x + y.permute(0, 3, 1, 2)


def convnext_encoder(enc, x, mask):
    """ConvNeXt's forward_features with the mask token blended after the stem, the final norm per position."""
    conv, norm = enc.downsample_layers[0]
    x = _channels_first_layer_norm(norm, conv(x))
    w = mask.unsqueeze(1).type_as(x)
    x = x * (1.0 - w) + enc.mask_token.view(1, -1, 1, 1) * w
    for i in range(4):
        if i > 0:
            norm, conv = enc.downsample_layers[i]
            x = conv(_channels_first_layer_norm(norm, x))
        for blk in enc.stages[i]:
            x = _convnext_block(blk, x)
    return enc.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def successor_loss(model, x, mask, encode):
    """The successor's SimMIM.forward: encoder, full decoder, norm target when enabled, pixel-mask loss."""
    z = encode(model.encoder, x, mask)
    x_rec = model.decoder(z)
    if model.norm_target_patch_size is not None:
        x = norm_targets(x, model.norm_target_patch_size)
    return original_loss(x, x_rec, mask, model.patch_size, model.in_chans)


def swinv2_parameter_count(img_size, patch_size, embed_dim, depths, num_heads, window_size, in_chans=3, mlp_ratio=4):
    """SwinTransformerV2ForSimMIM + decoder, counted by hand from the successor's __init__s (stride 32)."""
    total = embed_dim * in_chans * patch_size ** 2 + embed_dim  # patch_embed.proj
    total += 2 * embed_dim  # patch_embed.norm
    total += embed_dim  # mask_token
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        dim = embed_dim * 2 ** i
        attention = heads + (2 * 512 + 512) + 512 * heads + 3 * dim * dim + 2 * dim + dim * dim + dim
        mlp = dim * mlp_ratio * dim + mlp_ratio * dim + mlp_ratio * dim * dim + dim
        total += depth * (attention + mlp + 2 * 2 * dim)  # + norm1, norm2
        if i < len(depths) - 1:
            total += 4 * dim * 2 * dim + 2 * 2 * dim  # reduction (no bias) + norm over 2C
    features = embed_dim * 2 ** (len(depths) - 1)
    total += 2 * features  # encoder.norm
    stride = patch_size * 2 ** (len(depths) - 1)
    return total + features * stride ** 2 * 3 + stride ** 2 * 3  # decoder.0
