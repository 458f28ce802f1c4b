"""Our fused Triton kernels (``simmim_fast.kernels``), on CUDA or under TRITON_INTERPRET=1 on the CPU."""
from __future__ import annotations

import functools
import importlib
import inspect
import os
from typing import Callable, List

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
# window_attention keeps a window's whole key rows on chip; larger tiles overflow H100 shared memory.
WINDOW_MAX_TOKENS, WINDOW_MAX_HEAD_DIM = 256, 64
# Reference arguments a kernel may not take yet, with the value that turns them off. Until the kernel's
# signature has one, calls that turn it on are refused (with this reason) and the others run without it.
PENDING_ARGUMENTS = {
    "masked_decoder_loss": {"norm_target_patch_size": (None, "the normalised pixel target (NORM_TARGET) is not "
                                                             "fused into the decoder+loss kernel yet")},
}


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
        if op == "window_attention":
            tokens, head_dim = args["q"].shape[-2:]
            if tokens > WINDOW_MAX_TOKENS or head_dim > WINDOW_MAX_HEAD_DIM:
                reasons.append(f"windows of {tokens} tokens, head dim {head_dim}: window attention takes "
                               f"T <= {WINDOW_MAX_TOKENS}, d <= {WINDOW_MAX_HEAD_DIM}")
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
        for name, (off, why) in PENDING_ARGUMENTS.get(op, {}).items():
            if args.get(name, off) != off and name not in _kernel_parameters(op):
                reasons.append(f"{why} ({name}={args[name]!r})")
        return reasons

    def implementation(self, op):
        kernel = _kernel(op)
        missing = [name for name in PENDING_ARGUMENTS.get(op, {}) if name not in _kernel_parameters(op)]
        return functools.partial(_without, kernel, missing) if missing else kernel


def _kernel(op: str) -> Callable:
    module_name, function_name = KERNEL_ENTRY_POINTS[op]
    return getattr(importlib.import_module(f"simmim_fast.kernels.{module_name}"), function_name)


_KERNEL_PARAMETERS = {}  # a plain dict, not lru_cache: Dynamo reads it as a constant when compiling


def _kernel_parameters(op: str) -> frozenset:
    if op not in _KERNEL_PARAMETERS:
        _KERNEL_PARAMETERS[op] = frozenset(inspect.signature(_kernel(op)).parameters)
    return _KERNEL_PARAMETERS[op]


def _without(kernel: Callable, missing, **args):
    """Call ``kernel`` without the pending arguments it does not take (``reasons`` ensured they are off)."""
    for name in missing:
        args.pop(name, None)
    return kernel(**args)
