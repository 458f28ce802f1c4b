"""``simmim-fast export``: a pretraining or fine-tuning checkpoint as ``model.safetensors`` + ``config.json``
in the layout of timm (``beit_*`` with the shared or per-block bias, ``swin_*``) or Hugging Face
transformers (``BeitModel``/``BeitForImageClassification``, ``SwinModel``/``SwinForImageClassification``,
the transformers 5 parameter names). A checkpoint with a classification head exports the classifier;
a pretraining one the encoder alone. tests/test_downstream_export.py loads each into the real classes
with strict key matching and compares their features with ours.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..train.data import IMAGENET_MEAN, IMAGENET_STD
from .data import EVAL_RESIZE_RATIO
from .probe import model_from_checkpoint

FORMATS = ("timm", "transformers")
# transformers 5 names, by prefix: inside a block / elsewhere (the fused qkv and the head aside).
BEIT_BLOCK_NAMES = {"gamma_1": "lambda_1", "gamma_2": "lambda_2", "norm1.": "layernorm_before.",
                    "norm2.": "layernorm_after.", "attn.proj.": "attention.o_proj.", "mlp.": "mlp.",
                    "attn.q_bias": "attention.q_proj.bias", "attn.v_bias": "attention.v_proj.bias",
                    "attn.relative_position_bias_table": "relative_position_bias.relative_position_bias_table"}
BEIT_OTHER_NAMES = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
                    "patch_embed.proj.": "embeddings.patch_embeddings.projection.",
                    "rel_pos_bias.": "shared_position_bias.", "norm.": "layernorm.", "fc_norm.": "pooler.layernorm."}
SWIN_BLOCK_NAMES = {"norm1.": "layernorm_before.", "norm2.": "layernorm_after.", "attn.proj.": "attention.o_proj.",
                    "mlp.": "mlp.", "attn.relative_position_bias_table":
                    "attention.relative_position_bias.relative_position_bias_table"}
SWIN_OTHER_NAMES = {"patch_embed.proj.": "embeddings.patch_embeddings.projection.",
                    "patch_embed.norm.": "embeddings.norm.", "norm.": "layernorm.", "layers.": "encoder.layers."}


def _without_derived(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if not key.endswith(("relative_position_index", "attn_mask"))}


def timm_layout(model, config) -> Tuple[Dict[str, torch.Tensor], dict]:
    state, num_classes = _without_derived(model.state_dict()), getattr(model, "num_classes", 0)
    size = config.DATA.IMG_SIZE
    if config.MODEL.TYPE == "vit":
        vit = config.MODEL.VIT
        args = {"img_size": size, "patch_size": vit.PATCH_SIZE, "embed_dim": vit.EMBED_DIM, "depth": vit.DEPTH,
                "num_heads": vit.NUM_HEADS, "mlp_ratio": float(vit.MLP_RATIO), "qkv_bias": vit.QKV_BIAS,
                "init_values": vit.INIT_VALUES, "use_abs_pos_emb": vit.USE_APE, "use_rel_pos_bias": vit.USE_RPB,
                "use_shared_rel_pos_bias": vit.USE_SHARED_RPB,
                "global_pool": "avg" if vit.USE_MEAN_POOLING else "token",
                "num_classes": num_classes}
        architecture = "beit_base_patch16_224"
    else:
        swin = config.MODEL.SWIN
        if swin.APE or not swin.PATCH_NORM:
            raise ValueError("timm's Swin has no absolute position embedding and always a patch norm; "
                             "this model (MODEL.SWIN.APE / PATCH_NORM) has no timm equivalent")
        # timm keeps a stage's patch merging at the start of the next stage, and the head as head.fc.
        state = {re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
                 .replace("head.", "head.fc.", 1) if key.startswith(("layers.", "head.")) else key: value
                 for key, value in state.items()}
        args = {"img_size": size, "patch_size": swin.PATCH_SIZE, "embed_dim": swin.EMBED_DIM,
                "depths": list(swin.DEPTHS), "num_heads": list(swin.NUM_HEADS), "window_size": swin.WINDOW_SIZE,
                "mlp_ratio": float(swin.MLP_RATIO), "qkv_bias": swin.QKV_BIAS, "num_classes": num_classes}
        architecture = "swin_base_patch4_window7_224"
    config_json = {"architecture": architecture, "num_classes": num_classes, "model_args": args,
                   "pretrained_cfg": {"input_size": [3, size, size], "interpolation": "bicubic",
                                      "crop_pct": 1 / EVAL_RESIZE_RATIO, "mean": list(IMAGENET_MEAN),
                                      "std": list(IMAGENET_STD), "num_classes": num_classes}}
    return state, config_json


def _renamed(state: Dict[str, torch.Tensor], base: str, block_pattern: str, block_prefix: str,
             block_names: Dict[str, str], other_names: Dict[str, str]) -> Dict[str, torch.Tensor]:
    """``state`` renamed by prefix tables (inside blocks / elsewhere), under ``base``; a block's fused
    qkv (weight and bias) split into q_proj/k_proj/v_proj; the head becomes ``classifier``."""
    out = {}
    for key, value in state.items():
        if key.startswith("head."):
            out["classifier." + key[len("head."):]] = value
            continue
        match = re.match(block_pattern, key)
        if match is None:
            prefix, rest, names = base, key, other_names
        else:
            prefix, rest, names = base + block_prefix.format(*match.groups()[:-1]), match.groups()[-1], block_names
        if rest.startswith("attn.qkv."):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}attention.{name}.{rest.rsplit('.', 1)[1]}"] = part
            continue
        old = next(old for old in names if rest.startswith(old))
        out[prefix + names[old] + rest[len(old):]] = value
    return out


def transformers_layout(model, config, classes: Optional[List[str]] = None) -> Tuple[Dict[str, torch.Tensor], dict]:
    state, num_classes = _without_derived(model.state_dict()), getattr(model, "num_classes", 0)
    classify = num_classes > 0
    size = config.DATA.IMG_SIZE
    if config.MODEL.TYPE == "vit":
        vit = config.MODEL.VIT
        out = _renamed(state, "beit." if classify else "", r"^blocks\.(\d+)\.(.*)$", "layers.{}.", BEIT_BLOCK_NAMES,
                       BEIT_OTHER_NAMES)
        hf_config = {"model_type": "beit", "architectures": ["BeitForImageClassification" if classify else "BeitModel"],
                     "image_size": size, "patch_size": vit.PATCH_SIZE, "num_channels": vit.IN_CHANS,
                     "hidden_size": vit.EMBED_DIM, "num_hidden_layers": vit.DEPTH, "num_attention_heads": vit.NUM_HEADS,
                     "intermediate_size": int(vit.EMBED_DIM * vit.MLP_RATIO), "hidden_act": "gelu",
                     "layer_norm_eps": 1e-6, "layer_scale_init_value": vit.INIT_VALUES or 0.0,
                     "use_absolute_position_embeddings": vit.USE_APE, "use_relative_position_bias": vit.USE_RPB,
                     "use_shared_relative_position_bias": vit.USE_SHARED_RPB, "use_mean_pooling": vit.USE_MEAN_POOLING,
                     "use_mask_token": False}
        if not vit.QKV_BIAS:
            raise ValueError("transformers' BEiT always has q/v biases; this model (MODEL.VIT.QKV_BIAS=False) has none")
    else:
        swin = config.MODEL.SWIN
        if swin.APE:
            raise ValueError("transformers' Swin position embeddings include an extra token; MODEL.SWIN.APE models "
                             "are not exported")
        out = _renamed(state, "swin." if classify else "", r"^layers\.(\d+)\.blocks\.(\d+)\.(.*)$",
                       "encoder.layers.{}.blocks.{}.", SWIN_BLOCK_NAMES, SWIN_OTHER_NAMES)
        hf_config = {"model_type": "swin", "architectures": ["SwinForImageClassification" if classify else "SwinModel"],
                     "image_size": size, "patch_size": swin.PATCH_SIZE, "num_channels": swin.IN_CHANS,
                     "embed_dim": swin.EMBED_DIM, "depths": list(swin.DEPTHS), "num_heads": list(swin.NUM_HEADS),
                     "window_size": swin.WINDOW_SIZE, "mlp_ratio": float(swin.MLP_RATIO), "qkv_bias": swin.QKV_BIAS,
                     "hidden_act": "gelu", "use_absolute_embeddings": False, "layer_norm_eps": 1e-5}
    if classify:
        names = classes if classes and len(classes) == num_classes else [str(index) for index in range(num_classes)]
        hf_config["id2label"] = {str(index): name for index, name in enumerate(names)}
        hf_config["label2id"] = {name: index for index, name in enumerate(names)}
    return {key: value.contiguous() for key, value in out.items()}, hf_config


def export_checkpoint(checkpoint: str, fmt: str, out: str, preset: Optional[str] = None,
                      config_file: Optional[str] = None, trust: bool = False) -> Path:
    """Write ``out/model.safetensors`` and ``out/config.json``; returns ``out``."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ValueError("export writes safetensors: pip install safetensors") from None
    model, config, classes = model_from_checkpoint(checkpoint, preset, config_file, trust, with_head=True)
    state, config_json = timm_layout(model, config) if fmt == "timm" else transformers_layout(model, config, classes)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({key: value.detach().contiguous() for key, value in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt", "source": str(checkpoint)})
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))
    return folder
