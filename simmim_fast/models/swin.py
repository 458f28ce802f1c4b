"""Swin Transformer V1 as the original SimMIM uses it, with its parameter and buffer names.

Window attention and the masked patch embedding (with the patch LayerNorm) go through
``simmim_fast.ops``; window partition and the cyclic shift stay in PyTorch.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

from .. import _checks, ops
from .layers import Mlp, activation_checkpoint, drop_path_or_identity, drop_path_rates, gather_relative_position_bias
from .layers import init_weights, relative_position_index, split_qkv, to_2tuple
from .layers import trunc_normal_
from .registry import common_kwargs, read_key, register_encoder, section


def window_partition(x, window_size):
    """(B, H, W, C) -> (B * H/ws * W/ws, ws, ws, C), windows of one image consecutive."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window_size, window_size, width // window_size, window_size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, channels)


def window_reverse(windows, window_size, height, width):
    batch = windows.shape[0] // ((height // window_size) * (width // window_size))  # ints: exact when traced
    x = windows.view(batch, height // window_size, width // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(batch, height, width, -1)


def shifted_window_mask(resolution, window_size, shift_size) -> torch.Tensor:
    """(nW, T, T) of 0 / -100: tokens from different regions of the rolled image must not attend."""
    height, width = resolution
    region = torch.zeros((1, height, width, 1))
    slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    count = 0
    for h in slices:
        for w in slices:
            region[:, h, w, :] = count
            count += 1
    region_windows = window_partition(region, window_size).view(-1, window_size * window_size)
    mask = region_windows.unsqueeze(1) - region_windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))


class WindowAttention(nn.Module):
    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size[0] - 1) * (2 * window_size[1] - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x, mask=None):
        windows, tokens, channels = x.shape
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        bias = gather_relative_position_bias(self.relative_position_bias_table, self.relative_position_index)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = ops.window_attention(q, k, v, bias, mask, self.scale, dropout_p)
        out = out.transpose(1, 2).reshape(windows, tokens, channels)
        return self.proj_drop(self.proj(out))


class SwinTransformerBlock(nn.Module):
    attention_class = WindowAttention

    def __init__(self, dim, input_resolution, num_heads, window_size=7, shift_size=0, mlp_ratio=4.0, qkv_bias=True,
                 drop=0.0, attn_drop=0.0, drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 **attention_kwargs):
        """``attention_kwargs``: ``qk_scale`` here, ``pretrained_window_size`` in Swin V2."""
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.mlp_ratio = mlp_ratio
        if min(self.input_resolution) <= self.window_size:
            # A stage no larger than the window: one window, no shift.
            self.shift_size = 0
            self.window_size = min(self.input_resolution)
        if not 0 <= self.shift_size < self.window_size:
            raise ValueError(f"shift_size must be in [0, window_size), got {self.shift_size}")
        self.norm1 = norm_layer(dim)
        self.attn = self.attention_class(dim, window_size=to_2tuple(self.window_size), num_heads=num_heads,
                                         qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, **attention_kwargs)
        self.drop_path = drop_path_or_identity(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        attn_mask = None
        if self.shift_size > 0:
            attn_mask = shifted_window_mask(self.input_resolution, self.window_size, self.shift_size)
        self.register_buffer("attn_mask", attn_mask)

    def shifted_window_attention(self, x):
        """(B, H*W, C) -> (B, H*W, C): cyclic shift, attention inside each window, shift back."""
        height, width = self.input_resolution
        batch, length, channels = x.shape
        if length != height * width:
            raise ValueError(f"input must have {height}x{width} tokens, got {length}")
        x = x.view(batch, height, width, channels)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = window_partition(x, self.window_size).view(-1, self.window_size * self.window_size, channels)
        windows = self.attn(windows, mask=self.attn_mask)
        x = window_reverse(windows.view(-1, self.window_size, self.window_size, channels), self.window_size,
                           height, width)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        return x.reshape(batch, length, channels)

    def forward(self, x):
        x = x + self.drop_path(self.shifted_window_attention(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    def __init__(self, input_resolution, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.input_resolution = input_resolution
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def gather_2x2(self, x):
        """(B, H*W, C) -> (B, H/2*W/2, 4C), the four neighbours of each 2x2 cell side by side."""
        height, width = self.input_resolution
        batch, _, channels = x.shape
        x = x.view(batch, height, width, channels)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return x.view(batch, -1, 4 * channels)

    def forward(self, x):
        return self.reduction(self.norm(self.gather_2x2(x)))


class BasicLayer(nn.Module):
    block_class = SwinTransformerBlock

    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio=4.0, qkv_bias=True,
                 drop=0.0, attn_drop=0.0, drop_path=0.0, norm_layer=nn.LayerNorm, downsample=None,
                 use_checkpoint=False, **attention_kwargs):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            self.block_class(dim=dim, input_resolution=input_resolution, num_heads=num_heads,
                             window_size=window_size, shift_size=0 if i % 2 == 0 else window_size // 2,
                             mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop,
                             drop_path=drop_path[i] if isinstance(drop_path, list) else drop_path,
                             norm_layer=norm_layer, **attention_kwargs)
            for i in range(depth)
        ])
        self.downsample = downsample(input_resolution, dim=dim, norm_layer=norm_layer) if downsample else None

    def forward(self, x):
        for block in self.blocks:
            x = activation_checkpoint(block, x) if self.use_checkpoint else block(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None):
        super().__init__()
        img_size, patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        self.img_size = img_size
        self.patch_size = patch_size
        self.patches_resolution = [img_size[0] // patch_size[0], img_size[1] // patch_size[1]]
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x):
        _checks.check_image(x, self.in_chans, self.img_size, self.proj.weight)
        x = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x


def check_stage_geometry(img_size: Tuple[int, int], patch_size: Tuple[int, int], window_size: int,
                         num_layers: int) -> None:
    """Every stage's token grid must split into whole windows (a stage no larger than the window is one
    window) and halve evenly into the next stage; else a ValueError naming the sizes that fit."""
    if img_size[0] % patch_size[0] or img_size[1] % patch_size[1]:
        raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
    grid = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
    stages = [(grid[0] // 2 ** i, grid[1] // 2 ** i) for i in range(num_layers)]
    for index, (height, width) in enumerate(stages):
        window = min(height, width) if min(height, width) <= window_size else window_size
        if height % window or width % window:
            problem = f"does not split into {window}x{window} windows"
        elif index < num_layers - 1 and (height % 2 or width % 2):
            problem = "cannot halve into the next stage"
        else:
            continue
        fitting = patch_size[0] * window_size * 2 ** (num_layers - 1)
        raise ValueError(
            f"img_size {img_size} with patch_size {patch_size} gives stage token grids "
            f"{', '.join(f'{h}x{w}' for h, w in stages)}; stage {index + 1} ({height}x{width}) {problem}: use "
            f"e.g. an img_size that is a multiple of {fitting} (patch_size x window_size x 2^(stages-1)) or "
            "another window_size")


class SwinTransformer(nn.Module):
    layer_class = BasicLayer
    merging_class = PatchMerging

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, ape: bool = False, patch_norm: bool = True,
                 use_checkpoint: bool = False, **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_norm = patch_norm
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.mlp_ratio = mlp_ratio
        self.in_chans = in_chans
        self.patch_size = patch_size
        check_stage_geometry(to_2tuple(img_size), to_2tuple(patch_size), window_size, self.num_layers)
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                      norm_layer=norm_layer if self.patch_norm else None)
        num_patches = self.patch_embed.num_patches
        patches_resolution = self.patch_embed.patches_resolution
        self.patches_resolution = patches_resolution
        if self.ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)
        rates = drop_path_rates(drop_path_rate, sum(depths))
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            self.layers.append(self.layer_class(
                dim=int(embed_dim * 2 ** i),
                input_resolution=(patches_resolution[0] // (2 ** i), patches_resolution[1] // (2 ** i)),
                depth=depths[i], num_heads=num_heads[i], window_size=window_size, mlp_ratio=self.mlp_ratio,
                qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=rates[sum(depths[:i]):sum(depths[:i + 1])], norm_layer=norm_layer,
                downsample=self.merging_class if i < self.num_layers - 1 else None, use_checkpoint=use_checkpoint,
                **self.stage_attention_kwargs(i, qk_scale=qk_scale, **kwargs)))
        self.norm = norm_layer(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(partial(init_weights, weight_init=trunc_normal_))

    @staticmethod
    def stage_attention_kwargs(stage: int, qk_scale=None, **unused):
        """The window attention's own arguments in stage ``stage`` (the original ignores unknown kwargs)."""
        return {"qk_scale": qk_scale}

    def no_weight_decay(self) -> Set[str]:
        return {"absolute_pos_embed"}

    def no_weight_decay_keywords(self) -> Set[str]:
        return {"relative_position_bias_table"}


class MaskedSwinMixin:
    """What SimMIM adds to a Swin encoder (V1 or V2): the mask token replaces masked patches after
    patch_embed (and its LayerNorm); output (B, C, H/32, W/32)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.num_classes != 0:
            raise ValueError(f"{type(self).__name__} needs num_classes=0, got {self.num_classes}")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        embed = self.patch_embed
        _checks.check_encoder_inputs(x, mask, self.in_chans, embed.img_size, embed.patch_size, embed.proj.weight)
        norm = embed.norm
        x = ops.masked_patch_embed(x, mask, embed.proj.weight, embed.proj.bias, self.mask_token,
                                   self.absolute_pos_embed if self.ape else None,
                                   None if norm is None else norm.weight, None if norm is None else norm.bias,
                                   1e-5 if norm is None else norm.eps)
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        batch, length, channels = x.shape
        height, width = (res // 2 ** (self.num_layers - 1) for res in self.patches_resolution)
        return x.transpose(1, 2).reshape(batch, channels, height, width)

    def no_weight_decay(self) -> Set[str]:
        return super().no_weight_decay() | {"mask_token"}


class SwinTransformerForSimMIM(MaskedSwinMixin, SwinTransformer):
    """The Swin encoder of the original SimMIM."""


def swin_kwargs(config, prefix: str):
    """The constructor arguments Swin V1 and V2 share, from their section (MODEL.SWIN / MODEL.SWINV2)."""
    swin = section(config, prefix)
    return swin, dict(
        **common_kwargs(config), patch_size=swin("PATCH_SIZE"), in_chans=swin("IN_CHANS"), embed_dim=swin("EMBED_DIM"),
        depths=list(swin("DEPTHS")), num_heads=list(swin("NUM_HEADS")), window_size=swin("WINDOW_SIZE"),
        mlp_ratio=swin("MLP_RATIO"), qkv_bias=swin("QKV_BIAS"), ape=swin("APE"), patch_norm=swin("PATCH_NORM"),
        use_checkpoint=read_key(config, "TRAIN.USE_CHECKPOINT"))


@register_encoder("swin", SwinTransformerForSimMIM)
def swin_v1_kwargs(config) -> Dict[str, Any]:
    swin, kwargs = swin_kwargs(config, "MODEL.SWIN")
    return dict(kwargs, qk_scale=swin("QK_SCALE"))
