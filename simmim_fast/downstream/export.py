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
from typing import Dict, Optional, Tuple

import torch

from ..train.data import IMAGENET_MEAN, IMAGENET_STD
from .data import EVAL_RESIZE_RATIO
from .probe import encoder_from_checkpoint

FORMATS = ("timm", "transformers")
SWIN_OUTSIDE_BLOCKS = {"patch_embed.proj.": "embeddings.patch_embeddings.projection.",
                       "patch_embed.norm.": "embeddings.norm.", "norm.": "layernorm.", "layers.": "encoder.layers."}


def _classifier_from(checkpoint: str, preset, config_file, trust):
    """(model with the checkpoint's head if it has one, config)."""
    from .finetune import read_pretrained
    from .models import build_classifier, load_into

    model, config = encoder_from_checkpoint(checkpoint, preset, config_file, trust)
    state = read_pretrained(checkpoint, trust)["model"]
    if "head.weight" in state:
        model = build_classifier(config, state["head.weight"].shape[0])
        load_into(model, state)
    return model.eval(), config


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
                "use_shared_rel_pos_bias": vit.USE_SHARED_RPB, "global_pool": "avg" if vit.USE_MEAN_POOLING else "token",
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


def _split_qkv(weight: torch.Tensor):
    return weight.chunk(3, dim=0)


def transformers_layout(model, config) -> Tuple[Dict[str, torch.Tensor], dict]:
    state, num_classes = _without_derived(model.state_dict()), getattr(model, "num_classes", 0)
    classify = num_classes > 0
    out: Dict[str, torch.Tensor] = {}
    size = config.DATA.IMG_SIZE
    if config.MODEL.TYPE == "vit":
        vit = config.MODEL.VIT
        base = "beit." if classify else ""
        rename = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
                  "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
                  "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
                  "rel_pos_bias.relative_position_bias_table": "shared_position_bias.relative_position_bias_table",
                  "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias",
                  "fc_norm.weight": "pooler.layernorm.weight", "fc_norm.bias": "pooler.layernorm.bias"}
        block_rename = {"gamma_1": "lambda_1", "gamma_2": "lambda_2", "norm1.": "layernorm_before.",
                        "norm2.": "layernorm_after.", "attn.proj.": "attention.o_proj.", "mlp.": "mlp.",
                        "attn.q_bias": "attention.q_proj.bias", "attn.v_bias": "attention.v_proj.bias",
                        "attn.relative_position_bias_table": "relative_position_bias.relative_position_bias_table"}
        for key, value in state.items():
            match = re.match(r"^blocks\.(\d+)\.(.*)$", key)
            if match is None:
                if key.startswith("head."):
                    out[key.replace("head.", "classifier.", 1)] = value
                else:
                    out[base + rename[key]] = value
                continue
            prefix, rest = f"{base}layers.{match.group(1)}.", match.group(2)
            if rest == "attn.qkv.weight":
                for name, part in zip(("q_proj", "k_proj", "v_proj"), _split_qkv(value)):
                    out[f"{prefix}attention.{name}.weight"] = part
                continue
            old = next(old for old in block_rename if rest.startswith(old))
            out[prefix + block_rename[old] + rest[len(old):]] = value
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
        base = "swin." if classify else ""
        block_rename = {"norm1.": "layernorm_before.", "norm2.": "layernorm_after.", "attn.proj.": "attention.o_proj.",
                        "mlp.": "mlp.", "attn.relative_position_bias_table":
                        "attention.relative_position_bias.relative_position_bias_table"}
        for key, value in state.items():
            match = re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.(.*)$", key)
            if match is None:
                if key.startswith("head."):
                    out[key.replace("head.", "classifier.", 1)] = value
                else:
                    old = next(old for old in SWIN_OUTSIDE_BLOCKS if key.startswith(old))
                    out[base + SWIN_OUTSIDE_BLOCKS[old] + key[len(old):]] = value
                continue
            prefix, rest = f"{base}encoder.layers.{match.group(1)}.blocks.{match.group(2)}.", match.group(3)
            if rest.startswith("attn.qkv."):
                for name, part in zip(("q_proj", "k_proj", "v_proj"), _split_qkv(value)):
                    out[f"{prefix}attention.{name}.{rest.rsplit('.', 1)[1]}"] = part
                continue
            old = next(old for old in block_rename if rest.startswith(old))
            out[prefix + block_rename[old] + rest[len(old):]] = value
        hf_config = {"model_type": "swin", "architectures": ["SwinForImageClassification" if classify else "SwinModel"],
                     "image_size": size, "patch_size": swin.PATCH_SIZE, "num_channels": swin.IN_CHANS,
                     "embed_dim": swin.EMBED_DIM, "depths": list(swin.DEPTHS), "num_heads": list(swin.NUM_HEADS),
                     "window_size": swin.WINDOW_SIZE, "mlp_ratio": float(swin.MLP_RATIO), "qkv_bias": swin.QKV_BIAS,
                     "hidden_act": "gelu", "use_absolute_embeddings": False, "layer_norm_eps": 1e-5}
    if classify:
        hf_config["id2label"] = {str(index): str(index) for index in range(num_classes)}
        hf_config["label2id"] = {str(index): index for index in range(num_classes)}
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
    model, config = _classifier_from(checkpoint, preset, config_file, trust)
    state, config_json = (timm_layout if fmt == "timm" else transformers_layout)(model, config)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({key: value.detach().contiguous() for key, value in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt", "source": str(checkpoint)})
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))
    return folder
