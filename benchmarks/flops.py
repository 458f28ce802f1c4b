"""Model FLOPs of SimMIM for MFU: 2 per multiply-add of every matmul (linear, conv, attention's two
batched products) in the forward pass; elementwise work, norms and softmax are not counted, as in
the usual MFU convention. A training step counts 3x the forward (backward = 2x forward).
The decoder is counted in full, as the model defines it, whatever a backend skips.
"""
from __future__ import annotations

from typing import Dict

import torch.nn as nn

from simmim_fast.models.simmim import SimMIM
from simmim_fast.models.swin import SwinTransformerForSimMIM
from simmim_fast.models.vit import VisionTransformerForSimMIM

TRAINING_STEP_FACTOR = 3  # forward + backward (grad of inputs and of weights: 2x the forward)


def _linear(layer: nn.Linear, tokens: int) -> int:
    return tokens * layer.in_features * layer.out_features


def _conv_macs(conv: nn.Conv2d, out_positions: int) -> int:
    kernel = conv.kernel_size[0] * conv.kernel_size[1]
    return out_positions * conv.out_channels * conv.in_channels // conv.groups * kernel


def _mlp(mlp, tokens: int) -> int:
    return _linear(mlp.fc1, tokens) + _linear(mlp.fc2, tokens)


def vit_macs(encoder: VisionTransformerForSimMIM) -> int:
    patches = encoder.patch_embed.num_patches
    tokens = patches + 1  # the cls token
    macs = _conv_macs(encoder.patch_embed.proj, patches)
    for block in encoder.blocks:
        attn = block.attn
        width = attn.qkv.out_features // 3  # all heads' q (or k, v) width
        macs += _linear(attn.qkv, tokens) + 2 * tokens * tokens * width + _linear(attn.proj, tokens)
        macs += _mlp(block.mlp, tokens)
    return macs


def swin_macs(encoder: SwinTransformerForSimMIM) -> int:
    macs = _conv_macs(encoder.patch_embed.proj, encoder.patch_embed.num_patches)
    for layer in encoder.layers:
        height, width = layer.input_resolution
        tokens = height * width
        for block in layer.blocks:
            window_tokens = block.window_size ** 2
            # Per window: q k^T and probs v, each T x T x dim multiply-adds; tokens / T windows.
            attention = 2 * tokens * window_tokens * block.dim
            macs += _linear(block.attn.qkv, tokens) + attention + _linear(block.attn.proj, tokens)
            macs += _mlp(block.mlp, tokens)
        if layer.downsample is not None:
            macs += _linear(layer.downsample.reduction, tokens // 4)
    return macs


def simmim_forward_flops(model: SimMIM, image_size: int) -> Dict[str, int]:
    """Forward FLOPs per image: {'encoder', 'decoder', 'total'}."""
    encoder = model.encoder
    if isinstance(encoder, VisionTransformerForSimMIM):
        encoder_macs = vit_macs(encoder)
    elif isinstance(encoder, SwinTransformerForSimMIM):
        encoder_macs = swin_macs(encoder)
    else:
        raise TypeError(f"no FLOP count for encoder {type(encoder).__name__}")
    feature_side = image_size // model.encoder_stride
    decoder_macs = _conv_macs(model.decoder[0], feature_side * feature_side)
    return {"encoder": 2 * encoder_macs, "decoder": 2 * decoder_macs, "total": 2 * (encoder_macs + decoder_macs)}


def training_step_flops(model: SimMIM, image_size: int, batch: int) -> int:
    return TRAINING_STEP_FACTOR * batch * simmim_forward_flops(model, image_size)["total"]
