"""Swin Transformer V2 as the successor SimMIM code (microsoft/Swin-Transformer) pretrains it, with its
constructor arguments, parameter and buffer names, so its checkpoints load with ``strict=True``.

What V2 changes from V1 (``swin.py``, whose windowing and stage plumbing this reuses):

- cosine attention: softmax(cos(q, k) * exp(min(logit_scale, log 100)) + bias), a learnable scale per head;
- the bias comes from a continuous position bias MLP (``cpb_mlp``) over log-spaced relative coordinates,
  squashed to (0, 16) by 16 * sigmoid, instead of a free table;
- residual post-norm: x + norm(attn(x)), x + norm(mlp(x)), norms initialised to zero;
- patch merging normalises after the reduction, over 2C channels;
- q and v biases (no k bias), as BEiT.

Attention runs through ``ops.window_attention``: q and k are L2-normalised here, the per-head scale is
folded into q (so the op's scalar scale is 1), and the MLP's bias is the op's learnable additive bias,
so every gradient (logit_scale, cpb_mlp, q/v biases) flows through the op's autograd.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .layers import gather_relative_position_bias, qv_bias_linear, relative_position_index, to_2tuple
from .registry import register_encoder
from .swin import BasicLayer, MaskedSwinMixin, PatchMerging, SwinTransformer, SwinTransformerBlock, swin_kwargs

# The successor clamps the learned log-scale at log(1 / 0.01): the cosine logits are scaled by at most 100.
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)
CPB_HIDDEN = 512  # width of the continuous position bias MLP
CPB_RANGE = 8.0  # relative coordinates are normalised to [-8, 8] before the log spacing
BIAS_BOUND = 16.0  # 16 * sigmoid(.): the bias lies in (0, 16)


def log_spaced_coords_table(window_size, pretrained_window_size) -> torch.Tensor:
    """(1, 2Wh-1, 2Ww-1, 2): every relative offset, scaled so the (pretrained) window spans [-8, 8], then
    sign(x) * log2(|x| + 1) / log2(8)."""
    wh, ww = window_size
    offsets_h = torch.arange(-(wh - 1), wh, dtype=torch.float32)
    offsets_w = torch.arange(-(ww - 1), ww, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(offsets_h, offsets_w, indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    span_h, span_w = pretrained_window_size if pretrained_window_size[0] > 0 else window_size
    table[..., 0] /= span_h - 1
    table[..., 1] /= span_w - 1
    table *= CPB_RANGE
    return torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(CPB_RANGE)


class WindowAttentionV2(nn.Module):
    def __init__(self, dim, window_size, num_heads, qkv_bias=True, attn_drop=0.0, proj_drop=0.0,
                 pretrained_window_size=(0, 0)):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.pretrained_window_size = pretrained_window_size
        self.num_heads = num_heads
        # Registration order as the successor's: the init draws random numbers in this order.
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, CPB_HIDDEN, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(CPB_HIDDEN, num_heads, bias=False))
        self.register_buffer("relative_coords_table", log_spaced_coords_table(window_size, pretrained_window_size))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def position_bias(self) -> torch.Tensor:
        """(heads, T, T) = 16 * sigmoid(cpb_mlp(log-spaced offsets)), gathered for every token pair."""
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        return BIAS_BOUND * torch.sigmoid(gather_relative_position_bias(table, self.relative_position_index))

    def forward(self, x, mask=None):
        windows, tokens, channels = x.shape
        qkv = qv_bias_linear(x, self.qkv.weight, self.q_bias, self.v_bias)
        q, k, v = qkv.reshape(windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        logit_scale = torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()  # (heads, 1, 1)
        q = F.normalize(q, dim=-1) * logit_scale.to(q.dtype)
        k = F.normalize(k, dim=-1)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = ops.window_attention(q, k, v, self.position_bias().to(q.dtype), mask, 1.0, dropout_p)
        out = out.transpose(1, 2).reshape(windows, tokens, channels)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, window_size={self.window_size}, "
                f"pretrained_window_size={self.pretrained_window_size}, num_heads={self.num_heads}")


class SwinTransformerBlockV2(SwinTransformerBlock):
    attention_class = WindowAttentionV2

    def __init__(self, *args, pretrained_window_size=0, **kwargs):
        super().__init__(*args, pretrained_window_size=to_2tuple(pretrained_window_size), **kwargs)

    def forward(self, x):
        x = x + self.drop_path(self.norm1(self.shifted_window_attention(x)))
        return x + self.drop_path(self.norm2(self.mlp(x)))


class PatchMergingV2(PatchMerging):
    def __init__(self, input_resolution, dim, norm_layer=nn.LayerNorm):
        super().__init__(input_resolution, dim, norm_layer)
        self.norm = norm_layer(2 * dim)

    def forward(self, x):
        return self.norm(self.reduction(self.gather_2x2(x)))


class BasicLayerV2(BasicLayer):
    block_class = SwinTransformerBlockV2

    def _init_respostnorm(self):
        """The successor starts every residual branch at zero: post-norm weights and biases 0."""
        for block in self.blocks:
            for norm in (block.norm1, block.norm2):
                nn.init.constant_(norm.bias, 0)
                nn.init.constant_(norm.weight, 0)


class SwinTransformerV2(SwinTransformer):
    layer_class = BasicLayerV2
    merging_class = PatchMergingV2

    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.1, norm_layer=nn.LayerNorm, ape=False, patch_norm=True,
                 use_checkpoint=False, pretrained_window_sizes=(0, 0, 0, 0), **kwargs):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
                         mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                         drop_path_rate=drop_path_rate, norm_layer=norm_layer, ape=ape, patch_norm=patch_norm,
                         use_checkpoint=use_checkpoint, pretrained_window_sizes=pretrained_window_sizes, **kwargs)
        for layer in self.layers:
            layer._init_respostnorm()

    @staticmethod
    def stage_attention_kwargs(stage: int, pretrained_window_sizes=(0, 0, 0, 0), **unused):
        return {"pretrained_window_size": pretrained_window_sizes[stage]}

    def no_weight_decay_keywords(self):
        return {"cpb_mlp", "logit_scale", "relative_position_bias_table"}


class SwinTransformerV2ForSimMIM(MaskedSwinMixin, SwinTransformerV2):
    """The Swin V2 encoder of the successor's SimMIM."""


@register_encoder("swinv2", SwinTransformerV2ForSimMIM)
def swinv2_kwargs(config) -> Dict[str, Any]:
    swin, kwargs = swin_kwargs(config, "MODEL.SWINV2")
    return dict(kwargs, pretrained_window_sizes=list(swin("PRETRAINED_WINDOW_SIZES")))
