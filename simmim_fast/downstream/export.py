"""``simmim-fast export``: a pretraining or fine-tuning checkpoint as ``model.safetensors`` + ``config.json``
(+ ``preprocessor_config.json`` for transformers, + ``layer_decay.json``) in the layout of timm
(``beit_*`` with the shared or per-block bias, ``swin_*``, ``swinv2_*``, ``convnext_*``) or Hugging Face
transformers (``Beit``/``Swin``/``Swinv2``/``ConvNext`` ``Model`` or ``ForImageClassification``, the
parameter names of transformers 5). A checkpoint with a classification head exports the classifier; a
pretraining one the encoder alone. The folder is written atomically as a whole
(``checkpoint.write_folder_atomic``). tests/test_downstream_libraries.py loads each into the real classes
with strict key matching and compares their features with ours.

``layer_decay.json`` gives every exported parameter its layer (our fine-tuning's layer-decay rule, which
the exported names no longer reveal) and whether it takes weight decay: ``transfer.param_groups`` reads
it to build AdamW groups for the exported model, or any backbone built from it.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..checkpoint import write_folder_atomic
from ..config import merge
from ..train.data import IMAGENET_MEAN, IMAGENET_STD
from ..train.optim import skips_weight_decay
from .data import EVAL_RESIZE_RATIO
from .finetune import RECIPES, layer_id
from .models import DERIVED_BUFFERS, build_classifier, load_into
from .probe import model_from_checkpoint

FORMATS = ("timm", "transformers", "original")
VIT_BIAS_LAYOUTS = ("as-trained", "per-block")
EXPORT_FILES = ("model.safetensors", "model.pth", "config.json", "preprocessor_config.json", "layer_decay.json")
# OpenMMLab's Swin backbone (mmdet 3 / mmseg 1) renames the original layout when loading it with
# convert_weights=True: its parameter names, for layer_decay.json.
MMDET_SWIN_NAMES = [(r"^layers\.(\d+)\.(.*)attn\.", r"stages.\1.\2attn.w_msa."),
                    (r"^layers\.(\d+)\.(.*)mlp\.fc1\.", r"stages.\1.\2ffn.layers.0.0."),
                    (r"^layers\.(\d+)\.(.*)mlp\.fc2\.", r"stages.\1.\2ffn.layers.1."),
                    (r"^layers\.", "stages."), (r"^patch_embed\.proj\.", "patch_embed.projection.")]
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
SWINV2_BLOCK_NAMES = {"norm1.": "layernorm_before.", "norm2.": "layernorm_after.", "attn.proj.": "attention.output.dense.",
                      "mlp.fc1.": "intermediate.dense.", "mlp.fc2.": "output.dense.",
                      "attn.q_bias": "attention.self.query.bias", "attn.v_bias": "attention.self.value.bias",
                      "attn.logit_scale": "attention.self.logit_scale",
                      "attn.cpb_mlp.": "attention.self.continuous_position_bias_mlp."}
SWINV2_QKV = ("attention.self.query", "attention.self.key", "attention.self.value")
CONVNEXT_BLOCK_NAMES = {"dwconv.": "dwconv.", "norm.": "layernorm.", "pwconv1.": "pwconv1.", "pwconv2.": "pwconv2.",
                        "gamma": "layer_scale_parameter"}
CONVNEXT_OTHER_NAMES = {"downsample_layers.0.0.": "embeddings.patch_embeddings.",
                        "downsample_layers.0.1.": "embeddings.layernorm.", "norm.": "layernorm.",
                        **{f"downsample_layers.{stage}.": f"encoder.stages.{stage}.downsampling_layer."
                           for stage in (1, 2, 3)}}
# timm's ConvNeXt: the stem, downsampling at the start of its stage, the final norm inside the head.
CONVNEXT_TIMM_NAMES = [(r"^downsample_layers\.0\.", "stem."), (r"^downsample_layers\.(\d)\.", r"stages.\1.downsample."),
                       (r"^stages\.(\d)\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
                       (r"^stages\.(\d)\.(\d+)\.pwconv(\d)\.", r"stages.\1.blocks.\2.mlp.fc\3."),
                       (r"^stages\.(\d)\.(\d+)\.", r"stages.\1.blocks.\2."), (r"^norm\.", "head.norm."),
                       (r"^head\.", "head.fc.")]


def _substituted(state: Dict[str, torch.Tensor], rules) -> Dict[str, torch.Tensor]:
    """``state`` with each key rewritten by the first of ``rules`` (regex, replacement) that matches."""
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            if re.match(pattern, key):
                key = re.sub(pattern, replacement, key, count=1)
                break
        out[key] = value
    return out


def _check_swin_fits(swin, library: str) -> None:
    if swin.APE or not swin.PATCH_NORM:
        raise ValueError(f"{library}'s Swin has no absolute position embedding and always a patch norm; "
                         "this model (MODEL.SWIN.APE / PATCH_NORM) has no equivalent there")


def timm_layout(state: Dict[str, torch.Tensor], config, num_classes: int) -> Tuple[Dict[str, torch.Tensor], dict]:
    size, model_type = config.DATA.IMG_SIZE, config.MODEL.TYPE
    if model_type == "vit":
        vit = config.MODEL.VIT
        args = {"img_size": size, "patch_size": vit.PATCH_SIZE, "embed_dim": vit.EMBED_DIM, "depth": vit.DEPTH,
                "num_heads": vit.NUM_HEADS, "mlp_ratio": float(vit.MLP_RATIO), "qkv_bias": vit.QKV_BIAS,
                "init_values": vit.INIT_VALUES, "use_abs_pos_emb": vit.USE_APE, "use_rel_pos_bias": vit.USE_RPB,
                "use_shared_rel_pos_bias": vit.USE_SHARED_RPB,
                "global_pool": "avg" if vit.USE_MEAN_POOLING else "token",
                "num_classes": num_classes}
        architecture = "beit_base_patch16_224"
    elif model_type == "convnext":
        convnext = config.MODEL.CONVNEXT
        state = _substituted(state, CONVNEXT_TIMM_NAMES)
        args = {"in_chans": convnext.IN_CHANS, "depths": list(convnext.DEPTHS), "dims": list(convnext.DIMS),
                "ls_init_value": convnext.LAYER_SCALE_INIT_VALUE or None, "num_classes": num_classes}
        architecture = "convnext_tiny"
    else:
        swin = config.MODEL.SWINV2 if model_type == "swinv2" else config.MODEL.SWIN
        _check_swin_fits(swin, "timm")
        # timm keeps a stage's patch merging at the start of the next stage, and the head as head.fc.
        state = {re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
                 .replace("head.", "head.fc.", 1) if key.startswith(("layers.", "head.")) else key: value
                 for key, value in state.items()}
        args = {"img_size": size, "patch_size": swin.PATCH_SIZE, "embed_dim": swin.EMBED_DIM,
                "depths": list(swin.DEPTHS), "num_heads": list(swin.NUM_HEADS), "window_size": swin.WINDOW_SIZE,
                "mlp_ratio": float(swin.MLP_RATIO), "qkv_bias": swin.QKV_BIAS, "num_classes": num_classes}
        architecture = "swin_base_patch4_window7_224"
        if model_type == "swinv2":
            args["pretrained_window_sizes"] = list(swin.PRETRAINED_WINDOW_SIZES)
            architecture = "swinv2_tiny_window8_256"
    config_json = {"architecture": architecture, "num_classes": num_classes, "model_args": args,
                   "pretrained_cfg": {"input_size": [3, size, size], "interpolation": "bicubic",
                                      "crop_pct": 1 / EVAL_RESIZE_RATIO, "mean": list(IMAGENET_MEAN),
                                      "std": list(IMAGENET_STD), "num_classes": num_classes}}
    return state, config_json


def _renamed(state: Dict[str, torch.Tensor], base: str, block_pattern: str, block_prefix: str,
             block_names: Dict[str, str], other_names: Dict[str, str],
             qkv_names=("attention.q_proj", "attention.k_proj", "attention.v_proj")) -> Dict[str, torch.Tensor]:
    """``state`` renamed by prefix tables (inside blocks / elsewhere), under ``base``; a block's fused
    qkv (weight and bias) split into ``qkv_names``; the head becomes ``classifier``."""
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
            for name, part in zip(qkv_names, value.chunk(3, dim=0)):
                out[f"{prefix}{name}.{rest.rsplit('.', 1)[1]}"] = part
            continue
        old = next(old for old in names if rest.startswith(old))
        out[prefix + names[old] + rest[len(old):]] = value
    return out


def transformers_layout(state: Dict[str, torch.Tensor], config, num_classes: int,
                        classes: Optional[List[str]] = None) -> Tuple[Dict[str, torch.Tensor], dict]:
    classify = num_classes > 0
    size, model_type = config.DATA.IMG_SIZE, config.MODEL.TYPE
    if model_type == "vit":
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
    elif model_type == "convnext":
        convnext = config.MODEL.CONVNEXT
        out = _renamed(state, "convnext." if classify else "", r"^stages\.(\d+)\.(\d+)\.(.*)$",
                       "encoder.stages.{}.layers.{}.", CONVNEXT_BLOCK_NAMES, CONVNEXT_OTHER_NAMES)
        hf_config = {"model_type": "convnext",
                     "architectures": ["ConvNextForImageClassification" if classify else "ConvNextModel"],
                     "image_size": size, "num_channels": convnext.IN_CHANS, "patch_size": 4,
                     "num_stages": 4, "depths": list(convnext.DEPTHS), "hidden_sizes": list(convnext.DIMS),
                     "hidden_act": "gelu", "layer_norm_eps": 1e-6,
                     "layer_scale_init_value": convnext.LAYER_SCALE_INIT_VALUE}
    else:
        v2 = model_type == "swinv2"
        swin = config.MODEL.SWINV2 if v2 else config.MODEL.SWIN
        _check_swin_fits(swin, "transformers")
        name = "swinv2" if v2 else "swin"
        if v2:
            out = _renamed(state, "swinv2." if classify else "", r"^layers\.(\d+)\.blocks\.(\d+)\.(.*)$",
                           "encoder.layers.{}.blocks.{}.", SWINV2_BLOCK_NAMES, SWIN_OTHER_NAMES, SWINV2_QKV)
        else:
            out = _renamed(state, "swin." if classify else "", r"^layers\.(\d+)\.blocks\.(\d+)\.(.*)$",
                           "encoder.layers.{}.blocks.{}.", SWIN_BLOCK_NAMES, SWIN_OTHER_NAMES)
        model_class = "Swinv2" if v2 else "Swin"
        hf_config = {"model_type": name,
                     "architectures": [f"{model_class}ForImageClassification" if classify else f"{model_class}Model"],
                     "image_size": size, "patch_size": swin.PATCH_SIZE, "num_channels": swin.IN_CHANS,
                     "embed_dim": swin.EMBED_DIM, "depths": list(swin.DEPTHS), "num_heads": list(swin.NUM_HEADS),
                     "window_size": swin.WINDOW_SIZE, "mlp_ratio": float(swin.MLP_RATIO), "qkv_bias": swin.QKV_BIAS,
                     "hidden_act": "gelu", "use_absolute_embeddings": False, "layer_norm_eps": 1e-5}
        if v2:
            hf_config["pretrained_window_sizes"] = list(swin.PRETRAINED_WINDOW_SIZES)
    if classify:
        names = classes if classes and len(classes) == num_classes else [str(index) for index in range(num_classes)]
        hf_config["id2label"] = {str(index): name for index, name in enumerate(names)}
        hf_config["label2id"] = {name: index for index, name in enumerate(names)}
    return {key: value.contiguous() for key, value in out.items()}, hf_config


def preprocessor_config(config) -> dict:
    """Our evaluation view for ``AutoImageProcessor``: the shorter side resized to int(256/224 x size)
    (bicubic), the centre size x size crop, ImageNet's mean/std: BiT's processor's steps (its crop offset
    floors where torchvision rounds: at most a pixel apart, docs/transfer.md)."""
    size = config.DATA.IMG_SIZE
    return {"image_processor_type": "BitImageProcessor", "do_resize": True,
            "size": {"shortest_edge": int(EVAL_RESIZE_RATIO * size)}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
            "do_convert_rgb": True}


def with_per_block_bias(model, config):
    """A ViT with one shared relative position bias as the fine-tuning layout has it: a copy of the table
    in every block (what the original's fine-tuning loads), the same function."""
    if config.MODEL.TYPE != "vit" or not config.MODEL.VIT.USE_SHARED_RPB:
        raise ValueError("--vit-bias per-block applies to a ViT with a shared relative position bias "
                         f"(MODEL.VIT.USE_SHARED_RPB); this checkpoint's model is a {config.MODEL.TYPE} without one")
    config = merge(config, {"MODEL": {"VIT": {"USE_RPB": True, "USE_SHARED_RPB": False}}})
    per_block = build_classifier(config, model.num_classes)
    load_into(per_block, model.state_dict())
    return per_block.eval(), config


def layer_decay_table(model, config, fmt: str, classes) -> Dict[str, dict]:
    """{exported name: {"layer": our layer-decay layer, "weight_decay": bool}}: each parameter tagged
    with its layer and decay flag as a tensor (layer * 2 + decayed) goes through the same layout as
    the weights, so split or copied tensors keep their tags."""
    skips = skips_weight_decay(model)
    tags = {name: torch.full(param.shape, 2.0 * layer_id(name, config) + (not skips(name, param)))
            for name, param in model.named_parameters()}
    exported, _ = layout(tags, model, config, fmt, classes)
    if fmt == "original":  # the names OpenMMLab's backbone gives them after its conversion
        exported = _substituted(exported, MMDET_SWIN_NAMES)
    return {name: {"layer": int(tag.flatten()[0]) // 2, "weight_decay": bool(int(tag.flatten()[0]) % 2)}
            for name, tag in exported.items()}


def original_swin_layout(state: Dict[str, torch.Tensor], config) -> Tuple[Dict[str, torch.Tensor], dict]:
    """The original Swin layout (microsoft/Swin-Transformer's names, which ours are) for OpenMMLab's Swin
    backbone, which converts it on load (convert_weights=True). The final norm is also written as
    ``norm3``, the name of mmdet's last-stage output norm (the converter keeps such keys as they are),
    since pretraining applied it there. config.json: the backbone's keyword arguments."""
    if config.MODEL.TYPE != "swin":
        raise ValueError(f"--format original is the Swin layout OpenMMLab's Swin backbone loads; this checkpoint's "
                         f"model is a {config.MODEL.TYPE}")
    swin = config.MODEL.SWIN
    _check_swin_fits(swin, "OpenMMLab")
    last = len(swin.DEPTHS) - 1
    state = dict(state, **{f"norm{last}.{name}": state[f"norm.{name}"] for name in ("weight", "bias")})
    backbone = {"type": "SwinTransformer", "pretrain_img_size": config.DATA.IMG_SIZE, "embed_dims": swin.EMBED_DIM,
                "patch_size": swin.PATCH_SIZE, "strides": [swin.PATCH_SIZE, 2, 2, 2], "depths": list(swin.DEPTHS),
                "num_heads": list(swin.NUM_HEADS), "window_size": swin.WINDOW_SIZE, "mlp_ratio": int(swin.MLP_RATIO),
                "qkv_bias": swin.QKV_BIAS, "patch_norm": True, "out_indices": list(range(len(swin.DEPTHS))),
                "convert_weights": True, "init_cfg": {"type": "Pretrained", "checkpoint": "model.pth"}}
    return state, {"openmmlab_backbone": backbone}


def layout(state, model, config, fmt, classes=None):
    num_classes = model.num_classes
    if fmt == "timm":
        return timm_layout(state, config, num_classes)
    if fmt == "original":
        return original_swin_layout(state, config)
    return transformers_layout(state, config, num_classes, classes)


def export_checkpoint(checkpoint: str, fmt: str, out: str, preset: Optional[str] = None,
                      config_file: Optional[str] = None, trust: bool = False, vit_bias: str = "as-trained") -> Path:
    """Write ``out/`` (model.safetensors, config.json, layer_decay.json, and preprocessor_config.json
    for transformers) all at once; returns ``out``. ``vit_bias="per-block"``: a shared-bias ViT in the
    fine-tuning layout (a table in every block). The safetensors metadata says which layout it holds."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if vit_bias not in VIT_BIAS_LAYOUTS:
        raise ValueError(f"--vit-bias must be one of {VIT_BIAS_LAYOUTS}, got {vit_bias!r}")
    try:
        from safetensors.torch import save
    except ImportError:
        raise ValueError("export writes safetensors: pip install safetensors") from None
    model, config, classes = model_from_checkpoint(checkpoint, preset, config_file, trust, with_head=True)
    if vit_bias == "per-block":
        model, config = with_per_block_bias(model, config)
    weights = {key: value for key, value in model.state_dict().items() if not key.endswith(DERIVED_BUFFERS)}
    state, config_json = layout(weights, model, config, fmt, classes)
    metadata = {"format": "pt", "source": str(checkpoint), "simmim_fast.model_type": config.MODEL.TYPE}
    if config.MODEL.TYPE == "vit":
        metadata["simmim_fast.relative_position_bias"] = bias_layout(config)
    weights = {key: value.detach().contiguous() for key, value in state.items()}
    if fmt == "original":  # OpenMMLab reads torch.save files ({'model': state_dict}, as the original saves)
        buffer = io.BytesIO()
        torch.save({"model": weights}, buffer)
        weights_file = {"model.pth": buffer.getvalue()}
    else:
        weights_file = {"model.safetensors": save(weights, metadata=metadata)}
    files = {**weights_file,
             "config.json": json.dumps(config_json, indent=2).encode(),
             "layer_decay.json": json.dumps({"recipe_layer_decay": RECIPES[config.MODEL.TYPE]["TRAIN"]["LAYER_DECAY"],
                                             "format": fmt, "parameters": layer_decay_table(model, config, fmt, classes)},
                                            indent=1).encode()}
    if fmt == "transformers":
        files["preprocessor_config.json"] = json.dumps(preprocessor_config(config), indent=2).encode()
    return write_folder_atomic(out, files, replaceable=EXPORT_FILES)


def bias_layout(config) -> str:
    """'shared' (one table, rel_pos_bias / shared_position_bias), 'per-block' or 'none' for a ViT."""
    vit = config.MODEL.VIT
    return "shared" if vit.USE_SHARED_RPB else "per-block" if vit.USE_RPB else "none"


def describe_bias_layout(folder: Path) -> str:
    """'; relative position bias: shared' for a ViT export (from its safetensors metadata), else ''."""
    from safetensors import safe_open

    if not (Path(folder) / "model.safetensors").is_file():
        return ""
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as file:
        layout_name = (file.metadata() or {}).get("simmim_fast.relative_position_bias")
    return f"; relative position bias: {layout_name}" if layout_name else ""
