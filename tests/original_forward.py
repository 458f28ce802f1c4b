"""The original SimMIM forward computations, transcribed step by step (explicit softmax attention,
conv patch embedding, full decoder, pixel-mask loss), run on the parameters of our modules.

This is an independent oracle for the model-level tests: our models route through simmim_fast.ops
(fused patch embedding + blend, split position embedding, fused decoder + loss); this file does not.
"""
import torch
import torch.nn.functional as F


def original_loss(x, x_rec, mask, patch_size, in_chans):
    mask = mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1).contiguous()
    loss_recon = F.l1_loss(x, x_rec, reduction="none")
    return (loss_recon * mask).sum() / (mask.sum() + 1e-5) / in_chans


def _rel_bias(table, index):
    n = index.shape[0]
    return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()


def _vit_attention(attn, x, rel_pos_bias):
    B, N, C = x.shape
    qkv_bias = None
    if attn.q_bias is not None:
        qkv_bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias, requires_grad=False), attn.v_bias))
    qkv = F.linear(input=x, weight=attn.qkv.weight, bias=qkv_bias)
    qkv = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * attn.scale
    a = q @ k.transpose(-2, -1)
    if attn.relative_position_bias_table is not None:
        a = a + _rel_bias(attn.relative_position_bias_table, attn.relative_position_index).unsqueeze(0)
    if rel_pos_bias is not None:
        a = a + rel_pos_bias
    a = a.softmax(dim=-1)
    x = (a @ v).transpose(1, 2).reshape(B, N, -1)
    return attn.proj(x)


def vit_encoder(enc, x, mask):
    x = enc.patch_embed.proj(x).flatten(2).transpose(1, 2)
    B, L, _ = x.shape
    mask_token = enc.mask_token.expand(B, L, -1)
    w = mask.flatten(1).unsqueeze(-1).type_as(mask_token)
    x = x * (1 - w) + mask_token * w
    x = torch.cat((enc.cls_token.expand(B, -1, -1), x), dim=1)
    if enc.pos_embed is not None:
        x = x + enc.pos_embed
    rel_pos_bias = enc.rel_pos_bias() if enc.rel_pos_bias is not None else None
    for blk in enc.blocks:
        if blk.gamma_1 is None:
            x = x + _vit_attention(blk.attn, blk.norm1(x), rel_pos_bias)
            x = x + blk.mlp(blk.norm2(x))
        else:
            x = x + blk.gamma_1 * _vit_attention(blk.attn, blk.norm1(x), rel_pos_bias)
            x = x + blk.gamma_2 * blk.mlp(blk.norm2(x))
    x = enc.norm(x)[:, 1:]
    B, L, C = x.shape
    H = W = int(L ** 0.5)
    return x.permute(0, 2, 1).reshape(B, C, H, W)


def _window_partition(x, ws):
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, C)


def _window_reverse(windows, ws, H, W):
    B = int(windows.shape[0] / (H * W / ws / ws))
    x = windows.view(B, H // ws, W // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


def _swin_window_attention(attn, x, mask):
    B_, N, C = x.shape
    qkv = attn.qkv(x).reshape(B_, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * attn.scale
    a = q @ k.transpose(-2, -1)
    a = a + _rel_bias(attn.relative_position_bias_table, attn.relative_position_index).unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        a = a.view(B_ // nW, nW, attn.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        a = a.view(-1, attn.num_heads, N, N)
    a = a.softmax(dim=-1)
    x = (a @ v).transpose(1, 2).reshape(B_, N, C)
    return attn.proj(x)


def _swin_block(blk, x):
    H, W = blk.input_resolution
    B, L, C = x.shape
    shortcut = x
    x = blk.norm1(x).view(B, H, W, C)
    if blk.shift_size > 0:
        x = torch.roll(x, shifts=(-blk.shift_size, -blk.shift_size), dims=(1, 2))
    xw = _window_partition(x, blk.window_size).view(-1, blk.window_size * blk.window_size, C)
    aw = _swin_window_attention(blk.attn, xw, blk.attn_mask).view(-1, blk.window_size, blk.window_size, C)
    x = _window_reverse(aw, blk.window_size, H, W)
    if blk.shift_size > 0:
        x = torch.roll(x, shifts=(blk.shift_size, blk.shift_size), dims=(1, 2))
    x = shortcut + x.view(B, H * W, C)
    return x + blk.mlp(blk.norm2(x))


def swin_encoder(enc, x, mask, block=_swin_block, merge=None):
    """``block`` / ``merge``: the block and patch-merging steps (Swin V2 passes its own; None: the module's)."""
    x = enc.patch_embed.proj(x).flatten(2).transpose(1, 2)
    if enc.patch_embed.norm is not None:
        x = enc.patch_embed.norm(x)
    B, L, _ = x.shape
    mask_tokens = enc.mask_token.expand(B, L, -1)
    w = mask.flatten(1).unsqueeze(-1).type_as(mask_tokens)
    x = x * (1.0 - w) + mask_tokens * w
    if enc.ape:
        x = x + enc.absolute_pos_embed
    for layer in enc.layers:
        for blk in layer.blocks:
            x = block(blk, x)
        if layer.downsample is not None:
            x = layer.downsample(x) if merge is None else merge(layer.downsample, x)
    x = enc.norm(x).transpose(1, 2)
    B, C, L = x.shape
    H = W = int(L ** 0.5)
    return x.reshape(B, C, H, W)


def simmim_loss(model, x, mask):
    encode = vit_encoder if hasattr(model.encoder, "blocks") else swin_encoder
    z = encode(model.encoder, x, mask)
    x_rec = model.decoder(z)
    return original_loss(x, x_rec, mask, model.patch_size, model.in_chans)
