"""The original SimMIM config layout (MODEL / DATA / TRAIN ...), presets for the published recipes,
and ``build_simmim(config)``.

A config is a nested dict or any attribute object (yacs CfgNode, SimpleNamespace); ``Config`` is ours:
a dict that also reads as attributes. Unknown keys are errors that list the valid ones.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, Mapping, Optional

import torch.nn as nn

from .models.simmim import SimMIM
from .models.swin import SwinTransformerForSimMIM
from .models.vit import VisionTransformerForSimMIM, vit_norm_layer

# The original config.py defaults (the pretraining part), same names and values.
DEFAULTS: Dict[str, Any] = {
    "DATA": {
        "BATCH_SIZE": 128, "DATA_PATH": "", "DATASET": "imagenet", "IMG_SIZE": 224, "INTERPOLATION": "bicubic",
        "PIN_MEMORY": True, "NUM_WORKERS": 8, "MASK_PATCH_SIZE": 32, "MASK_RATIO": 0.6,
    },
    "MODEL": {
        "TYPE": "swin", "NAME": "swin_tiny_patch4_window7_224", "RESUME": "", "NUM_CLASSES": 1000,
        "DROP_RATE": 0.0, "DROP_PATH_RATE": 0.1, "LABEL_SMOOTHING": 0.1,
        "SWIN": {
            "PATCH_SIZE": 4, "IN_CHANS": 3, "EMBED_DIM": 96, "DEPTHS": [2, 2, 6, 2], "NUM_HEADS": [3, 6, 12, 24],
            "WINDOW_SIZE": 7, "MLP_RATIO": 4.0, "QKV_BIAS": True, "QK_SCALE": None, "APE": False, "PATCH_NORM": True,
        },
        "VIT": {
            "PATCH_SIZE": 16, "IN_CHANS": 3, "EMBED_DIM": 768, "DEPTH": 12, "NUM_HEADS": 12, "MLP_RATIO": 4,
            "QKV_BIAS": True, "INIT_VALUES": 0.1, "USE_APE": False, "USE_RPB": False, "USE_SHARED_RPB": True,
            "USE_MEAN_POOLING": False,
        },
    },
    "TRAIN": {
        "START_EPOCH": 0, "EPOCHS": 300, "WARMUP_EPOCHS": 20, "WEIGHT_DECAY": 0.05, "BASE_LR": 5e-4,
        "WARMUP_LR": 5e-7, "MIN_LR": 5e-6, "CLIP_GRAD": 5.0, "AUTO_RESUME": True, "ACCUMULATION_STEPS": 0,
        "USE_CHECKPOINT": False,
        "LR_SCHEDULER": {"NAME": "cosine", "DECAY_EPOCHS": 30, "DECAY_RATE": 0.1, "GAMMA": 0.1, "MULTISTEPS": []},
        "OPTIMIZER": {"NAME": "adamw", "EPS": 1e-8, "BETAS": (0.9, 0.999), "MOMENTUM": 0.9},
        "LAYER_DECAY": 1.0,
    },
    "AMP_OPT_LEVEL": "", "OUTPUT": "", "TAG": "default", "SAVE_FREQ": 1, "PRINT_FREQ": 10, "SEED": 0,
    "EVAL_MODE": False, "THROUGHPUT_MODE": False, "LOCAL_RANK": 0, "PRETRAINED": "",
}

# The published pretraining recipes (the original YAMLs' overrides), plus tiny CPU-sized models.
PRESETS: Dict[str, Dict[str, Any]] = {
    "vit-base-224": {
        "MODEL": {"TYPE": "vit", "NAME": "simmim_pretrain", "DROP_PATH_RATE": 0.1,
                  "VIT": {"EMBED_DIM": 768, "DEPTH": 12, "NUM_HEADS": 12, "USE_APE": False, "USE_RPB": False,
                          "USE_SHARED_RPB": True, "USE_MEAN_POOLING": False}},
        "DATA": {"IMG_SIZE": 224, "MASK_PATCH_SIZE": 32, "MASK_RATIO": 0.6},
        "TRAIN": {"EPOCHS": 800, "WARMUP_EPOCHS": 10, "BASE_LR": 1e-4, "WARMUP_LR": 5e-7, "WEIGHT_DECAY": 0.05,
                  "LR_SCHEDULER": {"NAME": "multistep", "GAMMA": 0.1, "MULTISTEPS": [700]}},
        "PRINT_FREQ": 100, "SAVE_FREQ": 20, "TAG": "simmim_pretrain__vit_base__img224__800ep",
    },
    "swin-base-192-w6": {
        "MODEL": {"TYPE": "swin", "NAME": "simmim_pretrain", "DROP_PATH_RATE": 0.0,
                  "SWIN": {"EMBED_DIM": 128, "DEPTHS": [2, 2, 18, 2], "NUM_HEADS": [4, 8, 16, 32], "WINDOW_SIZE": 6}},
        "DATA": {"IMG_SIZE": 192, "MASK_PATCH_SIZE": 32, "MASK_RATIO": 0.6},
        "TRAIN": {"EPOCHS": 100, "WARMUP_EPOCHS": 10, "BASE_LR": 2e-4, "WARMUP_LR": 1e-6, "MIN_LR": 1e-5,
                  "WEIGHT_DECAY": 0.05},
        "PRINT_FREQ": 100, "SAVE_FREQ": 5, "TAG": "simmim_pretrain__swin_base__img192_window6__100ep",
    },
    "swin-large-192-w12": {
        "MODEL": {"TYPE": "swin", "NAME": "simmim_pretrain", "DROP_PATH_RATE": 0.0,
                  "SWIN": {"EMBED_DIM": 192, "DEPTHS": [2, 2, 18, 2], "NUM_HEADS": [6, 12, 24, 48], "WINDOW_SIZE": 12}},
        "DATA": {"IMG_SIZE": 192, "MASK_PATCH_SIZE": 32, "MASK_RATIO": 0.6},
        "TRAIN": {"EPOCHS": 800, "WARMUP_EPOCHS": 10, "BASE_LR": 1e-4, "WARMUP_LR": 5e-7, "WEIGHT_DECAY": 0.05,
                  "LR_SCHEDULER": {"NAME": "multistep", "GAMMA": 0.1, "MULTISTEPS": [700]}},
        "PRINT_FREQ": 100, "SAVE_FREQ": 5, "TAG": "simmim_pretrain__swin_large__img192_window12__800ep",
    },
    # Small enough to train on 2 CPU cores in minutes; same architecture families and code paths.
    "vit-tiny": {
        "MODEL": {"TYPE": "vit", "NAME": "simmim_vit_tiny", "DROP_PATH_RATE": 0.0,
                  "VIT": {"PATCH_SIZE": 8, "EMBED_DIM": 96, "DEPTH": 4, "NUM_HEADS": 3, "USE_APE": False,
                          "USE_SHARED_RPB": True, "USE_MEAN_POOLING": False}},
        "DATA": {"IMG_SIZE": 64, "MASK_PATCH_SIZE": 16, "MASK_RATIO": 0.6, "BATCH_SIZE": 32, "NUM_WORKERS": 2},
        "TRAIN": {"EPOCHS": 20, "WARMUP_EPOCHS": 1, "BASE_LR": 1.6e-2, "WARMUP_LR": 1e-5, "MIN_LR": 1e-5},
        "PRINT_FREQ": 10, "SAVE_FREQ": 5, "TAG": "vit_tiny",
    },
    "swin-tiny": {
        "MODEL": {"TYPE": "swin", "NAME": "simmim_swin_tiny", "DROP_PATH_RATE": 0.0,
                  "SWIN": {"PATCH_SIZE": 2, "EMBED_DIM": 32, "DEPTHS": [2, 2, 2, 2], "NUM_HEADS": [1, 2, 4, 8],
                           "WINDOW_SIZE": 4}},
        "DATA": {"IMG_SIZE": 64, "MASK_PATCH_SIZE": 16, "MASK_RATIO": 0.6, "BATCH_SIZE": 32, "NUM_WORKERS": 2},
        "TRAIN": {"EPOCHS": 10, "WARMUP_EPOCHS": 1, "BASE_LR": 2e-3, "WARMUP_LR": 1e-5, "MIN_LR": 1e-5},
        "PRINT_FREQ": 10, "SAVE_FREQ": 5, "TAG": "swin_tiny",
    },
}

class Config(dict):
    """A nested dict that also reads as attributes: ``cfg.MODEL.VIT.DEPTH``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}; keys: {', '.join(sorted(self))}") from None

    def __setattr__(self, name, value):
        self[name] = value

    def __deepcopy__(self, memo):
        return to_config(copy.deepcopy(dict(self), memo))

    def to_dict(self) -> Dict[str, Any]:
        return {key: value.to_dict() if isinstance(value, Config) else value for key, value in self.items()}


def to_config(tree: Mapping) -> Config:
    return Config({key: to_config(value) if isinstance(value, Mapping) else value for key, value in tree.items()})


def merge(base: Mapping, overrides: Mapping, path: str = "") -> Config:
    """``base`` updated by ``overrides``; a key that ``base`` lacks is a ValueError listing valid keys."""
    merged = to_config(copy.deepcopy(dict(base)))
    for key, value in overrides.items():
        where = f"{path}{key}"
        if key not in merged:
            raise ValueError(f"unknown config key {where!r}; valid keys here: {', '.join(sorted(merged))}")
        if isinstance(merged[key], Mapping):
            if not isinstance(value, Mapping):
                raise ValueError(f"config key {where!r} is a section; got {value!r}")
            merged[key] = merge(merged[key], value, where + ".")
        else:
            merged[key] = value
    return merged


def set_key(config: Config, dotted_key: str, value: Any) -> Config:
    """``set_key(cfg, "TRAIN.BASE_LR", 1e-4)``, with the same unknown-key error as ``merge``."""
    tree: Dict[str, Any] = {}
    node = tree
    *parents, leaf = dotted_key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return merge(config, tree)


def get_config(preset: Optional[str] = None, overrides: Iterable[Mapping] = ()) -> Config:
    """Defaults, then a preset, then each override mapping in order."""
    config = to_config(DEFAULTS)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        config = merge(config, PRESETS[preset])
    for override in overrides:
        config = merge(config, override)
    return config


def _read(config, dotted_key: str):
    node = config
    for part in dotted_key.split("."):
        node = node[part] if isinstance(node, Mapping) else getattr(node, part)
    return node


def build_encoder(config, classes: Optional[Mapping[str, type]] = None, num_classes: int = 0) -> nn.Module:
    """The SimMIM encoder of MODEL.TYPE; ``classes`` (by type) and ``num_classes`` build others from the
    same keys (fine-tuning's classifiers)."""
    classes = {"swin": SwinTransformerForSimMIM, "vit": VisionTransformerForSimMIM, **(classes or {})}
    model_type = _read(config, "MODEL.TYPE")
    img_size = _read(config, "DATA.IMG_SIZE")
    if model_type == "swin":
        swin = lambda key: _read(config, f"MODEL.SWIN.{key}")  # noqa: E731
        return classes["swin"](
            img_size=img_size, patch_size=swin("PATCH_SIZE"), in_chans=swin("IN_CHANS"), num_classes=num_classes,
            embed_dim=swin("EMBED_DIM"), depths=list(swin("DEPTHS")), num_heads=list(swin("NUM_HEADS")),
            window_size=swin("WINDOW_SIZE"), mlp_ratio=swin("MLP_RATIO"), qkv_bias=swin("QKV_BIAS"),
            qk_scale=swin("QK_SCALE"), drop_rate=_read(config, "MODEL.DROP_RATE"),
            drop_path_rate=_read(config, "MODEL.DROP_PATH_RATE"), ape=swin("APE"), patch_norm=swin("PATCH_NORM"),
            use_checkpoint=_read(config, "TRAIN.USE_CHECKPOINT"))
    if model_type == "vit":
        vit = lambda key: _read(config, f"MODEL.VIT.{key}")  # noqa: E731
        return classes["vit"](
            img_size=img_size, patch_size=vit("PATCH_SIZE"), in_chans=vit("IN_CHANS"), num_classes=num_classes,
            embed_dim=vit("EMBED_DIM"), depth=vit("DEPTH"), num_heads=vit("NUM_HEADS"), mlp_ratio=vit("MLP_RATIO"),
            qkv_bias=vit("QKV_BIAS"), drop_rate=_read(config, "MODEL.DROP_RATE"),
            drop_path_rate=_read(config, "MODEL.DROP_PATH_RATE"), norm_layer=vit_norm_layer(1e-6),
            init_values=vit("INIT_VALUES"), use_abs_pos_emb=vit("USE_APE"), use_rel_pos_bias=vit("USE_RPB"),
            use_shared_rel_pos_bias=vit("USE_SHARED_RPB"), use_mean_pooling=vit("USE_MEAN_POOLING"))
    raise ValueError(f"MODEL.TYPE must be 'vit' or 'swin', got {model_type!r}")


def encoder_stride(encoder: nn.Module) -> int:
    """Pixels per output feature: the patch size for ViT, patch size x 2^(stages-1) for Swin (the
    original hard-codes 16 and 32, which is what this gives for the published recipes)."""
    return encoder.patch_size * 2 ** (getattr(encoder, "num_layers", 1) - 1)


def build_simmim(config) -> SimMIM:
    """The original ``build_simmim``: encoder from the config; stride 16 for ViT-B/16, 32 for Swin.

    ``config`` may also be a preset name (``build_simmim("vit-base-224")``).
    """
    if isinstance(config, str):
        config = get_config(config)
    encoder = build_encoder(config)
    return SimMIM(encoder=encoder, encoder_stride=encoder_stride(encoder))
