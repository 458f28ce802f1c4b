"""The CUDA C++ ops of csrc/ as Python functions with the reference signatures.

``torch.ops.simmim_fast.*`` come from the compiled extension ``simmim_fast._C`` (built with
``SIMMIM_FAST_BUILD_CUDA=1``, or compiled on first use with ``SIMMIM_FAST_JIT_CUDA=1`` from a source
checkout). Their fake (meta) kernels and autograd formulas are registered here, once the library is
loaded, so the ops trace under torch.compile and differentiate like the reference.
Nothing here is imported until the cuda backend is asked for (``import simmim_fast`` never builds).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import pathlib

import torch
import torch.nn.functional as F

JIT_ENV_VAR = "SIMMIM_FAST_JIT_CUDA"
BUILD_HINT = ("build it with `SIMMIM_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .` or set "
              f"{JIT_ENV_VAR}=1 to compile it on first use (csrc/README.md)")
OPS = ("masked_l1_loss", "masked_l1_loss_backward", "mask_token_blend", "mask_token_blend_backward")
_BUILD_SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "build.py"


def _jit_build() -> None:
    if not _BUILD_SCRIPT.is_file():
        raise RuntimeError(f"{JIT_ENV_VAR}=1 needs a source checkout with {_BUILD_SCRIPT}")
    spec = importlib.util.spec_from_file_location("simmim_fast_csrc_build", _BUILD_SCRIPT)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    build.jit_load()


def _load_library() -> str:
    """Load the ops into torch.ops.simmim_fast; '' on success, else the precise reason."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build; the CUDA extension needs a CUDA build of torch"
    if not hasattr(torch.library, "register_autograd"):
        return f"torch {torch.__version__} is too old for the CUDA extension's op registration (needs torch >= 2.4)"
    try:
        importlib.import_module("simmim_fast._C")
        return ""
    except ModuleNotFoundError:
        if os.environ.get(JIT_ENV_VAR, "0") != "1":
            return f"CUDA extension simmim_fast._C is not built; {BUILD_HINT}"
    except ImportError as error:  # built, but for another torch / CUDA runtime
        return f"CUDA extension simmim_fast._C is built but does not load ({error}); rebuild it against this torch"
    try:
        _jit_build()
    except Exception as error:  # a compiler error, no nvcc, no ninja: report it, never raise from dispatch
        return f"{JIT_ENV_VAR}=1 but compiling csrc/ failed ({type(error).__name__}: {error})"
    return ""


@functools.lru_cache(maxsize=None)
def load_error() -> str:
    """'' once the ops are registered with their fake kernels and autograd; else why they cannot be."""
    error = _load_library()
    if not error:
        _register_fakes_and_autograd()
    return error


def _require_ops():
    # Dynamo would trace into the loader (it ignores lru_cache); when compiling, the eager call or the
    # dispatch's reasons check has already loaded the library.
    if not torch.compiler.is_compiling():
        error = load_error()
        if error:
            raise RuntimeError(error)
    return torch.ops.simmim_fast


def _contiguous_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _register_fakes_and_autograd() -> None:
    lib = "simmim_fast::"

    @torch.library.register_fake(lib + "masked_l1_loss")
    def _(reconstruction, target, mask, patch_size, in_chans, shuffle_stride):
        scalar = reconstruction.new_empty((), dtype=torch.float32)
        return scalar, torch.empty_like(scalar)

    @torch.library.register_fake(lib + "masked_l1_loss_backward")
    def _(grad_loss, denominator, reconstruction, target, mask, patch_size, in_chans, shuffle_stride):
        return _contiguous_like(reconstruction)

    @torch.library.register_fake(lib + "mask_token_blend")
    def _(tokens, mask, mask_token):
        return _contiguous_like(tokens)

    @torch.library.register_fake(lib + "mask_token_blend_backward")
    def _(grad_out, mask, mask_token):
        return _contiguous_like(grad_out), _contiguous_like(mask_token)

    def loss_setup_context(ctx, inputs, output):
        reconstruction, target, mask, patch_size, in_chans, shuffle_stride = inputs
        ctx.geometry = (patch_size, in_chans, shuffle_stride)
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(reconstruction, target, mask, output[1])

    def loss_backward(ctx, grad_loss, _grad_denominator):
        reconstruction, target, mask, denominator = ctx.saved_tensors
        patch_size, in_chans, shuffle_stride = ctx.geometry
        grad_reconstruction = torch.ops.simmim_fast.masked_l1_loss_backward(
            grad_loss, denominator, reconstruction, target, mask, patch_size, in_chans, shuffle_stride)
        grad_target = None
        if ctx.needs_input_grad[1]:  # rare (the target is the input image): -d recon, in image layout
            grad_target = -(F.pixel_shuffle(grad_reconstruction, shuffle_stride) if shuffle_stride > 1
                            else grad_reconstruction)
        return grad_reconstruction, grad_target, None, None, None, None

    torch.library.register_autograd(lib + "masked_l1_loss", loss_backward, setup_context=loss_setup_context)

    def blend_setup_context(ctx, inputs, output):
        _tokens, mask, mask_token = inputs
        ctx.save_for_backward(mask, mask_token)

    def blend_backward(ctx, grad_out):
        mask, mask_token = ctx.saved_tensors
        grad_tokens, grad_mask_token = torch.ops.simmim_fast.mask_token_blend_backward(grad_out, mask, mask_token)
        return grad_tokens, None, grad_mask_token

    torch.library.register_autograd(lib + "mask_token_blend", blend_backward, setup_context=blend_setup_context)


def loss_dtype(reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.dtype:
    """The dtype the reference loss comes out in: pixel dtype promoted with that of the masked pixel
    count (the mask's dtype for a floating mask, else the default dtype it becomes after ``+ 1e-5``)."""
    pixels = torch.promote_types(reconstruction.dtype, target.dtype)
    count = mask.dtype if mask.dtype.is_floating_point else torch.get_default_dtype()
    return torch.promote_types(pixels, count)


def masked_l1_loss(reconstruction, target, mask, patch_size, in_chans, shuffle_stride=1):
    """``reference.masked_l1_loss`` on the CUDA kernel (fp32 accumulation, deterministic)."""
    loss, _denominator = _require_ops().masked_l1_loss(reconstruction, target, mask, patch_size, in_chans,
                                                       shuffle_stride)
    return loss.to(loss_dtype(reconstruction, target, mask))


def mask_token_blend(tokens, mask, mask_token):
    """``reference.mask_token_blend`` on the CUDA kernel (tokens and mask_token share a dtype)."""
    return _require_ops().mask_token_blend(tokens, mask, mask_token)
