"""The original fine-tuning augmentation, torch + Pillow only (timm needs torchvision, which does not
load beside every torch build): RandAugment 'rand-m9-mstd0.5-inc1', random erasing (p=0.25, per-pixel
noise), Mixup 0.8 / CutMix 1.0 per batch with label smoothing. The rules are timm's (the original
calls ``timm.data.create_transform`` and ``timm.data.Mixup``); tests/test_downstream_timm.py checks
them against timm itself. Every draw comes from a ``torch.Generator`` the caller seeds, so a sample's
augmentation is the same whatever the workers and across a resume.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitudes are in [0, 10]
FILL = (124, 116, 104)  # ImageNet mean in 0-255: what geometric ops expose (timm's img_mean)
# The geometric ops' filter: create_transform(interpolation='bicubic') hands timm's RandAugment that one
# filter for every op (timm draws bilinear or bicubic per op only when given no interpolation).
RESAMPLE = Image.BICUBIC


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _solarize_add(image: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, value + add) if value < threshold else value for value in range(256)]
    return image.point(lut * len(image.getbands()))


def _posterize(image: Image.Image, bits: int) -> Image.Image:
    """Keep the ``bits`` high bits of each channel; 0 bits gives black (Pillow's posterize refuses 0,
    which the increasing level rule reaches at magnitude 10)."""
    if bits >= 8:
        return image
    mask = ~(2 ** (8 - bits) - 1) & 0xFF
    return image.point([value & mask for value in range(256)] * len(image.getbands()))


def _affine(image: Image.Image, matrix, resample) -> Image.Image:
    return image.transform(image.size, Image.AFFINE, matrix, resample=resample, fillcolor=FILL)


# name -> (level in [0, 10] and a random sign -> the op's argument, op(image, argument, resample)).
# The level-to-argument rules are timm's 'increasing' RandAugment ones.
RAND_AUGMENT_OPS: Dict[str, Tuple[Optional[Callable[[float, float], float]], Callable]] = {
    "AutoContrast": (None, lambda image, _, __: ImageOps.autocontrast(image)),
    "Equalize": (None, lambda image, _, __: ImageOps.equalize(image)),
    "Invert": (None, lambda image, _, __: ImageOps.invert(image)),
    "Rotate": (lambda level, sign: sign * level / MAX_LEVEL * 30.0,
               lambda image, degrees, resample: image.rotate(degrees, resample=resample, fillcolor=FILL)),
    "PosterizeIncreasing": (lambda level, _: 4 - int(level / MAX_LEVEL * 4),
                            lambda image, bits, _: _posterize(image, bits)),
    "SolarizeIncreasing": (lambda level, _: 256 - min(256, int(level / MAX_LEVEL * 256)),
                           lambda image, threshold, _: ImageOps.solarize(image, threshold)),
    "SolarizeAdd": (lambda level, _: min(128, int(level / MAX_LEVEL * 110)),
                    lambda image, add, _: _solarize_add(image, add)),
    "ColorIncreasing": (lambda level, sign: max(0.1, 1.0 + sign * level / MAX_LEVEL * 0.9),
                        lambda image, factor, _: ImageEnhance.Color(image).enhance(factor)),
    "ContrastIncreasing": (lambda level, sign: max(0.1, 1.0 + sign * level / MAX_LEVEL * 0.9),
                           lambda image, factor, _: ImageEnhance.Contrast(image).enhance(factor)),
    "BrightnessIncreasing": (lambda level, sign: max(0.1, 1.0 + sign * level / MAX_LEVEL * 0.9),
                             lambda image, factor, _: ImageEnhance.Brightness(image).enhance(factor)),
    "SharpnessIncreasing": (lambda level, sign: max(0.1, 1.0 + sign * level / MAX_LEVEL * 0.9),
                            lambda image, factor, _: ImageEnhance.Sharpness(image).enhance(factor)),
    "ShearX": (lambda level, sign: sign * level / MAX_LEVEL * 0.3,
               lambda image, shear, resample: _affine(image, (1, shear, 0, 0, 1, 0), resample)),
    "ShearY": (lambda level, sign: sign * level / MAX_LEVEL * 0.3,
               lambda image, shear, resample: _affine(image, (1, 0, 0, shear, 1, 0), resample)),
    "TranslateXRel": (lambda level, sign: sign * level / MAX_LEVEL * 0.45,
                      lambda image, pct, resample: _affine(image, (1, 0, pct * image.size[0], 0, 1, 0), resample)),
    "TranslateYRel": (lambda level, sign: sign * level / MAX_LEVEL * 0.45,
                      lambda image, pct, resample: _affine(image, (1, 0, 0, 0, 1, pct * image.size[1]), resample)),
}


def apply_op(image: Image.Image, name: str, level: float, sign: float = 1.0) -> Image.Image:
    """One RandAugment op at ``level`` (0-10) with the given sign for the symmetric ones."""
    level_to_arg, op = RAND_AUGMENT_OPS[name]
    return op(image, level_to_arg(level, sign) if level_to_arg is not None else None, RESAMPLE)


class RandAugment:
    """timm's rand-m{magnitude}-mstd{magnitude_std}-inc1: ``layers`` ops drawn with replacement, each
    applied with probability ``prob`` at a magnitude ~ N(magnitude, magnitude_std) clipped to [0, 10],
    geometric ops filtered bicubically (``RESAMPLE``), as the original's transform."""

    def __init__(self, magnitude: float = 9.0, magnitude_std: float = 0.5, layers: int = 2, prob: float = 0.5):
        self.magnitude, self.magnitude_std, self.layers, self.prob = magnitude, magnitude_std, layers, prob
        self.names = list(RAND_AUGMENT_OPS)

    @classmethod
    def from_spec(cls, spec: str) -> "RandAugment":
        """'rand-m9-mstd0.5-inc1' (AUG.AUTO_AUGMENT); only the increasing op set exists here."""
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"AUG.AUTO_AUGMENT must be a 'rand-...' RandAugment spec or 'none', got {spec!r}")
        settings = {"m": 9.0, "mstd": 0.0, "n": 2, "inc": 1}
        for part in parts[1:]:
            key = next((name for name in ("mstd", "inc", "m", "n") if part.startswith(name)), None)
            if key is None:
                raise ValueError(f"AUG.AUTO_AUGMENT {spec!r}: unknown part {part!r} (known: m, mstd, n, inc)")
            settings[key] = float(part[len(key):])
        if not settings["inc"]:
            raise ValueError(f"AUG.AUTO_AUGMENT {spec!r}: only the increasing op set (inc1) is implemented")
        return cls(settings["m"], settings["mstd"], int(settings["n"]))

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Image.Image:
        for _ in range(self.layers):
            name = self.names[int(torch.randint(len(self.names), (), generator=generator))]
            if _uniform(generator) > self.prob:
                continue
            level = self.magnitude
            if self.magnitude_std > 0:
                level = self.magnitude + self.magnitude_std * float(torch.randn((), generator=generator))
            level = max(0.0, min(level, MAX_LEVEL))
            sign = -1.0 if _uniform(generator) > 0.5 else 1.0
            image = apply_op(image, name, level, sign)
        return image


def random_erasing(image: torch.Tensor, generator: torch.Generator, probability: float = 0.25,
                   area: Tuple[float, float] = (0.02, 1 / 3),
                   aspect: Tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """timm's RandomErasing(mode='pixel', max_count=1) on a normalised (C, H, W) image: with
    ``probability``, one rectangle of random area and log-uniform aspect gets N(0, 1) noise per pixel."""
    if _uniform(generator) >= probability:
        return image
    channels, height, width = image.shape
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    for _ in range(10):
        target_area = _uniform(generator, *area) * height * width
        ratio = math.exp(_uniform(generator, *log_aspect))
        box_h, box_w = int(round(math.sqrt(target_area * ratio))), int(round(math.sqrt(target_area / ratio)))
        if box_w < width and box_h < height:
            top = int(torch.randint(height - box_h + 1, (), generator=generator))
            left = int(torch.randint(width - box_w + 1, (), generator=generator))
            image = image.clone()
            image[:, top:top + box_h, left:left + box_w] = torch.randn(
                (channels, box_h, box_w), generator=generator, dtype=image.dtype)
            return image
    return image


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """timm's smoothed one-hot: 1 - smoothing + smoothing/K on the label, smoothing/K elsewhere."""
    off = smoothing / num_classes
    return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + off


def cutmix_box(height: int, width: int, lam: float, center_y: int, center_x: int) -> Tuple[int, int, int, int]:
    """timm's rand_bbox with the centre given: a box of side sqrt(1 - lam) x the image, clipped."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    top, bottom = max(center_y - cut_h // 2, 0), min(center_y + cut_h // 2, height)
    left, right = max(center_x - cut_w // 2, 0), min(center_x + cut_w // 2, width)
    return top, bottom, left, right


def mix_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int, smoothing: float, lam: float,
              box: Optional[Tuple[int, int, int, int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mix each sample with the batch reversed (timm's 'batch' mode): a blend with weight ``lam``, or the
    ``box`` pasted (CutMix, ``lam`` then the kept area). Returns new images and soft targets."""
    flipped = images.flip(0)
    if box is None:
        mixed = images * lam + flipped * (1.0 - lam)
    else:  # a mask rather than a slice: the same shapes whatever the box (XLA compiles the step once)
        top, bottom, left, right = box
        rows = torch.arange(images.shape[-2], device=images.device)
        columns = torch.arange(images.shape[-1], device=images.device)
        inside = ((rows >= top) & (rows < bottom))[:, None] & ((columns >= left) & (columns < right))[None, :]
        mixed = torch.where(inside, flipped, images)
    targets = smooth_one_hot(labels, num_classes, smoothing)
    return mixed, targets * lam + targets.flip(0) * (1.0 - lam)


class Mixup:
    """timm's Mixup(mixup_alpha, cutmix_alpha, prob, switch_prob, mode='batch', label_smoothing,
    correct_lam=True), drawing from the generator it is given."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1,
                 cutmix_minmax: Optional[Sequence[float]] = None):
        if cutmix_minmax is not None:
            raise ValueError("AUG.CUTMIX_MINMAX is not supported; use AUG.CUTMIX (an alpha)")
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing

    def _beta(self, alpha: float, generator: torch.Generator) -> float:
        # Beta(a, a) from two Gamma(a) draws, through the generator (torch's Beta sampler takes none).
        concentration = torch.full((2,), alpha, dtype=torch.float64)
        gammas = torch._standard_gamma(concentration, generator=generator)
        return float(gammas[0] / gammas.sum())

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        lam, use_cutmix = 1.0, False
        if _uniform(generator) < self.prob:
            use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or _uniform(generator) < self.switch_prob)
            lam = self._beta(self.cutmix_alpha if use_cutmix else self.mixup_alpha, generator)
        if not use_cutmix:
            return mix_batch(images, labels, self.num_classes, self.label_smoothing, lam)
        height, width = images.shape[-2:]
        center_y = int(torch.randint(height, (), generator=generator))
        center_x = int(torch.randint(width, (), generator=generator))
        box = cutmix_box(height, width, lam, center_y, center_x)
        kept = 1.0 - (box[1] - box[0]) * (box[3] - box[2]) / float(height * width)
        return mix_batch(images, labels, self.num_classes, self.label_smoothing, kept, box)
