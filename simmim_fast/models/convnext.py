"""ConvNeXt (facebookresearch/ConvNeXt, its constructor arguments and parameter names) as a SimMIM encoder.

SimMIM-style: the stem (4x4 conv, stride 4, then LayerNorm over channels) embeds 4x4 patches, the mask
token replaces the masked ones there (``ops.masked_patch_embed`` fuses the three), and the stages run
unchanged on the blended map. The final LayerNorm, which ConvNeXt applies after global pooling, is
applied at every position instead, so the decoder sees (B, C, H/32, W/32) normalised features as it does
from Swin; the decoder and the loss are SimMIM's.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, Set

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _checks, ops
from .layers import drop_path_or_identity, drop_path_rates, init_weights, to_2tuple, trunc_normal_
from .registry import read_key, register_encoder, section

STEM_STRIDE = 4
LN_EPS = 1e-6


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over C of a (B, C, H, W) map (ConvNeXt's ``data_format="channels_first"``)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class Block(nn.Module):
    """7x7 depthwise conv -> LayerNorm -> Linear 4C -> GELU -> Linear C -> layer scale, residual."""

    def __init__(self, dim, drop_path=0.0, layer_scale_init_value=1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (nn.Parameter(layer_scale_init_value * torch.ones(dim))
                      if layer_scale_init_value > 0 else None)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x):
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x).permute(0, 2, 3, 1)))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXt(nn.Module):
    def __init__(self, in_chans=3, num_classes=1000, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768),
                 drop_path_rate=0.0, layer_scale_init_value=1e-6, head_init_scale=1.0):
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"ConvNeXt has 4 stages: depths and dims need 4 entries, got {depths}, {dims}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.patch_size = STEM_STRIDE
        self.num_layers = len(depths)
        self.num_features = dims[-1]
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=STEM_STRIDE, stride=STEM_STRIDE),
            ChannelsFirstLayerNorm(dims[0], eps=LN_EPS))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(ChannelsFirstLayerNorm(dims[i], eps=LN_EPS),
                                                        nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        rates = drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        for i in range(4):
            first = sum(depths[:i])
            self.stages.append(nn.Sequential(*[
                Block(dims[i], drop_path=rates[first + j], layer_scale_init_value=layer_scale_init_value)
                for j in range(depths[i])]))
        self.norm = nn.LayerNorm(dims[-1], eps=LN_EPS)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        # ConvNeXt's init: convs and linears trunc_normal(0.02) with zero bias; its LayerNorms keep 1 / 0.
        self.apply(partial(init_weights, weight_init=trunc_normal_, weight_types=(nn.Conv2d, nn.Linear)))
        if num_classes > 0:
            self.head.weight.data.mul_(head_init_scale)
            self.head.bias.data.mul_(head_init_scale)


class ConvNeXtForSimMIM(ConvNeXt):
    """forward(x, mask): mask (B, H/4, W/4) of 0/1 -> features (B, dims[-1], H/32, W/32)."""

    def __init__(self, img_size: int = 224, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.num_classes != 0:
            raise ValueError(f"ConvNeXtForSimMIM needs num_classes=0, got {self.num_classes}")
        self.img_size = to_2tuple(img_size)
        stride = STEM_STRIDE * 2 ** (self.num_layers - 1)
        if self.img_size[0] % stride or self.img_size[1] % stride:
            raise ValueError(f"img_size {img_size} must be a multiple of ConvNeXt's output stride {stride}")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.downsample_layers[0][0].out_channels))
        trunc_normal_(self.mask_token, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _checks.check_encoder_inputs(x, mask, self.in_chans, self.img_size, (STEM_STRIDE, STEM_STRIDE),
                                     self.downsample_layers[0][0].weight)
        conv, norm = self.downsample_layers[0]
        tokens = ops.masked_patch_embed(x, mask, conv.weight, conv.bias, self.mask_token, None, norm.weight,
                                        norm.bias, norm.eps)
        batch, _, height, width = x.shape
        x = tokens.transpose(1, 2).reshape(batch, -1, height // STEM_STRIDE, width // STEM_STRIDE)
        x = self.stages[0](x)
        for downsample, stage in zip(self.downsample_layers[1:], self.stages[1:]):
            x = stage(downsample(x))
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def no_weight_decay(self) -> Set[str]:
        return {"mask_token"}


@register_encoder("convnext", ConvNeXtForSimMIM)
def convnext_kwargs(config) -> Dict[str, Any]:
    convnext = section(config, "MODEL.CONVNEXT")
    return dict(
        img_size=read_key(config, "DATA.IMG_SIZE"), in_chans=convnext("IN_CHANS"),
        depths=list(convnext("DEPTHS")), dims=list(convnext("DIMS")),
        drop_path_rate=read_key(config, "MODEL.DROP_PATH_RATE"),
        layer_scale_init_value=convnext("LAYER_SCALE_INIT_VALUE"))
