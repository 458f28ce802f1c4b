"""Classifiers on the SimMIM encoders (the original fine-tuning models: ViT with mean pooling or the CLS
token, Swin V1/V2 with its pooled head; ConvNeXt pooled, normalised, as its authors), and loading a pretrained or fine-tuned checkpoint into one.

Loading follows the original ``utils.load_pretrained``: the ``encoder.`` prefix and the decoder are
dropped, a ViT's shared relative position bias is copied into every block, relative position bias
tables are resized when the window changes (Swin 192/w6 -> 224/w7) as the original resizes them (source
distances on a geometric progression, a bicubic spline through them: ``resize_relative_position_table``),
and absolute position embeddings when the resolution changes (ours: the original has no such resize),
bicubic with ``torch.nn.functional.interpolate``. Index buffers and Swin's attention masks are always the
model's own. Anything else that does not fit is a ValueError.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import CheckpointReadError, key_differences
from ..models.registry import build_encoder
from ..models.convnext import ConvNeXt
from ..models.swin import SwinTransformer
from ..models.swinv2 import SwinTransformerV2
from ..models.vit import VisionTransformer

# Buffers the model computes from its own shapes; a checkpoint's copy is never used.
DERIVED_BUFFERS = ("relative_position_index", "attn_mask", "relative_coords_table")
VIT_CLS_BIAS_ENTRIES = 3  # cls-to-token, token-to-cls, cls-to-cls


class VisionTransformerClassifier(VisionTransformer):
    """The original fine-tuning ViT: mean of the patch tokens through ``fc_norm`` (USE_MEAN_POOLING) or
    the CLS token through ``norm``, then ``head``."""

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + patches, embed_dim) after the last block and ``norm``."""
        x = self.patch_embed(x)
        cls_token = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls_token, x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for block in self.blocks:
            x = block(x, rel_pos_bias=rel_pos_bias)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim) pooled features (before the head)."""
        x = self.forward_tokens(x)
        if self.fc_norm is not None:
            return self.fc_norm(x[:, 1:].mean(1))
        return x[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class SwinClassifierMixin:
    """Swin (V1 or V2) with its head: the last stage's tokens, LayerNorm, average pooled, ``head``."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.ape:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x)
        return self.avgpool(self.norm(x).transpose(1, 2)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class SwinTransformerClassifier(SwinClassifierMixin, SwinTransformer):
    pass


class SwinTransformerV2Classifier(SwinClassifierMixin, SwinTransformerV2):
    pass


class ConvNeXtClassifier(ConvNeXt):
    """ConvNeXt as its authors classify: global average pooling, then ``norm``, then ``head`` (pretraining
    applied the same ``norm`` at every position instead)."""

    def __init__(self, img_size: int = 224, **kwargs) -> None:
        super().__init__(**kwargs)
        self.img_size = img_size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample_layers[0](x)
        x = self.stages[0](x)
        for downsample, stage in zip(self.downsample_layers[1:], self.stages[1:]):
            x = stage(downsample(x))
        return self.norm(x.mean((-2, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


CLASSIFIERS = {"vit": VisionTransformerClassifier, "swin": SwinTransformerClassifier,
               "swinv2": SwinTransformerV2Classifier, "convnext": ConvNeXtClassifier}


def build_classifier(config, num_classes: int) -> nn.Module:
    """The classifier of the config's MODEL section (``num_classes=0``: features only, no head)."""
    return build_encoder(config, classes=CLASSIFIERS, num_classes=num_classes)


def architecture_of(state: Mapping[str, torch.Tensor]) -> str:
    """'vit', 'swin', 'swinv2', 'convnext' or 'unknown', from the key layout of a (prefix-free) state dict."""
    if any(key.startswith("layers.") for key in state):
        return "swinv2" if any(".cpb_mlp." in key for key in state) else "swin"
    if any(key.startswith("stages.") for key in state):
        return "convnext"
    if any(key.startswith("blocks.") for key in state):
        return "vit"
    return "unknown"


def encoder_state(source: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A SimMIM state dict's encoder (``encoder.`` prefix removed, decoder and mask token dropped), or
    a classifier's state dict as it is."""
    if any(key.startswith("encoder.") for key in source):
        source = {key[len("encoder."):]: value for key, value in source.items() if key.startswith("encoder.")}
    return {key: value for key, value in source.items() if key != "mask_token"}


def geometric_source_positions(source_side: int, target_side: int) -> Tuple[np.ndarray, np.ndarray]:
    """(positions of the source's 2S-1 relative distances, the target's 2T-1 integer distances) on one axis,
    as the original's ``load_pretrained``: the source distances 1, 1+q, 1+q+q^2, ... (and their negatives)
    with the ratio q bisected in [1.01, 1.5] until the progression reaches the target's half-width, so a
    larger window stretches the far distances and keeps the near ones about where they were."""
    half = source_side // 2
    low, high = 1.01, 1.5
    while high - low > 1e-6:  # the original uses the last midpoint tried
        ratio = (low + high) / 2.0
        if (1.0 - ratio ** half) / (1.0 - ratio) > target_side // 2:
            high = ratio
        else:
            low = ratio
    distances = np.cumsum([1.0] + [ratio ** power for power in range(1, half)])
    source = np.concatenate((-distances[::-1], [0.0], distances))
    reach = target_side // 2
    return source, np.arange(-reach, reach + 1, dtype=np.float64)


def resize_relative_position_table(table: torch.Tensor, target_entries: int, extra_entries: int = 0) -> torch.Tensor:
    """A ((2W-1)^2 + extra, heads) bias table resized to ``target_entries`` rows as the original does:
    each head's grid is an interpolating bicubic spline through the source values at
    ``geometric_source_positions``, evaluated at the target's distances (SciPy's RectBivariateSpline,
    s=0: the fit the original's ``interp2d(kind='cubic')`` made; interp2d left SciPy in 1.14). The
    ``extra_entries`` last rows (ViT's CLS entries) are kept as they are."""
    from scipy.interpolate import RectBivariateSpline

    grid_entries = table.shape[0] - extra_entries
    source_side = math.isqrt(grid_entries)
    target_side = math.isqrt(target_entries - extra_entries)
    # A window W has 2W-1 distances per axis: an even side is no table (SciPy would fail on it obscurely).
    if (source_side ** 2 != grid_entries or target_side ** 2 != target_entries - extra_entries
            or source_side % 2 == 0 or target_side % 2 == 0):
        raise ValueError(f"relative position bias table of {table.shape[0]} rows cannot be resized to "
                         f"{target_entries}: not a square grid of relative distances (an odd side, 2 x window - 1)")
    if source_side == target_side:
        return table.clone()
    if source_side < 4:  # a cubic spline needs 4 points per axis
        raise ValueError(f"relative position bias table of {table.shape[0]} rows: a {source_side}x{source_side} grid "
                         "of distances is too small for the original's bicubic resize (window 3 or more)")
    source, target = geometric_source_positions(source_side, target_side)
    grids = table[:grid_entries].detach().float().cpu().numpy().reshape(source_side, source_side, table.shape[1])
    heads = [RectBivariateSpline(source, source, grids[..., head], kx=3, ky=3, s=0)(target, target)
             for head in range(grids.shape[-1])]
    resized = torch.from_numpy(np.stack(heads, axis=-1).reshape(target_side ** 2, len(heads)).astype(np.float32))
    return torch.cat((resized.to(table.device, table.dtype), table[grid_entries:]), dim=0)


def resize_position_embedding(embedding: torch.Tensor, target_tokens: int, prefix_tokens: int) -> torch.Tensor:
    """(1, prefix + S*S, D) absolute position embeddings resampled bicubically to (1, prefix + T*T, D)."""
    source_side = math.isqrt(embedding.shape[1] - prefix_tokens)
    target_side = math.isqrt(target_tokens - prefix_tokens)
    if source_side ** 2 != embedding.shape[1] - prefix_tokens or target_side ** 2 != target_tokens - prefix_tokens:
        raise ValueError(f"position embedding of {embedding.shape[1]} tokens cannot be resized to {target_tokens}: "
                         "not a square grid")
    dim = embedding.shape[-1]
    grid = embedding[:, prefix_tokens:].float().reshape(1, source_side, source_side, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(target_side, target_side), mode="bicubic", align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(1, -1, dim).to(embedding.dtype)
    return torch.cat((embedding[:, :prefix_tokens], resized), dim=1)


def remap_for(model: nn.Module, source: Mapping[str, torch.Tensor], name: str = "the checkpoint") -> Dict[str, torch.Tensor]:
    """``source`` (a SimMIM, original SimMIM or classifier state dict) in the layout and shapes of
    ``model``: shared bias expanded, tables and position embeddings resized, derived buffers the model's."""
    state = encoder_state(source)
    target = model.state_dict()
    expected, found = architecture_of(target), architecture_of(state)
    if found != expected:
        raise ValueError(f"{name} holds a {found} encoder, but the model is a {expected} "
                         f"(MODEL.TYPE); give the preset or config the checkpoint was trained with")
    shared = "rel_pos_bias.relative_position_bias_table"
    if shared in state and shared not in target:  # the original's per-block copies of the shared bias
        table = state.pop(shared)
        for key in target:
            if key.endswith("attn.relative_position_bias_table"):
                state[key] = table.clone()
    for key in list(state):
        if key.endswith(DERIVED_BUFFERS):
            del state[key]
        elif key.endswith("relative_position_bias_table") and key in target and state[key].shape != target[key].shape:
            extra = VIT_CLS_BIAS_ENTRIES if expected == "vit" else 0
            state[key] = resize_relative_position_table(state[key], target[key].shape[0], extra)
        elif key in ("pos_embed", "absolute_pos_embed") and key in target and state[key].shape != target[key].shape:
            state[key] = resize_position_embedding(state[key], target[key].shape[1], 1 if key == "pos_embed" else 0)
    for key, value in target.items():
        if key.endswith(DERIVED_BUFFERS):
            state[key] = value
    return state


# What a classifier may lack from a pretraining checkpoint: trained from its init, as the original.
FRESH_PREFIXES = ("head.", "fc_norm.")


def load_into(model: nn.Module, source: Mapping[str, torch.Tensor], keep_head: bool = True,
              name: str = "the checkpoint") -> Dict[str, list]:
    """Load ``source`` into the classifier ``model`` after ``remap_for``. What the model may lack from a
    pretraining checkpoint (head, fc_norm: trained from their init, as the original) stays as it is; a
    head of another class count is left out unless ``keep_head`` finds it fits. Any other missing,
    unexpected or misshapen key is a ValueError naming ``name`` (the file) and the first keys that differ.
    Returns {'missing': [...], 'unused': [...]}."""
    state = remap_for(model, source, name)
    target = model.state_dict()
    missing = [key for key in target if key not in state]
    unused = [key for key in state if key not in target]
    # The pretraining ViT's final norm has no place in a mean-pooling classifier (norm is Identity there).
    tolerated_unused = [key for key in unused if key.startswith("norm.") and isinstance(model.norm, nn.Identity)
                        or key.startswith(FRESH_PREFIXES)]
    bad_missing = [key for key in missing if not key.startswith(FRESH_PREFIXES)]
    bad_unused = [key for key in unused if key not in tolerated_unused]
    misshapen = [f"{key} {tuple(state[key].shape)} vs the model's {tuple(value.shape)}" for key, value in target.items()
                 if key in state and state[key].shape != value.shape and not key.startswith("head.")]
    if bad_missing or bad_unused or misshapen:
        raise CheckpointReadError(f"{name} does not fit the model (another size or architecture?): "
                                  + key_differences(bad_missing, bad_unused, misshapen))
    head_fits = all(key in state and state[key].shape == target[key].shape for key in target if key.startswith("head."))
    if not (keep_head and head_fits):
        state = {key: value for key, value in state.items() if not key.startswith("head.")}
    loadable = {key: value for key, value in state.items() if key in target}
    model.load_state_dict(loadable, strict=False)
    return {"missing": [key for key in target if key not in loadable], "unused": unused}

