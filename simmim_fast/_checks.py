"""Input validation shared by every backend and the command line: bad input is a ValueError naming
what was expected.

Shape, dtype and device checks are free (metadata only). The 0/1 check on mask *values* reads
the data, so it runs only for masks on the CPU (where the data loader makes them) and not while
torch.compile traces: on an accelerator it would force a host sync every step.
"""
from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _sizes(sizes: Sequence[int]) -> str:
    """"(2, 3, 224, 224)". f-strings, not str(): while torch.compile traces with dynamic shapes, Dynamo's
    str() of a size gives back an int."""
    return "(" + ", ".join([f"{size}" for size in sizes]) + ")"


def _shape(t: torch.Tensor) -> str:
    return _sizes(t.shape)


def require(condition: bool, message: Union[str, Callable[[], str]]) -> None:
    """ValueError(message) unless ``condition``. A message that formats values is given as a lambda: it is
    built only on failure, so a passing check formats nothing (nor any symbolic size while torch.compile
    traces with ``dynamic=True``)."""
    if not condition:
        raise ValueError(message() if callable(message) else message)


def check_count(name: str, value, minimum: int) -> None:
    """A setting that counts things (steps, images, workers): an int (not a bool) of at least ``minimum``."""
    require(not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= minimum,
            lambda: f"{name} must be an integer >= {minimum}, got {value!r}")


def check_writable_folder(flag: str, folder) -> None:
    """An output folder (``flag`` names it) must be a folder we can write in, or creatable in one."""
    folder = Path(folder)
    existing = next(parent for parent in (folder, *folder.absolute().parents) if parent.exists())
    require(existing.is_dir(), lambda: f"{flag} {folder}: {existing} is a file; give a folder (created if missing)")
    require(os.access(existing, os.W_OK | os.X_OK), lambda: f"{flag} {folder}: the folder {existing} is not writable")


def usable_device(flag: str, spec: str) -> torch.device:
    """The device ``spec`` names ('cpu', 'cuda:1'), if this process can compute on it; else a ValueError
    naming ``flag`` (no traceback from the first tensor moved there)."""
    try:
        device = torch.device(spec)
    except RuntimeError as error:
        raise ValueError(f"{flag} {spec!r} is not a device ({str(error).splitlines()[0]})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        require(count > 0, lambda: f"{flag} {spec} but torch sees no CUDA device; use {flag} cpu")
        require(device.index is None or device.index < count,
                lambda: f"{flag} {spec} but torch sees {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    require(device.type != "meta", lambda: f"{flag} meta holds no data; give a device that computes (cpu, cuda)")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, NotImplementedError) as error:
        raise ValueError(f"{flag} {spec}: torch cannot compute there ({str(error).splitlines()[0]})") from None
    return device


def check_timeable(model: torch.nn.Module, images, mask, warmup: Optional[int], repeats: Optional[int]) -> None:
    """What ``tune()`` can time: tensors holding data (not meta) on the model's device, at least one
    timed call. The model's own forward checks the rest (shapes, dtypes)."""
    for name, value in (("images", images), ("mask", mask)):
        require(isinstance(value, torch.Tensor), lambda: f"tune() needs {name} as a tensor, got {type(value).__name__}")
        require(value.device.type != "meta", lambda: f"tune() cannot time {name} on the meta device (no data to "
                                                     "run on); give real tensors on the training device")
    weight = next(model.parameters(), None)
    if weight is not None:
        check_matches_model("images", images, weight, dtype_too=False)
    if warmup is not None:
        check_count("warmup", warmup, 0)
    if repeats is not None:
        check_count("repeats", repeats, 1)


def check_floating(name: str, t: torch.Tensor) -> None:
    require(t.dtype in FLOAT_DTYPES,
            lambda: f"{name} must be a floating tensor (float32/float16/bfloat16), got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        hint = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {_sizes(expected)}{hint}, got {_shape(t)}")


def check_mask_values(mask: torch.Tensor) -> None:
    """dtype always; values only on the CPU (see module doc)."""
    require(
        mask.dtype == torch.bool or not mask.dtype.is_complex,
        lambda: f"mask must be a bool, integer or floating 0/1 tensor, got {mask.dtype}",
    )
    if mask.dtype == torch.bool or mask.device.type != "cpu" or mask.numel() == 0 or torch.compiler.is_compiling():
        return
    if not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[:3].tolist()
        raise ValueError(f"mask must contain only 0 and 1, found values such as {bad}")


def check_token_mask(mask: torch.Tensor, batch: int, grid: Sequence[int], what: str) -> None:
    """mask must be (B, h, w) with (h, w) == grid, or (B, h*w) when grid is given flat."""
    expected = (batch, *grid)
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask must have shape {_sizes(expected)} ({what}), got {_shape(mask)}")
    check_mask_values(mask)


def check_matches_model(name: str, t: torch.Tensor, weight: torch.Tensor, dtype_too: bool = True) -> None:
    """``t`` on the device of the model's ``weight``; with ``dtype_too`` also of its dtype outside
    autocast (under autocast the ops cast it themselves)."""
    require(t.device == weight.device,
            lambda: f"{name} is on {t.device} but the model is on {weight.device}: move one to the other "
                    f"(e.g. {name}.to(device))")
    require(not dtype_too or t.dtype == weight.dtype or torch.is_autocast_enabled(t.device.type),
            lambda: f"{name} is {t.dtype} but the model's weights are {weight.dtype}: outside torch.autocast "
                    f"they must match (convert the images, or the model, or run under torch.autocast)")


def check_image(image: torch.Tensor, in_chans: int, img_size: Optional[Sequence[int]] = None,
                weight: Optional[torch.Tensor] = None) -> None:
    """``weight``: the model's first weight, whose device (and, outside autocast, dtype) the image must have."""
    require(image.dim() == 4, lambda: f"image must be (B, C, H, W), got {_shape(image)}")
    require(image.shape[0] >= 1, lambda: f"image must hold at least one image, got a batch of 0 {_shape(image)}")
    check_floating("image", image)
    if weight is not None:
        check_matches_model("image", image, weight)
    require(image.shape[1] == in_chans, lambda: f"image must have {in_chans} channels, got {_shape(image)}")
    if img_size is not None:
        require(
            tuple(image.shape[2:]) == tuple(img_size),
            lambda: f"image size {_sizes(image.shape[2:])} does not match the model's img_size {_sizes(img_size)}",
        )


def check_encoder_inputs(image: torch.Tensor, mask: torch.Tensor, in_chans: int, img_size: Sequence[int],
                         patch_size: Sequence[int], weight: torch.Tensor) -> None:
    """An encoder's forward(x, mask): image (B, in_chans, *img_size), mask (B, H/patch, W/patch), both on
    the device of the model's first ``weight`` (the image also of its dtype outside autocast)."""
    check_image(image, in_chans, img_size, weight)
    check_matches_model("mask", mask, weight, dtype_too=False)
    grid = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
    check_token_mask(mask, image.shape[0], grid, f"image {tuple(img_size)} / patch {tuple(patch_size)}")


def check_mask_token_blend(tokens: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> None:
    require(tokens.dim() == 3, lambda: f"tokens must be (B, L, D), got {_shape(tokens)}")
    check_floating("tokens", tokens)
    batch, length, dim = tokens.shape
    check_shape("mask_token", mask_token, (1, 1, dim))
    require(mask.dim() in (2, 3) and mask.shape[0] == batch,
            lambda: f"mask must be (B, h, w) or (B, L) with B={batch}, got {_shape(mask)}")
    require(mask[0].numel() == length, lambda: f"mask must cover L={length} tokens, got {_shape(mask)}")
    check_mask_values(mask)


def check_masked_patch_embed(image, mask, weight, bias, mask_token, pos_embed=None, norm_weight=None, norm_bias=None,
                             norm_eps=1e-5) -> None:
    require(weight.dim() == 4 and weight.shape[2] == weight.shape[3],
            lambda: f"weight must be (D, C, p, p), got {_shape(weight)}")
    dim, in_chans, patch, _ = weight.shape
    check_image(image, in_chans)
    batch, _, height, width = image.shape
    require(height % patch == 0 and width % patch == 0,
            lambda: f"image size ({height}, {width}) must be a multiple of the patch size {patch}")
    grid = (height // patch, width // patch)
    check_token_mask(mask, batch, grid, f"image {height}x{width} / patch {patch}")
    if bias is not None:
        check_shape("bias", bias, (dim,))
    check_shape("mask_token", mask_token, (1, 1, dim))
    if pos_embed is not None:
        check_shape("pos_embed", pos_embed, (1, grid[0] * grid[1], dim), "patch positions only")
    require((norm_weight is None) == (norm_bias is None), "norm_weight and norm_bias go together")
    if norm_weight is not None:
        check_shape("norm_weight", norm_weight, (dim,))
        check_shape("norm_bias", norm_bias, (dim,))


def check_attention(q, k, v, bias) -> None:
    require(q.dim() == 4, lambda: f"q must be (B, H, N, d), got {_shape(q)}")
    check_floating("q", q)
    check_shape("k", k, q.shape, "same as q")
    check_shape("v", v, q.shape, "same as q")
    require(q.dtype == k.dtype == v.dtype, lambda: f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _, heads, tokens, _ = q.shape
    if bias is not None:
        check_shape("bias", bias, (heads, tokens, tokens), "(H, N, N), shared over the batch")


def check_window_attention(q, k, v, bias, window_mask) -> None:
    check_attention(q, k, v, bias)
    require(bias is not None, "window attention needs the relative position bias (H, T, T)")
    if window_mask is not None:
        tokens = q.shape[2]
        require(window_mask.dim() == 3 and tuple(window_mask.shape[1:]) == (tokens, tokens),
                lambda: f"window_mask must be (nW, {tokens}, {tokens}), got {_shape(window_mask)}")
        require(q.shape[0] % window_mask.shape[0] == 0,
                lambda: f"batch*windows {q.shape[0]} is not a multiple of the mask's window count "
                        f"{window_mask.shape[0]}")


def check_loss_geometry(reconstruction_shape, target, mask, patch_size: int, shuffle_stride: int) -> None:
    """Shapes of the masked L1 loss: target image, (pre-shuffle) reconstruction, token mask."""
    require(target.dim() == 4, lambda: f"target must be (B, C, H, W), got {_shape(target)}")
    check_floating("target", target)
    batch, chans, height, width = target.shape
    s = shuffle_stride
    require(s >= 1 and height % s == 0 and width % s == 0,
            lambda: f"target size ({height}, {width}) must be a multiple of shuffle_stride {s}")
    expected = (batch, chans * s * s, height // s, width // s)
    if tuple(reconstruction_shape) != expected:
        what = "image-shaped" if s == 1 else f"decoder output before PixelShuffle({s})"
        raise ValueError(f"reconstruction must have shape {_sizes(expected)} ({what}), "
                         f"got {_sizes(reconstruction_shape)}")
    require(patch_size >= 1 and height % patch_size == 0 and width % patch_size == 0,
            lambda: f"target size ({height}, {width}) must be a multiple of patch_size {patch_size}")
    check_token_mask(mask, batch, (height // patch_size, width // patch_size),
                     f"image {height}x{width} / patch {patch_size}")


def check_masked_l1_loss(reconstruction, target, mask, patch_size: int, shuffle_stride: int) -> None:
    check_floating("reconstruction", reconstruction)
    check_loss_geometry(reconstruction.shape, target, mask, patch_size, shuffle_stride)


def check_norm_target(norm_target_patch_size) -> None:
    """None (raw pixels) or an odd window of 3 or more (the successor asserts odd; 1 would divide by n - 1 = 0)."""
    window = norm_target_patch_size
    require(window is None or isinstance(window, int) and not isinstance(window, bool) and window >= 3
            and window % 2 == 1,
            lambda: f"norm_target_patch_size must be None or an odd int >= 3 (the successor uses 47), got {window!r}")


def check_masked_decoder_loss(features, mask, weight, bias, target, encoder_stride, patch_size,
                              norm_target_patch_size=None) -> None:
    require(features.dim() == 4, lambda: f"features must be (B, C, h, w), got {_shape(features)}")
    check_floating("features", features)
    require(target.dim() == 4, lambda: f"target must be (B, C, H, W), got {_shape(target)}")
    batch, channels, fh, fw = features.shape
    out_channels = encoder_stride * encoder_stride * target.shape[1]
    check_shape("weight", weight, (out_channels, channels, 1, 1), "decoder.0, a 1x1 conv")
    if bias is not None:
        check_shape("bias", bias, (out_channels,))
    check_shape("target", target, (batch, target.shape[1], fh * encoder_stride, fw * encoder_stride),
                f"features ({fh}, {fw}) x encoder_stride {encoder_stride}")
    check_loss_geometry((batch, out_channels, fh, fw), target, mask, patch_size, encoder_stride)
    check_norm_target(norm_target_patch_size)


CHECKS = {
    "mask_token_blend": check_mask_token_blend,
    "masked_patch_embed": check_masked_patch_embed,
    "attention": lambda q, k, v, bias=None, scale=None, dropout_p=0.0: check_attention(q, k, v, bias),
    "window_attention": lambda q, k, v, bias, window_mask=None, scale=None, dropout_p=0.0:
        check_window_attention(q, k, v, bias, window_mask),
    "masked_l1_loss": lambda reconstruction, target, mask, patch_size, in_chans, shuffle_stride=1:
        check_masked_l1_loss(reconstruction, target, mask, patch_size, shuffle_stride),
    "masked_decoder_loss": lambda features, mask, weight, bias, target, encoder_stride, patch_size, in_chans,
        norm_target_patch_size=None: check_masked_decoder_loss(features, mask, weight, bias, target, encoder_stride,
                                                               patch_size, norm_target_patch_size),
}
