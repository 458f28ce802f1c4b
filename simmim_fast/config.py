"""The original SimMIM config layout (MODEL / DATA / TRAIN ...), presets for the published recipes,
and ``build_simmim(config)``.

A config is a nested dict or any attribute object (yacs CfgNode, SimpleNamespace), complete or a partial
override of the defaults (as the original YAML files are); ``Config`` is ours: a dict that also reads as
attributes. Unknown keys are errors that list the valid ones; a value of another type than the default's
is a "type mismatch" error, as in the original's yacs.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Union

import torch.nn as nn

from ._checks import require
from .models import SimMIM
from .models.registry import build_encoder

# The original config.py defaults (the pretraining part), same names and values.
DEFAULTS: Dict[str, Any] = {
    "DATA": {
        "BATCH_SIZE": 128, "DATA_PATH": "", "DATASET": "imagenet", "IMG_SIZE": 224, "INTERPOLATION": "bicubic",
        "PIN_MEMORY": True, "NUM_WORKERS": 8, "MASK_PATCH_SIZE": 32, "MASK_RATIO": 0.6,
        # Ours (simmim_fast.masking): random (the original), patch, block, grid; MASK_RATIO_END set: the
        # ratio moves linearly from MASK_RATIO at the first epoch to MASK_RATIO_END at the last.
        "MASK_STRATEGY": "random", "MASK_RATIO_END": None,
        # Ours (simmim_fast.train.gpu_decode): where pretraining decodes JPEGs: cpu, gpu or auto.
        "DECODE": "cpu",
    },
    "MODEL": {
        "TYPE": "swin", "NAME": "swin_tiny_patch4_window7_224", "RESUME": "", "NUM_CLASSES": 1000,
        "DROP_RATE": 0.0, "DROP_PATH_RATE": 0.1, "LABEL_SMOOTHING": 0.1,
        "SWIN": {
            "PATCH_SIZE": 4, "IN_CHANS": 3, "EMBED_DIM": 96, "DEPTHS": [2, 2, 6, 2], "NUM_HEADS": [3, 6, 12, 24],
            "WINDOW_SIZE": 7, "MLP_RATIO": 4.0, "QKV_BIAS": True, "QK_SCALE": None, "APE": False, "PATCH_NORM": True,
        },
        "VIT": {
            "PATCH_SIZE": 16, "IN_CHANS": 3, "EMBED_DIM": 768, "DEPTH": 12, "NUM_HEADS": 12, "MLP_RATIO": 4.0,
            "QKV_BIAS": True, "INIT_VALUES": 0.1, "USE_APE": False, "USE_RPB": False, "USE_SHARED_RPB": True,
            "USE_MEAN_POOLING": False,
        },
        # The successor's (microsoft/Swin-Transformer config.py) Swin V2 section and SimMIM options.
        "SWINV2": {
            "PATCH_SIZE": 4, "IN_CHANS": 3, "EMBED_DIM": 96, "DEPTHS": [2, 2, 6, 2], "NUM_HEADS": [3, 6, 12, 24],
            "WINDOW_SIZE": 7, "MLP_RATIO": 4.0, "QKV_BIAS": True, "APE": False, "PATCH_NORM": True,
            "PRETRAINED_WINDOW_SIZES": [0, 0, 0, 0],
        },
        "SIMMIM": {"NORM_TARGET": {"ENABLE": False, "PATCH_SIZE": 47}},
        # ConvNeXt (facebookresearch/ConvNeXt's constructor arguments); ConvNeXt-T by default.
        "CONVNEXT": {"IN_CHANS": 3, "DEPTHS": [3, 3, 9, 3], "DIMS": [96, 192, 384, 768],
                     "LAYER_SCALE_INIT_VALUE": 1e-6},
    },
    "TRAIN": {
        "START_EPOCH": 0, "EPOCHS": 300, "WARMUP_EPOCHS": 20, "WEIGHT_DECAY": 0.05, "BASE_LR": 5e-4,
        "WARMUP_LR": 5e-7, "MIN_LR": 5e-6, "CLIP_GRAD": 5.0, "AUTO_RESUME": True, "ACCUMULATION_STEPS": 0,
        "USE_CHECKPOINT": False,
        "LR_SCHEDULER": {"NAME": "cosine", "DECAY_EPOCHS": 30, "DECAY_RATE": 0.1, "GAMMA": 0.1, "MULTISTEPS": []},
        "OPTIMIZER": {"NAME": "adamw", "EPS": 1e-8, "BETAS": (0.9, 0.999), "MOMENTUM": 0.9},
        "LAYER_DECAY": 1.0,
        # Ours: with accumulation, the original clips the running gradient sum after every micro-batch's
        # backward (main_simmim.py and main_finetune.py); pretraining here clips once per optimizer step,
        # the fine-tuning recipe (downstream.finetune) as the original.
        "CLIP_EACH_MICRO_BATCH": False,
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
        "PRINT_FREQ": 100, "SAVE_FREQ": 5, "TAG": "simmim_pretrain__vit_base__img224__800ep",
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
    # The successor's simmim_pretrain__swinv2_base__img192_window12__800ep.yaml.
    "swinv2-base-192-w12": {
        "MODEL": {"TYPE": "swinv2", "NAME": "simmim_pretrain", "DROP_PATH_RATE": 0.1,
                  "SIMMIM": {"NORM_TARGET": {"ENABLE": True, "PATCH_SIZE": 47}},
                  "SWINV2": {"EMBED_DIM": 128, "DEPTHS": [2, 2, 18, 2], "NUM_HEADS": [4, 8, 16, 32],
                             "WINDOW_SIZE": 12}},
        "DATA": {"IMG_SIZE": 192, "MASK_PATCH_SIZE": 32, "MASK_RATIO": 0.6},
        "TRAIN": {"EPOCHS": 800, "WARMUP_EPOCHS": 10, "BASE_LR": 1e-4, "WARMUP_LR": 5e-7, "WEIGHT_DECAY": 0.05,
                  "LR_SCHEDULER": {"NAME": "multistep", "GAMMA": 0.1, "MULTISTEPS": [700]}},
        "PRINT_FREQ": 100, "SAVE_FREQ": 5, "TAG": "simmim_pretrain__swinv2_base__img192_window12__800ep",
    },
    # BEiT's ViT-L/16 and ViT-H/14 (the published widths and depths) in the ViT-B recipe; /14 masks 28px cells.
    "vit-large-224": {
        "MODEL": {"TYPE": "vit", "NAME": "simmim_pretrain", "DROP_PATH_RATE": 0.1,
                  "VIT": {"PATCH_SIZE": 16, "EMBED_DIM": 1024, "DEPTH": 24, "NUM_HEADS": 16, "USE_APE": False,
                          "USE_RPB": False, "USE_SHARED_RPB": True, "USE_MEAN_POOLING": False}},
        "DATA": {"IMG_SIZE": 224, "MASK_PATCH_SIZE": 32, "MASK_RATIO": 0.6},
        "TRAIN": {"EPOCHS": 800, "WARMUP_EPOCHS": 10, "BASE_LR": 1e-4, "WARMUP_LR": 5e-7, "WEIGHT_DECAY": 0.05,
                  "LR_SCHEDULER": {"NAME": "multistep", "GAMMA": 0.1, "MULTISTEPS": [700]}},
        "PRINT_FREQ": 100, "SAVE_FREQ": 20, "TAG": "simmim_pretrain__vit_large__img224__800ep",
    },
    "vit-huge-224": {
        "MODEL": {"TYPE": "vit", "NAME": "simmim_pretrain", "DROP_PATH_RATE": 0.1,
                  "VIT": {"PATCH_SIZE": 14, "EMBED_DIM": 1280, "DEPTH": 32, "NUM_HEADS": 16, "USE_APE": False,
                          "USE_RPB": False, "USE_SHARED_RPB": True, "USE_MEAN_POOLING": False}},
        "DATA": {"IMG_SIZE": 224, "MASK_PATCH_SIZE": 28, "MASK_RATIO": 0.6},
        "TRAIN": {"EPOCHS": 800, "WARMUP_EPOCHS": 10, "BASE_LR": 1e-4, "WARMUP_LR": 5e-7, "WEIGHT_DECAY": 0.05,
                  "LR_SCHEDULER": {"NAME": "multistep", "GAMMA": 0.1, "MULTISTEPS": [700]}},
        "PRINT_FREQ": 100, "SAVE_FREQ": 20, "TAG": "simmim_pretrain__vit_huge__img224__800ep",
    },
    # ConvNeXt-T and -B (the published depths and widths) in the Swin-B SimMIM recipe (192 px, 32 px cells).
    "convnext-t-192": {
        "MODEL": {"TYPE": "convnext", "NAME": "simmim_pretrain", "DROP_PATH_RATE": 0.1,
                  "CONVNEXT": {"DEPTHS": [3, 3, 9, 3], "DIMS": [96, 192, 384, 768]}},
        "DATA": {"IMG_SIZE": 192, "MASK_PATCH_SIZE": 32, "MASK_RATIO": 0.6},
        "TRAIN": {"EPOCHS": 100, "WARMUP_EPOCHS": 10, "BASE_LR": 2e-4, "WARMUP_LR": 1e-6, "MIN_LR": 1e-5,
                  "WEIGHT_DECAY": 0.05},
        "PRINT_FREQ": 100, "SAVE_FREQ": 5, "TAG": "simmim_pretrain__convnext_tiny__img192__100ep",
    },
    "convnext-b-192": {
        "MODEL": {"TYPE": "convnext", "NAME": "simmim_pretrain", "DROP_PATH_RATE": 0.1,
                  "CONVNEXT": {"DEPTHS": [3, 3, 27, 3], "DIMS": [128, 256, 512, 1024]}},
        "DATA": {"IMG_SIZE": 192, "MASK_PATCH_SIZE": 32, "MASK_RATIO": 0.6},
        "TRAIN": {"EPOCHS": 100, "WARMUP_EPOCHS": 10, "BASE_LR": 2e-4, "WARMUP_LR": 1e-6, "MIN_LR": 1e-5,
                  "WEIGHT_DECAY": 0.05},
        "PRINT_FREQ": 100, "SAVE_FREQ": 5, "TAG": "simmim_pretrain__convnext_base__img192__100ep",
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
    "swinv2-tiny": {
        "MODEL": {"TYPE": "swinv2", "NAME": "simmim_swinv2_tiny", "DROP_PATH_RATE": 0.0,
                  "SIMMIM": {"NORM_TARGET": {"ENABLE": True, "PATCH_SIZE": 15}},
                  "SWINV2": {"PATCH_SIZE": 2, "EMBED_DIM": 32, "DEPTHS": [2, 2, 2, 2], "NUM_HEADS": [1, 2, 4, 8],
                             "WINDOW_SIZE": 4}},
        "DATA": {"IMG_SIZE": 64, "MASK_PATCH_SIZE": 16, "MASK_RATIO": 0.6, "BATCH_SIZE": 32, "NUM_WORKERS": 2},
        "TRAIN": {"EPOCHS": 10, "WARMUP_EPOCHS": 1, "BASE_LR": 2e-3, "WARMUP_LR": 1e-5, "MIN_LR": 1e-5},
        "PRINT_FREQ": 10, "SAVE_FREQ": 5, "TAG": "swinv2_tiny",
    },
    "convnext-tiny": {
        "MODEL": {"TYPE": "convnext", "NAME": "simmim_convnext_tiny", "DROP_PATH_RATE": 0.0,
                  "CONVNEXT": {"DEPTHS": [1, 1, 2, 1], "DIMS": [32, 64, 128, 256]}},
        "DATA": {"IMG_SIZE": 64, "MASK_PATCH_SIZE": 16, "MASK_RATIO": 0.6, "BATCH_SIZE": 32, "NUM_WORKERS": 2},
        "TRAIN": {"EPOCHS": 10, "WARMUP_EPOCHS": 1, "BASE_LR": 2e-3, "WARMUP_LR": 1e-5, "MIN_LR": 1e-5},
        "PRINT_FREQ": 10, "SAVE_FREQ": 5, "TAG": "convnext_tiny",
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


def _type_name(value: Any) -> str:
    return type(value).__name__


def checked_value(default: Any, value: Any, where: str) -> Any:
    """``value`` for a key whose default is ``default``: the same type (an int for a float widens, a
    list and a tuple are interchangeable, None goes either way as in yacs), else a ValueError."""
    if default is None or value is None:  # e.g. QK_SCALE (None: the default scale), INIT_VALUES=None (off)
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        matches = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float) and isinstance(value, int):
        return float(value)
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        if default:  # the elements must match the default's elements (DEPTHS=[2, 'a'] is refused)
            value = [checked_value(default[0], item, f"{where}[{index}]") for index, item in enumerate(value)]
        return type(default)(value)
    else:
        matches = type(value) is type(default)
    if not matches:
        raise ValueError(f"type mismatch for config key {where!r}: expected {_type_name(default)} "
                         f"(like the default {default!r}), got {_type_name(value)} {value!r}")
    return value


def merge(base: Mapping, overrides: Mapping, path: str = "") -> Config:
    """``base`` updated by ``overrides``; a key that ``base`` lacks or a value of another type than
    ``base``'s is a ValueError naming the key and what is allowed."""
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
            merged[key] = checked_value(merged[key], value, where)
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


# ---- hyperparameter ranges: one table for pretrain, finetune and eval, checked before a run writes anything ----

@dataclass(frozen=True)
class Range:
    """What a config value may be: ``accepts(value)``, described as ``expected`` in the error."""

    accepts: Callable[[Any], bool]
    expected: str


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def count(minimum: int) -> Range:
    return Range(lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
                 f"an integer >= {minimum}")


def interval(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> Range:
    """A number between ``low`` and ``high`` (either end open or closed)."""
    def accepts(value):
        return (_is_number(value) and (low < value if low_open else low <= value)
                and (value < high if high_open else value <= high))

    if high == math.inf:
        return Range(accepts, f"a number {'>' if low_open else '>='} {low:g}")
    return Range(accepts, f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")


def optional(allowed: Range, meaning: str) -> Range:
    """``allowed``, or None (which means ``meaning``)."""
    return Range(lambda value: value is None or allowed.accepts(value), f"None ({meaning}) or {allowed.expected}")


def each(allowed: Range, length: Optional[int] = None) -> Range:
    """A list (of ``length`` items, if given) whose every item is ``allowed``."""
    items = f"{length} " if length is not None else ""
    return Range(lambda value: isinstance(value, (list, tuple)) and (length is None or len(value) == length)
                 and all(allowed.accepts(item) for item in value), f"a list of {items}items each {allowed.expected}")


FRACTION = interval(0.0, 1.0, high_open=True)        # dropout-like: 1 would drop everything
PROBABILITY = interval(0.0, 1.0)
MASK_RATIO = interval(0.0, 1.0, low_open=True)       # the loss is over masked patches: 0 trains on nothing
NON_NEGATIVE = interval(0.0)

# Every numeric key the training and evaluation code reads. Keys a config lacks (AUG and TEST outside
# fine-tuning) are skipped; every float anywhere must also be finite (``check_hyperparameters``).
HYPERPARAMETERS: Dict[str, Range] = {
    "DATA.IMG_SIZE": count(1), "DATA.BATCH_SIZE": count(1), "DATA.NUM_WORKERS": count(0),
    "DATA.MASK_PATCH_SIZE": count(1), "DATA.MASK_RATIO": MASK_RATIO,
    "DATA.MASK_RATIO_END": optional(MASK_RATIO, "a fixed ratio"),
    "MODEL.DROP_RATE": FRACTION, "MODEL.DROP_PATH_RATE": FRACTION, "MODEL.LABEL_SMOOTHING": FRACTION,
    "TRAIN.EPOCHS": count(1), "TRAIN.WARMUP_EPOCHS": count(0), "TRAIN.ACCUMULATION_STEPS": count(0),
    "TRAIN.BASE_LR": NON_NEGATIVE, "TRAIN.WARMUP_LR": NON_NEGATIVE, "TRAIN.MIN_LR": NON_NEGATIVE,
    "TRAIN.WEIGHT_DECAY": NON_NEGATIVE,
    # The original clips only when CLIP_GRAD is truthy; a negative max norm would flip every gradient.
    "TRAIN.CLIP_GRAD": Range(lambda value: value is None or value == 0 or _is_number(value) and value > 0,
                             "a max norm > 0, or 0 / None for no clipping"),
    "TRAIN.LAYER_DECAY": interval(0.0, 1.0, low_open=True),
    "TRAIN.LR_SCHEDULER.DECAY_EPOCHS": count(1), "TRAIN.LR_SCHEDULER.DECAY_RATE": NON_NEGATIVE,
    "TRAIN.LR_SCHEDULER.GAMMA": NON_NEGATIVE, "TRAIN.LR_SCHEDULER.MULTISTEPS": each(count(0)),
    "TRAIN.OPTIMIZER.EPS": interval(0.0, low_open=True), "TRAIN.OPTIMIZER.BETAS": each(FRACTION, 2),
    "TRAIN.OPTIMIZER.MOMENTUM": FRACTION,
    "SAVE_FREQ": count(1), "PRINT_FREQ": count(1),
    "AUG.COLOR_JITTER": NON_NEGATIVE, "AUG.REPROB": PROBABILITY, "AUG.RECOUNT": count(1),
    "AUG.MIXUP": NON_NEGATIVE, "AUG.CUTMIX": NON_NEGATIVE, "AUG.MIXUP_PROB": PROBABILITY,
    "AUG.MIXUP_SWITCH_PROB": PROBABILITY,
    "AUG.CUTMIX_MINMAX": optional(each(interval(0.0, 1.0, low_open=True), 2), "CutMix by alpha"),
}


def _leaves(tree: Mapping, path: str = ""):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, f"{path}{key}.")
        else:
            yield f"{path}{key}", value


def _is_finite(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_finite(item) for item in value)
    return not isinstance(value, float) or math.isfinite(value)


def check_hyperparameters(config: Mapping, masked: bool = True, given: Optional[Mapping[str, str]] = None) -> None:
    """ValueError naming the first config key out of its range (``HYPERPARAMETERS``), with its value as
    the user gave it: its text in ``given`` (key -> the text of ``--set KEY=TEXT``), else as the config
    holds it, never a batch-scaled one. ``masked``: the run draws SimMIM masks (pretraining), so the image
    must split into mask patches."""
    leaves = dict(_leaves(config))

    def shown(key: str) -> str:
        return (given or {}).get(key) or repr(leaves[key])

    for key, value in leaves.items():
        require(_is_finite(value), lambda: f"{key} must "
                f"{'hold only finite numbers' if isinstance(value, (list, tuple)) else 'be a finite number'}, "
                f"got {shown(key)}")
    for key, allowed in HYPERPARAMETERS.items():
        if key in leaves:
            require(allowed.accepts(leaves[key]), lambda: f"{key} must be {allowed.expected}, got {shown(key)}")
    require(leaves["TRAIN.MIN_LR"] <= leaves["TRAIN.BASE_LR"],
            lambda: f"TRAIN.MIN_LR {shown('TRAIN.MIN_LR')} must not exceed TRAIN.BASE_LR {shown('TRAIN.BASE_LR')}")
    if masked:
        require(leaves["DATA.IMG_SIZE"] % leaves["DATA.MASK_PATCH_SIZE"] == 0,
                lambda: f"DATA.IMG_SIZE {shown('DATA.IMG_SIZE')} must be a multiple of DATA.MASK_PATCH_SIZE "
                        f"{shown('DATA.MASK_PATCH_SIZE')}")


# Sections of the original's full config that do not shape the model (its fine-tuning augmentations and
# test crop, and the list of base files): a complete original config passes build_simmim with them.
_ORIGINAL_SECTIONS_OUTSIDE_THE_MODEL = ("BASE", "AUG", "TEST")


def _as_tree(config: Any) -> Dict[str, Any]:
    """A mapping or an attribute object (yacs CfgNode, SimpleNamespace), as nested dicts."""
    if isinstance(config, Mapping):
        items = config.items()
    elif hasattr(config, "__dict__"):
        items = vars(config).items()
    else:
        raise ValueError(f"a config must be a mapping, an attribute object or a preset name "
                         f"({', '.join(PRESETS)}), got {_type_name(config)}")
    return {key: _as_tree(value) if isinstance(value, Mapping) or hasattr(value, "__dict__") else value
            for key, value in items}


def complete_config(config: Any) -> Config:
    """``config`` (complete, or a partial override like the original YAMLs) merged onto the defaults."""
    tree = _as_tree(config)
    for section in _ORIGINAL_SECTIONS_OUTSIDE_THE_MODEL:
        tree.pop(section, None)
    return merge(to_config(DEFAULTS), tree)


def encoder_stride(encoder: nn.Module) -> int:
    """Pixels per output feature: the patch size for ViT, patch size x 2^(stages-1) for Swin (the
    original hard-codes 16 and 32, which is what this gives for the published recipes)."""
    return encoder.patch_size * 2 ** (getattr(encoder, "num_layers", 1) - 1)


def build_simmim(config: Union[str, Mapping, Any]) -> SimMIM:
    """The original ``build_simmim``: the encoder registered for MODEL.TYPE (``models.registry``); stride
    16 for ViT-B/16, 32 for Swin; the successor's MODEL.SIMMIM.NORM_TARGET when the config has it.

    ``config`` is a preset name (``build_simmim("vit-base-224")``), or a nested config, complete or partial
    (missing keys take the defaults; a misspelled key is an "unknown config key" error).
    """
    config = get_config(config) if isinstance(config, str) else complete_config(config)
    encoder = build_encoder(config)
    return SimMIM(encoder=encoder, encoder_stride=encoder_stride(encoder),
                  norm_target_patch_size=norm_target_patch_size(config))


def norm_target_patch_size(config: Config) -> Optional[int]:
    """MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE when enabled, else None (the original's configs leave it off)."""
    norm_target = config.MODEL.SIMMIM.NORM_TARGET
    return norm_target.PATCH_SIZE if norm_target.ENABLE else None
