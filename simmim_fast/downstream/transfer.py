"""Our encoders as detection / segmentation backbones elsewhere, from a ``simmim-fast export`` folder.

- timm: ``timm.create_model("local-dir:EXPORT", pretrained=True, features_only=True)`` (a timm export;
  timm reads config.json and model.safetensors itself, strictly); ``timm_features`` checks it.
- transformers: ``hf_backbone(EXPORT)`` is ``SwinBackbone`` / ``Swinv2Backbone`` / ``ConvNextBackbone`` /
  ``BeitBackbone`` ``.from_pretrained`` with our weights, refusing any missing or unexpected weight except
  the parts a backbone adds (``UNTRAINED``); the last stage's norm gets the encoder's trained final norm.
  ``hf_upernet(EXPORT, num_labels)`` puts that backbone into ``UperNetForSemanticSegmentation``.
- ``param_groups``: AdamW groups with our layer-wise LR decay for a model built from an export, whose
  parameter names no longer say which layer they belong to (``layer_decay.json`` does).
- ``stage_outputs``: our model's per-stage feature maps, what every backbone above must reproduce.

timm and transformers are imported only by the functions that need them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .models import ConvNeXtClassifier, SwinClassifierMixin, VisionTransformerClassifier

HF_BACKBONES = {"beit": "BeitBackbone", "swin": "SwinBackbone", "swinv2": "Swinv2Backbone",
                "convnext": "ConvNextBackbone"}
# What a backbone adds to the encoder (newly initialised by from_pretrained; trained on the downstream
# task) and what it leaves out of an export (the pooled head's final norm, the classifier).
UNTRAINED = (r"^hidden_states_norms\.stage[123]\.", r"^fpn\.")
DROPPED = (r"^layernorm\.", r"^pooler\.", r"^classifier\.")


def stage_outputs(model: nn.Module, images: torch.Tensor) -> List[torch.Tensor]:
    """(B, C, H, W) after every stage of our classifier (Swin V1/V2: before the patch merging, no norm;
    ConvNeXt: after its blocks; ViT: every block's patch tokens, without the CLS token)."""
    if isinstance(model, SwinClassifierMixin):
        x = model.patch_embed(images)
        if model.ape:
            x = x + model.absolute_pos_embed
        outputs = []
        for layer in model.layers:
            for block in layer.blocks:
                x = block(x)
            height, width = layer.input_resolution
            outputs.append(x.transpose(1, 2).reshape(x.shape[0], -1, height, width))
            if layer.downsample is not None:
                x = layer.downsample(x)
        return outputs
    if isinstance(model, ConvNeXtClassifier):
        outputs, x = [], images
        for downsample, stage in zip(model.downsample_layers, model.stages):
            x = stage(downsample(x))
            outputs.append(x)
        return outputs
    if isinstance(model, VisionTransformerClassifier):
        x = model.patch_embed(images)
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if model.pos_embed is not None:
            x = x + model.pos_embed
        rel_pos_bias = model.rel_pos_bias() if model.rel_pos_bias is not None else None
        grid = [side // patch for side, patch in zip(images.shape[-2:], model.patch_embed.patch_size)]
        outputs = []
        for block in model.blocks:
            x = block(x, rel_pos_bias=rel_pos_bias)
            outputs.append(x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, *grid))
        return outputs
    raise ValueError(f"stage_outputs takes a simmim_fast classifier, got {type(model).__name__}")


def timm_features(export: str, **kwargs: Any) -> nn.Module:
    """timm's ``features_only`` model of a timm export (``kwargs``: out_indices, ...), loaded by timm
    from the folder with strict key matching."""
    import timm

    config = json.loads((Path(export) / "config.json").read_text())
    if "architecture" not in config:
        raise ValueError(f"{export} is not a timm export (config.json has no 'architecture'); export with --format timm")
    return timm.create_model(f"local-dir:{Path(export).resolve()}", pretrained=True, features_only=True, **kwargs)


def _unexplained(keys, allowed: Sequence[str]) -> List[str]:
    return sorted(key for key in keys if not any(re.match(pattern, key) for pattern in allowed))


def hf_backbone(export: str, **kwargs: Any) -> nn.Module:
    """The transformers backbone class of a transformers export (``kwargs``: out_features, out_indices,
    and for BEiT add_fpn / reshape_hidden_states ...), our weights in place. The last stage's norm
    (Swin, ConvNeXt) is the encoder's final norm, which pretraining applied there; the other stages'
    norms and BEiT's FPN are new (``UNTRAINED``): trained on the downstream task."""
    import transformers
    from safetensors.torch import load_file

    folder = Path(export)
    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in HF_BACKBONES:
        raise ValueError(f"{export} is not a transformers export of {', '.join(HF_BACKBONES)} (model_type "
                         f"{model_type!r}); export with --format transformers")
    if config["architectures"][0].endswith("ForImageClassification"):
        raise ValueError(f"{export} holds a classifier; export the pretraining checkpoint for a backbone")
    model, info = getattr(transformers, HF_BACKBONES[model_type]).from_pretrained(
        str(folder), output_loading_info=True, **kwargs)
    missing = _unexplained(info["missing_keys"], UNTRAINED + (r"^hidden_states_norms\.stage4\.",))
    unexpected = _unexplained(info["unexpected_keys"], DROPPED)
    if missing or unexpected or info["mismatched_keys"]:
        raise ValueError(f"{export} does not fit {HF_BACKBONES[model_type]}: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, mismatched {list(info['mismatched_keys'])[:4]}")
    last_norm = getattr(getattr(model, "hidden_states_norms", None), "stage4", None)
    if last_norm is not None:
        weights = load_file(str(folder / "model.safetensors"))
        with torch.no_grad():
            last_norm.weight.copy_(weights["layernorm.weight"])
            last_norm.bias.copy_(weights["layernorm.bias"])
    return model


def hf_upernet(export: str, num_labels: int, backbone_kwargs: Optional[Dict[str, Any]] = None,
               **upernet_kwargs: Any) -> nn.Module:
    """``UperNetForSemanticSegmentation`` on ``hf_backbone(export, **backbone_kwargs)``: the backbone
    holds our weights (loaded strictly), the decode and auxiliary heads are new."""
    import transformers

    backbone = hf_backbone(export, **(backbone_kwargs or {}))
    config = transformers.UperNetConfig(backbone_config=backbone.config, num_labels=num_labels, **upernet_kwargs)
    model = transformers.UperNetForSemanticSegmentation(config)
    model.backbone.load_state_dict(backbone.state_dict(), strict=True)
    return model


def param_groups(model: nn.Module, export: str, lr: float, weight_decay: float,
                 layer_decay: Optional[float] = None) -> List[Dict[str, Any]]:
    """AdamW parameter groups for ``model`` (built from ``export`` by any library, inside any wrapper):
    each parameter whose name ends with an exported name gets lr x layer_decay^(last layer - its layer)
    and weight decay as our fine-tuning gives it; any other parameter (a new head, neck or norm) is in
    the last layer, with weight decay unless 1-D. ``layer_decay`` defaults to the published recipe's."""
    table = json.loads((Path(export) / "layer_decay.json").read_text())
    layers = {name: entry["layer"] for name, entry in table["parameters"].items()}
    decayed = {name: entry["weight_decay"] for name, entry in table["parameters"].items()}
    last = max(layers.values()) if layers else 0
    decay = table["recipe_layer_decay"] if layer_decay is None else layer_decay
    groups: Dict[str, Dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exported = _exported_name(name, layers)
        layer = layers[exported] if exported else last
        with_decay = decayed[exported] if exported else param.ndim > 1
        key = f"layer_{layer}_{'decay' if with_decay else 'no_decay'}"
        group = groups.setdefault(key, {"params": [], "group_name": key, "lr": lr * decay ** (last - layer),
                                        "weight_decay": weight_decay if with_decay else 0.0})
        group["params"].append(param)
    return list(groups.values())


def _exported_name(name: str, exported: Dict[str, int]) -> Optional[str]:
    """The exported name ``name`` ends with, after a wrapper's prefix ("backbone.", "model.", ...) or a
    classifier export's base prefix ("swin.", "beit.", ...); timm's feature wrappers flatten module paths
    with "_" ("stem_0.weight", "layers_1.blocks..."), so those are matched with "." too."""
    parts = name.split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:])
        for variant in (candidate, re.sub(r"^([a-z]+)_(\d+)\.", r"\1.\2.", candidate)):
            if variant in exported:
                return variant
            for base in ("beit.", "swin.", "swinv2.", "convnext."):
                if base + variant in exported:
                    return base + variant
    return None
