"""The shapes each op is benchmarked at, deterministic inputs for them, and what each op must move.

Real shapes are those of the two published recipes at batch 64: ViT-B/16 at 224 and Swin-B at 192
with window 6. Smoke shapes are the same structure, small enough for a 2-core CPU.

Bytes and FLOPs are lower bounds for one pass of a fused kernel, per autograd pass ("forward",
"backward"; "forward+backward" is their sum): every input element the result depends on is read
once, every output and gradient is written once. Where the mask makes inputs irrelevant (masked
tokens' pixels, unmasked pixels' loss), they are not counted, so a backend that skips them can
reach 100% and one that does not cannot. FLOPs are 2 per multiply-add of the matmuls only.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

from simmim_fast.masking import MaskGenerator
from simmim_fast.models.swin import shifted_window_mask

MODES = ("forward", "backward", "forward+backward")


@dataclass(frozen=True)
class VitShape:
    batch: int
    image: int
    patch: int
    dim: int
    heads: int
    mask_patch: int

    @property
    def grid(self) -> int:
        return self.image // self.patch

    @property
    def label(self) -> str:
        return f"vit p{self.patch} {self.image}px b{self.batch}"


@dataclass(frozen=True)
class SwinShape:
    batch: int
    image: int
    patch: int
    dim: int
    heads: Tuple[int, ...]  # one entry per stage
    window: int
    mask_patch: int

    @property
    def grid(self) -> int:
        return self.image // self.patch

    @property
    def stride(self) -> int:
        return self.patch * 2 ** (len(self.heads) - 1)

    @property
    def features(self) -> int:
        return self.dim * 2 ** (len(self.heads) - 1)

    @property
    def label(self) -> str:
        return f"swin p{self.patch} {self.image}px w{self.window} b{self.batch}"


REAL_VIT = VitShape(batch=64, image=224, patch=16, dim=768, heads=12, mask_patch=32)
REAL_SWIN = SwinShape(batch=64, image=192, patch=4, dim=128, heads=(4, 8, 16, 32), window=6, mask_patch=32)
SMOKE_VIT = VitShape(batch=2, image=32, patch=8, dim=32, heads=2, mask_patch=16)
SMOKE_SWIN = SwinShape(batch=2, image=32, patch=2, dim=16, heads=(1, 2, 4, 8), window=4, mask_patch=16)


@dataclass
class Case:
    """One op at one shape. ``build(device, dtype, seed)`` gives the op's keyword arguments;
    ``grad_names`` are the arguments that are trained (they get gradients in the backward)."""

    op: str
    name: str
    build: Callable[[torch.device, torch.dtype, int], Dict[str, object]]
    grad_names: Tuple[str, ...]


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _masks(shape, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    masks = MaskGenerator(shape.image, shape.mask_patch, shape.patch, 0.6)
    return masks.generate(shape.batch, generator=generator, device=device)


def _randn(size, device, dtype, generator, scale=1.0) -> torch.Tensor:
    return (torch.randn(size, device=device, generator=generator, dtype=torch.float32) * scale).to(dtype)


def _blend_case(shape) -> Case:
    def build(device, dtype, seed):
        g = _generator(device, seed)
        return dict(tokens=_randn((shape.batch, shape.grid ** 2, shape.dim), device, dtype, g),
                    mask=_masks(shape, device, g),
                    mask_token=_randn((1, 1, shape.dim), device, dtype, g, 0.02))
    return Case("mask_token_blend", shape.label, build, ("tokens", "mask_token"))


def _patch_embed_case(shape, layer_norm: bool) -> Case:
    def build(device, dtype, seed):
        g = _generator(device, seed)
        args = dict(image=_randn((shape.batch, 3, shape.image, shape.image), device, dtype, g),
                    mask=_masks(shape, device, g),
                    weight=_randn((shape.dim, 3, shape.patch, shape.patch), device, dtype, g, 0.02),
                    bias=_randn((shape.dim,), device, dtype, g, 0.02),
                    mask_token=_randn((1, 1, shape.dim), device, dtype, g, 0.02))
        if layer_norm:
            args["norm_weight"] = 1.0 + _randn((shape.dim,), device, dtype, g, 0.02)
            args["norm_bias"] = _randn((shape.dim,), device, dtype, g, 0.02)
        return args
    trained = ("weight", "bias", "mask_token") + (("norm_weight", "norm_bias") if layer_norm else ())
    return Case("masked_patch_embed", shape.label + (" +LayerNorm" if layer_norm else ""), build, trained)


def _attention_case(shape: VitShape) -> Case:
    tokens, head_dim = shape.grid ** 2 + 1, shape.dim // shape.heads

    def build(device, dtype, seed):
        g = _generator(device, seed)
        qkv = [_randn((shape.batch, shape.heads, tokens, head_dim), device, dtype, g) for _ in range(3)]
        return dict(q=qkv[0], k=qkv[1], v=qkv[2], bias=_randn((shape.heads, tokens, tokens), device, dtype, g, 0.02))
    name = f"B{shape.batch} H{shape.heads} N{tokens} d{head_dim}"
    return Case("attention", name, build, ("q", "k", "v", "bias"))


def _window_attention_case(shape: SwinShape, stage: int) -> Case:
    resolution = shape.grid // 2 ** stage
    window = min(shape.window, resolution)
    shifted = resolution > window
    heads = shape.heads[stage]
    head_dim = shape.dim * 2 ** stage // heads
    windows = shape.batch * (resolution // window) ** 2
    tokens = window * window

    def build(device, dtype, seed):
        g = _generator(device, seed)
        qkv = [_randn((windows, heads, tokens, head_dim), device, dtype, g) for _ in range(3)]
        window_mask = None
        if shifted:
            window_mask = shifted_window_mask((resolution, resolution), window, window // 2).to(device, dtype)
        return dict(q=qkv[0], k=qkv[1], v=qkv[2], bias=_randn((heads, tokens, tokens), device, dtype, g, 0.02),
                    window_mask=window_mask)
    name = f"stage{stage + 1} B*nW{windows} H{heads} T{tokens} d{head_dim}" + (" shifted" if shifted else "")
    return Case("window_attention", name, build, ("q", "k", "v", "bias"))


def _decoder_shape(shape) -> Tuple[int, int, int]:
    """(encoder stride, feature channels, feature side) of the SimMIM decoder for a shape."""
    if isinstance(shape, VitShape):
        return shape.patch, shape.dim, shape.grid
    return shape.stride, shape.features, shape.image // shape.stride


def _l1_loss_case(shape) -> Case:
    stride, _, side = _decoder_shape(shape)

    def build(device, dtype, seed):
        g = _generator(device, seed)
        return dict(reconstruction=_randn((shape.batch, 3 * stride * stride, side, side), device, dtype, g),
                    target=_randn((shape.batch, 3, shape.image, shape.image), device, dtype, g),
                    mask=_masks(shape, device, g), patch_size=shape.patch, in_chans=3, shuffle_stride=stride)
    return Case("masked_l1_loss", shape.label + f" stride{stride}", build, ("reconstruction",))


def _decoder_loss_case(shape, norm_target: Optional[int] = None) -> Case:
    """The decoder + loss; ``norm_target``: the successor's normalised target with that window."""
    stride, channels, side = _decoder_shape(shape)

    def build(device, dtype, seed):
        g = _generator(device, seed)
        return dict(features=_randn((shape.batch, channels, side, side), device, dtype, g),
                    mask=_masks(shape, device, g),
                    weight=_randn((3 * stride * stride, channels, 1, 1), device, dtype, g, 0.02),
                    bias=_randn((3 * stride * stride,), device, dtype, g, 0.02),
                    target=_randn((shape.batch, 3, shape.image, shape.image), device, dtype, g),
                    encoder_stride=stride, patch_size=shape.patch, in_chans=3, norm_target_patch_size=norm_target)
    label = shape.label + f" C{channels} stride{stride}" + (f" NORM_TARGET {norm_target}" if norm_target else "")
    return Case("masked_decoder_loss", label, build, ("features", "weight", "bias"))


def recipe_cases(shape) -> List[Case]:
    """Every op a model of ``shape`` (a VitShape or a SwinShape) trains with, forward and backward."""
    if isinstance(shape, VitShape):
        cases = [_blend_case(shape), _patch_embed_case(shape, layer_norm=False), _attention_case(shape)]
    else:
        cases = [_blend_case(shape), _patch_embed_case(shape, layer_norm=True)]
        cases += [_window_attention_case(shape, stage) for stage in range(len(shape.heads))]
        # Swin V2's recipe (the successor's): the same decoder geometry on the normalised target, window 47.
        cases.append(_decoder_loss_case(shape, norm_target=47))
    return cases + [_l1_loss_case(shape), _decoder_loss_case(shape)]


def all_cases(smoke: bool, batch: Optional[int] = None) -> List[Case]:
    """Every op at the two recipes' shapes (or the smoke ones), at their batch or at ``batch``."""
    vit, swin = (SMOKE_VIT, SMOKE_SWIN) if smoke else (REAL_VIT, REAL_SWIN)
    if batch is not None:
        vit, swin = replace(vit, batch=batch), replace(swin, batch=batch)
    return recipe_cases(vit) + recipe_cases(swin)


def envelope_cases() -> List[Case]:
    """The edges of what the dispatch sends to the attention kernels (simmim_fast/backends/triton.py),
    beyond the two recipes: head dims 32..256, windows 7x7 to 14x14 with the widest head dim. Small
    batches; tests/test_kernel_compile.py compiles them for the GPU."""
    cases = [_attention_case(VitShape(batch=2, image=224, patch=16, dim=12 * head_dim, heads=12, mask_patch=32))
             for head_dim in (32, 80, 128, 256)]
    cases.append(_attention_case(VitShape(batch=2, image=112, patch=16, dim=768, heads=12, mask_patch=16)))
    for window, head_dim in ((7, 32), (7, 64), (12, 32), (14, 64)):
        swin = SwinShape(batch=1, image=4 * window * 4, patch=4, dim=2 * head_dim, heads=(2, 4, 8, 16),
                         window=window, mask_patch=4 * window)
        cases.append(_window_attention_case(swin, stage=0))
    return cases


# ---- bytes and FLOPs ---------------------------------------------------------------------------

def nbytes(*tensors: Optional[torch.Tensor]) -> float:
    return float(sum(t.numel() * t.element_size() for t in tensors if t is not None))


def masked_fraction(mask: torch.Tensor) -> float:
    return float(mask.float().mean())


def _blend_traffic(tokens, mask, mask_token):
    kept = 1.0 - masked_fraction(mask)
    forward = kept * nbytes(tokens) + nbytes(mask, mask_token) + nbytes(tokens)
    backward = nbytes(tokens) + nbytes(mask) + nbytes(tokens) + nbytes(mask_token)  # grad_out in, grads out
    return forward, 0.0, backward, 0.0


def _patch_embed_traffic(image, mask, weight, bias, mask_token, pos_embed=None, norm_weight=None, norm_bias=None,
                         norm_eps=1e-5):
    batch, channels, height, width = image.shape
    dim, patch = weight.shape[0], weight.shape[-1]
    tokens = batch * (height // patch) * (width // patch)
    kept = 1.0 - masked_fraction(mask)  # masked patches' pixels are replaced, never needed
    out = tokens * dim * image.element_size()
    params = nbytes(weight, bias, mask_token, pos_embed, norm_weight, norm_bias)
    gemm = 2.0 * kept * tokens * dim * channels * patch * patch
    forward = kept * nbytes(image) + nbytes(mask) + params + out
    backward = out + kept * nbytes(image) + nbytes(mask) + 2 * params  # weight grad: image re-read, no image grad
    return forward, gemm, backward, gemm


def _attention_traffic(q, k, v, bias=None, window_mask=None, scale=None, dropout_p=0.0):
    batch, heads, tokens, head_dim = q.shape
    matmuls = 4.0 * batch * heads * tokens * tokens * head_dim
    log_sum_exp = batch * heads * tokens * 4.0  # fp32 per row, the one statistic the backward needs
    forward = nbytes(q, k, v, bias, window_mask) + nbytes(q)
    backward = 5 * nbytes(q) + log_sum_exp + nbytes(bias, window_mask) + 3 * nbytes(q) + nbytes(bias)
    return forward, matmuls, backward, 2.5 * matmuls


def _l1_loss_traffic(reconstruction, target, mask, patch_size, in_chans, shuffle_stride=1):
    masked = masked_fraction(mask)  # the loss reads only masked pixels; the gradient is written dense
    forward = masked * nbytes(reconstruction, target) + nbytes(mask)
    backward = masked * nbytes(reconstruction, target) + nbytes(mask) + nbytes(reconstruction)
    return forward, 0.0, backward, 0.0


def _decoder_loss_traffic(features, mask, weight, bias, target, encoder_stride, patch_size, in_chans,
                          norm_target_patch_size=None):
    batch, channels, side, _ = features.shape
    cells_per_side = encoder_stride // patch_size
    grid = mask.view(batch, side, cells_per_side, side, cells_per_side)
    active = grid.amax(dim=(2, 4)).float()  # feature cells with any masked pixel
    decoded_cells = float(active.mean())
    target_read = masked_fraction(mask)
    if norm_target_patch_size:  # the normalised target reads the cells within the window's reach of an active one
        reach = -(-(norm_target_patch_size // 2) // encoder_stride)
        target_read = float(torch.nn.functional.max_pool2d(active, 2 * reach + 1, 1, reach).mean())
    gemm = 2.0 * decoded_cells * batch * side * side * channels * weight.shape[0]
    reads = decoded_cells * nbytes(features) + target_read * nbytes(target) + nbytes(mask, weight, bias)
    backward = reads + nbytes(features, weight, bias)  # dense feature gradient, weight and bias gradients
    return reads, gemm, backward, 2 * gemm


TRAFFIC = {
    "mask_token_blend": _blend_traffic,
    "masked_patch_embed": _patch_embed_traffic,
    "attention": _attention_traffic,
    "window_attention": _attention_traffic,
    "masked_l1_loss": _l1_loss_traffic,
    "masked_decoder_loss": _decoder_loss_traffic,
}


def traffic(op: str, args: Dict[str, object], mode: str) -> Tuple[float, float]:
    """(bytes, FLOPs) a fused implementation must move and compute for ``op`` in ``mode``."""
    forward_bytes, forward_flops, backward_bytes, backward_flops = TRAFFIC[op](**args)
    if mode == "forward":
        return forward_bytes, forward_flops
    if mode == "backward":
        return backward_bytes, backward_flops
    if mode == "forward+backward":
        return forward_bytes + backward_bytes, forward_flops + backward_flops
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
