"""Pretraining data: any folder of images (or the embedded scenes), the original SimMIM transform
and masks, and a resumable, distributed sampling order.

Every random choice for a sample (crop, flip, mask, replacement of an unreadable file) comes from a
generator seeded by (seed, epoch, index), so a sample is the same whatever the worker count, the
process count or an interruption: this is what makes resumes bit-exact and a 2-process run see
the same global batches as a 1-process run.
"""
from __future__ import annotations

import math
import os
import warnings
from itertools import islice
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..masking import MaskGenerator
from .scenes import render_scene

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SCENE_COUNT = 512
# A sample whose file cannot be read is replaced by another random file; this many failures in a
# row for one sample means the data is broken, not a few bad files.
MAX_UNREADABLE_PER_SAMPLE = 8
UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def find_images(root) -> List[Path]:
    """Every image file under ``root``, any nesting (ImageFolder's class folders included), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such directory")
    found = []
    for folder, _, names in os.walk(root, followlinks=True):
        found.extend(Path(folder) / name for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise ValueError(f"--data {root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it or its subfolders")
    return sorted(found)


class ImageFiles:
    """Images read from disk with Pillow."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self):
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB")

    def describe(self, index: int) -> str:
        return str(self.paths[index])


class EmbeddedScenes:
    """The embedded default dataset (``scenes.render_scene``), drawn once in memory."""

    def __init__(self, count: int = DEFAULT_SCENE_COUNT):
        self.images = [render_scene(index) for index in range(count)]

    def __len__(self):
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        return self.images[index]

    def describe(self, index: int) -> str:
        return f"embedded scene {index}"


def open_image_source(data_path: Optional[str]):
    return ImageFiles(find_images(data_path)) if data_path else EmbeddedScenes()


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(generator: torch.Generator, high: int) -> int:
    return int(torch.randint(high, (), generator=generator))


def random_resized_crop_box(width: int, height: int, generator: torch.Generator, scale=(0.67, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """(left, top, crop width, crop height): torchvision's RandomResizedCrop sampling rule, 10 tries
    at a random area and aspect ratio, else a centre crop clamped to the ratio range."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return _randint(generator, width - crop_w + 1), _randint(generator, height - crop_h + 1), crop_w, crop_h
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_w, crop_h = int(round(height * max(ratio))), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    """ToTensor + Normalize(ImageNet mean, std): (3, H, W) float32."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixels - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Normalised (..., 3, H, W) back to [0, 1] pixels."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


class SimMIMTransform:
    """The original SimMIM pretraining transform: RGB, RandomResizedCrop(img_size, scale=(0.67, 1),
    ratio=(3/4, 4/3)), horizontal flip, ImageNet normalisation; plus the sample's mask."""

    def __init__(self, img_size: int, mask_generator: MaskGenerator):
        self.img_size = img_size
        self.mask_generator = mask_generator

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        left, top, crop_w, crop_h = random_resized_crop_box(image.width, image.height, generator)
        image = image.resize((self.img_size, self.img_size), Image.BILINEAR,
                             box=(left, top, left + crop_w, top + crop_h))
        if torch.rand((), generator=generator) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        mask = self.mask_generator.generate(1, generator=generator)[0]
        return to_normalized_tensor(image), mask


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class PretrainDataset(Dataset):
    """Indexed by (epoch, index) keys from ``EpochSampler``; a sample is a dict with 'image', 'mask' and
    'unreadable' (indices of files that failed to load for it, padded with -1)."""

    def __init__(self, source, transform: SimMIMTransform, seed: int):
        self.source = source
        self.transform = transform
        self.seed = seed

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        epoch, index = key
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        unreadable = torch.full((MAX_UNREADABLE_PER_SAMPLE,), -1, dtype=torch.long)
        for attempt in range(MAX_UNREADABLE_PER_SAMPLE):
            try:
                image = self.source.load(index)
            except UNREADABLE_ERRORS as error:
                warnings.warn(f"skipping unreadable image {self.source.describe(index)}: {error}")
                unreadable[attempt] = index
                index = _randint(generator, len(self.source))
                continue
            image, mask = self.transform(image, generator)
            return {"image": image, "mask": mask, "unreadable": unreadable}
        raise RuntimeError(f"{MAX_UNREADABLE_PER_SAMPLE} unreadable images in a row (last: "
                           f"{self.source.describe(index)}); is the data folder readable?")


class EpochSampler(Sampler):
    """DistributedSampler's order (a permutation seeded by seed + epoch, split across ranks, tail
    dropped so every rank gets as many) as (epoch, index) keys, optionally starting mid-epoch."""

    def __init__(self, dataset: Dataset, world_size: int, rank: int, seed: int):
        self.order = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                        drop_last=True)
        self.epoch = 0
        self.skip = 0

    def set_position(self, epoch: int, skip: int = 0):
        """Yield epoch ``epoch``'s keys after the first ``skip`` of this rank."""
        self.order.set_epoch(epoch)
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        return ((self.epoch, index) for index in islice(iter(self.order), self.skip, None))

    def __len__(self):
        return len(self.order) - self.skip

    @property
    def samples_per_epoch(self) -> int:
        return len(self.order)


def build_loader(dataset: PretrainDataset, batch_size: int, world_size: int, rank: int, seed: int,
                 num_workers: int, pin_memory: bool) -> DataLoader:
    sampler = EpochSampler(dataset, world_size, rank, seed)
    if sampler.samples_per_epoch < batch_size:
        raise ValueError(f"{len(dataset)} images give {sampler.samples_per_epoch} per process, fewer than one "
                         f"batch of {batch_size}; lower --batch-size or add images")
    # The loader's own generator keeps worker seeding off the global torch RNG (drop path uses it).
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def center_view(image: Image.Image, size: int, resize: Optional[int] = None) -> torch.Tensor:
    """The shorter side resized to ``resize`` (default ``size``), then the centre ``size`` square: the view
    for reconstruction pictures and, with resize = 256/224 x size, the original's evaluation view."""
    resize = resize or size
    scale = resize / min(image.width, image.height)
    width, height = max(resize, round(image.width * scale)), max(resize, round(image.height * scale))
    image = image.resize((width, height), Image.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return to_normalized_tensor(image.crop((left, top, left + size, top + size)))
