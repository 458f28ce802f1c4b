"""The BEiT-style Vision Transformer the original SimMIM uses, with its parameter names.

Attention, the masked patch embedding and the mask-token blend go through ``simmim_fast.ops`` (the
dispatch picks the reference, Triton, ... backend); everything else is plain PyTorch.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Dict, Optional, Set, Tuple, Union

import torch
import torch.nn as nn

from .. import _checks, ops
from .layers import Mlp, drop_path_or_identity, drop_path_rates, gather_relative_position_bias, init_weights
from .layers import qv_bias_linear, relative_position_index, split_qkv, to_2tuple
from .layers import trunc_normal_ as _trunc_normal
from .registry import common_kwargs, register_encoder, section


def vit_trunc_normal_(tensor, std=1.0):
    """The original ViT init: a normal cut at +-std (not timm's +-2)."""
    return _trunc_normal(tensor, mean=0.0, std=std, a=-std, b=std)


class PatchEmbed(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        img_size, patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        _checks.require(all(size >= 1 and patch >= 1 and size % patch == 0
                            for size, patch in zip(img_size, patch_size)),
                        lambda: f"img_size {img_size} must be a positive multiple of patch_size {patch_size} "
                                "(the convolution would drop the pixels left over)")
        self.img_size = img_size
        self.patch_size = patch_size
        self.patch_shape = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.num_patches = self.patch_shape[0] * self.patch_shape[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        _checks.check_image(x, self.proj.in_channels, self.img_size, self.proj.weight)
        return self.proj(x).flatten(2).transpose(1, 2)


class RelativePositionBias(nn.Module):
    """A relative position bias table: (2Wh-1)(2Ww-1) token-to-token entries plus 3 for the cls token
    (cls-to-token, token-to-cls, cls-to-cls). Shared by all blocks, or one per block."""

    def __init__(self, window_size, num_heads):
        super().__init__()
        self.window_size = window_size
        self.num_relative_distance = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_relative_distance, num_heads))
        self.register_buffer("relative_position_index", cls_relative_position_index(window_size), persistent=True)

    def forward(self):
        return gather_relative_position_bias(self.relative_position_bias_table, self.relative_position_index)


def cls_relative_position_index(window_size) -> torch.Tensor:
    tokens = window_size[0] * window_size[1]
    entries = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3
    index = torch.zeros((tokens + 1, tokens + 1), dtype=torch.long)
    index[1:, 1:] = relative_position_index(window_size)
    index[0, 0:] = entries - 3
    index[0:, 0] = entries - 2
    index[0, 0] = entries - 1
    return index


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                 window_size=None, attn_head_dim=None):
        super().__init__()
        self.num_heads = num_heads
        head_dim = attn_head_dim if attn_head_dim is not None else dim // num_heads
        all_head_dim = head_dim * num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, all_head_dim * 3, bias=False)
        # BEiT's bias layout: q and v have biases, k has none.
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(all_head_dim))
            self.v_bias = nn.Parameter(torch.zeros(all_head_dim))
        else:
            self.q_bias = None
            self.v_bias = None
        if window_size:
            self.window_size = window_size
            self.num_relative_distance = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3
            self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_relative_distance, num_heads))
            self.register_buffer("relative_position_index", cls_relative_position_index(window_size))
        else:
            self.window_size = None
            self.relative_position_bias_table = None
            self.relative_position_index = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(all_head_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, rel_pos_bias: Optional[torch.Tensor] = None):
        batch, tokens, _ = x.shape
        qkv = qv_bias_linear(x, self.qkv.weight, self.q_bias, self.v_bias)
        q, k, v = split_qkv(qkv, self.num_heads)
        bias = rel_pos_bias
        if self.relative_position_bias_table is not None:
            own = gather_relative_position_bias(self.relative_position_bias_table, self.relative_position_index)
            bias = own if bias is None else own + bias
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = ops.attention(q, k, v, bias, self.scale, dropout_p)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, init_values=None, act_layer=nn.GELU, norm_layer=nn.LayerNorm, window_size=None,
                 attn_head_dim=None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                              proj_drop=drop, window_size=window_size, attn_head_dim=attn_head_dim)
        self.drop_path = drop_path_or_identity(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        if init_values is not None:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1, self.gamma_2 = None, None

    def forward(self, x, rel_pos_bias=None):
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, init_values: Optional[float] = None,
                 use_abs_pos_emb: bool = True, use_rel_pos_bias: bool = False, use_shared_rel_pos_bias: bool = False,
                 use_mean_pooling: bool = True, init_scale: float = 0.001):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim)) if use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(p=drop_rate)
        patch_shape = self.patch_embed.patch_shape
        self.rel_pos_bias = RelativePositionBias(patch_shape, num_heads) if use_shared_rel_pos_bias else None
        rates = drop_path_rates(drop_path_rate, depth)
        self.use_rel_pos_bias = use_rel_pos_bias
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                  drop=drop_rate, attn_drop=attn_drop_rate, drop_path=rates[i], norm_layer=norm_layer,
                  init_values=init_values, window_size=patch_shape if use_rel_pos_bias else None)
            for i in range(depth)
        ])
        self.norm = nn.Identity() if use_mean_pooling else norm_layer(embed_dim)
        self.fc_norm = norm_layer(embed_dim) if use_mean_pooling else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        if self.pos_embed is not None:
            vit_trunc_normal_(self.pos_embed, std=0.02)
        vit_trunc_normal_(self.cls_token, std=0.02)
        if num_classes > 0:
            vit_trunc_normal_(self.head.weight, std=0.02)
        self.apply(partial(init_weights, weight_init=vit_trunc_normal_, weight_types=(nn.Linear, nn.Conv2d)))
        self.fix_init_weight()
        if num_classes > 0:
            self.head.weight.data.mul_(init_scale)
            self.head.bias.data.mul_(init_scale)

    def fix_init_weight(self):
        """Scale each residual branch's output projection by 1/sqrt(2 * layer_id), as BEiT."""
        for layer_id, block in enumerate(self.blocks, start=1):
            block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer_id))
            block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer_id))

    def no_weight_decay(self) -> Set[str]:
        return {"pos_embed", "cls_token"}

    def get_num_layers(self):
        return len(self.blocks)


class VisionTransformerForSimMIM(VisionTransformer):
    """The ViT encoder of SimMIM: masked patches replaced by ``mask_token``; output (B, D, H/p, W/p)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.num_classes != 0:
            raise ValueError(f"VisionTransformerForSimMIM needs num_classes=0, got {self.num_classes}")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        vit_trunc_normal_(self.mask_token, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        embed = self.patch_embed
        _checks.check_encoder_inputs(x, mask, self.in_chans, embed.img_size, embed.patch_size, embed.proj.weight)
        pos_embed = self.pos_embed
        tokens = ops.masked_patch_embed(x, mask, embed.proj.weight, embed.proj.bias, self.mask_token,
                                        None if pos_embed is None else pos_embed[:, 1:])
        cls_token = self.cls_token if pos_embed is None else self.cls_token + pos_embed[:, :1]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1).to(tokens.dtype), tokens), dim=1)
        x = self.pos_drop(x)
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for block in self.blocks:
            x = block(x, rel_pos_bias=rel_pos_bias)
        x = self.norm(x)[:, 1:]
        batch, _, channels = x.shape
        return x.transpose(1, 2).reshape(batch, channels, *embed.patch_shape)


def vit_norm_layer(eps: float = 1e-6):
    return partial(nn.LayerNorm, eps=eps)


@register_encoder("vit", VisionTransformerForSimMIM)
def vit_kwargs(config) -> Dict[str, Any]:
    vit = section(config, "MODEL.VIT")
    return dict(
        **common_kwargs(config), patch_size=vit("PATCH_SIZE"), in_chans=vit("IN_CHANS"), embed_dim=vit("EMBED_DIM"),
        depth=vit("DEPTH"), num_heads=vit("NUM_HEADS"), mlp_ratio=vit("MLP_RATIO"), qkv_bias=vit("QKV_BIAS"),
        norm_layer=vit_norm_layer(1e-6), init_values=vit("INIT_VALUES"), use_abs_pos_emb=vit("USE_APE"),
        use_rel_pos_bias=vit("USE_RPB"), use_shared_rel_pos_bias=vit("USE_SHARED_RPB"),
        use_mean_pooling=vit("USE_MEAN_POOLING"))
