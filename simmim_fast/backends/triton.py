"""Our fused Triton kernels (``simmim_fast.kernels``), on CUDA or under TRITON_INTERPRET=1 on the CPU."""
from __future__ import annotations

import os
from typing import Callable, Dict, List

import torch

from . import ALL_OPS, Backend, device_types, floating_dtypes, import_error

# op -> (module in simmim_fast.kernels, function with the reference signature)
KERNEL_ENTRY_POINTS = {
    "mask_token_blend": ("mask_token_blend", "mask_token_blend"),
    "masked_patch_embed": ("masked_patch_embed", "masked_patch_embed"),
    "attention": ("attention_bias", "attention"),
    "window_attention": ("window_attention", "window_attention"),
    "masked_l1_loss": ("masked_l1_loss", "masked_l1_loss"),
    "masked_decoder_loss": ("masked_decoder_loss", "masked_decoder_loss"),
}
KERNEL_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
# Ops that use tl.dot: the interpreter's bf16 tl.dot returns garbage, so they refuse bf16 there.
DOT_OPS = {"masked_patch_embed", "attention", "window_attention", "masked_decoder_loss"}
ATTENTION_HEAD_DIMS = range(16, 257)  # power-of-two padding inside the kernel; > 256 would spill
PATCH_NORM_MAX_DIM = 1024  # masked_patch_embed's LayerNorm keeps a full channel row in registers
# masked_decoder_loss's normalised target sums a token's neighbourhood (stride + window - 1 pixels a side) in one
# program: Swin's stride 32 with the successor's window 47 takes 78.
NORM_TARGET_MAX_NEIGHBOURHOOD = 256
_IMPLEMENTATIONS: Dict[str, Callable] = {}  # a plain dict: torch.compile reads it as a constant


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    name = "triton"
    ops = ALL_OPS
    description = "fused Triton kernels (simmim_fast.kernels): CUDA, or CPU under TRITON_INTERPRET=1"

    def unavailable_reasons(self) -> List[str]:
        error = import_error("triton")
        if error:
            return [error]
        if not interpreting() and not torch.cuda.is_available():
            return ["no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)"]
        return []

    def not_supported_reasons(self, op, args) -> List[str]:
        reasons = []
        allowed_devices = {"cuda", "cpu"} if interpreting() else {"cuda"}
        devices = device_types(args)
        if not devices <= allowed_devices:
            reasons.append(f"tensors on {sorted(devices)}; triton runs on {sorted(allowed_devices)}")
        dtypes = floating_dtypes(args)
        if not dtypes <= KERNEL_DTYPES:
            reasons.append(f"dtypes {sorted(map(str, dtypes))}; kernels take float32/float16/bfloat16")
        if interpreting() and op in DOT_OPS and torch.bfloat16 in dtypes:
            reasons.append("bfloat16 tl.dot is wrong under TRITON_INTERPRET=1; use float32 or float16 there")
        if args.get("dropout_p", 0.0):
            reasons.append("attention dropout > 0 is not fused (every SimMIM recipe uses 0); the reference does it")
        if op in ("attention", "window_attention") and args["q"].shape[-1] not in ATTENTION_HEAD_DIMS:
            reasons.append(f"head dim {args['q'].shape[-1]} outside {ATTENTION_HEAD_DIMS.start}..{ATTENTION_HEAD_DIMS.stop - 1}")
        # Windows of any size: up to 64 tokens and d <= 64 whole-window kernels, above that the flash kernels.
        if op == "window_attention":
            if args["window_mask"] is not None and args["window_mask"].requires_grad:
                reasons.append("window_mask requires grad; the kernel treats it as a buffer and gives it none")
        mask = args.get("mask")
        if isinstance(mask, torch.Tensor) and mask.requires_grad:
            reasons.append("the mask requires grad; the kernels take it as a 0/1 sample and give it no gradient")
        stride, patch = args.get("encoder_stride"), args.get("patch_size")
        if op == "masked_decoder_loss" and stride and patch and stride % patch:
            reasons.append(f"encoder_stride {stride} is not a multiple of patch_size {patch}")
        if (interpreting() and op in DOT_OPS and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16):
            reasons.append("CPU autocast to bfloat16 would run tl.dot in bf16, which is wrong under TRITON_INTERPRET=1")
        if op == "masked_patch_embed" and args["norm_weight"] is not None and len(args["norm_weight"]) > PATCH_NORM_MAX_DIM:
            reasons.append(f"patch_norm over {len(args['norm_weight'])} > {PATCH_NORM_MAX_DIM} channels")
        window = args.get("norm_target_patch_size") if op == "masked_decoder_loss" else None
        if window is not None:
            if stride and stride + window - 1 > NORM_TARGET_MAX_NEIGHBOURHOOD:
                reasons.append(f"NORM_TARGET window {window} with encoder_stride {stride}: a token's neighbourhood "
                               f"{stride + window - 1} > {NORM_TARGET_MAX_NEIGHBOURHOOD} pixels a side")
            if args["target"].requires_grad:
                reasons.append("the target requires grad; with NORM_TARGET the fused op gives it none")
        return reasons

    def implementation(self, op):
        if not _IMPLEMENTATIONS:
            # Import statements, not importlib: Dynamo runs these while tracing, importlib it refuses.
            from simmim_fast.kernels import (attention_bias, mask_token_blend, masked_decoder_loss,
                                             masked_l1_loss, masked_patch_embed, window_attention)

            modules = {module.__name__.rpartition(".")[2]: module for module in (
                attention_bias, mask_token_blend, masked_decoder_loss, masked_l1_loss, masked_patch_embed,
                window_attention)}
            for name, (module_name, function_name) in KERNEL_ENTRY_POINTS.items():
                _IMPLEMENTATIONS[name] = getattr(modules[module_name], function_name)
        return _IMPLEMENTATIONS[op]
