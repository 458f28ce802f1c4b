"""Pretraining data: any folder of images, a ``prepare-data`` store or the embedded scenes; the
original SimMIM transform (the reference) and the training one (``FastCrop``: uint8, draft JPEG
decoding); and a resumable, distributed sampling order.

Every random choice for a sample (crop, flip, replacement of an unreadable file) comes from a
generator seeded by (seed, epoch, index), so a sample is the same whatever the worker count, the
process count or an interruption: this is what makes resumes bit-exact and a 2-process run see
the same global batches as a 1-process run. The training masks are drawn on the device per step
(``device_batches``), keyed the same way.
"""
from __future__ import annotations

import math
import os
import warnings
from itertools import chain, islice
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


def find_images(root, flag: str = "--data") -> List[Path]:
    """Every image file under ``root``, any nesting (ImageFolder's class folders included), sorted;
    errors name the command-line argument ``flag`` that gave the folder.

    Symbolic links are followed, but each real folder is entered once and each real file listed once
    (under its first path in sorted order), so a link loop or a linked copy does not repeat files."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{flag} {root}: no such directory")
    seen_folders, by_real_path, repeats = set(), {}, 0
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real_folder = os.path.realpath(folder)
        if real_folder in seen_folders:
            subfolders[:] = []
            repeats += 1
            continue
        seen_folders.add(real_folder)
        subfolders.sort()
        for name in sorted(names):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                path = Path(folder) / name
                real = os.path.realpath(path)
                repeats += real in by_real_path
                by_real_path[real] = min(path, by_real_path.get(real, path))
    if not by_real_path:
        raise ValueError(f"{flag} {root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it or its subfolders")
    if repeats:
        warnings.warn(f"{flag} {root}: {repeats} folder(s) or file(s) reached again through symbolic links were "
                      f"listed once ({len(by_real_path)} distinct image files)")
    return sorted(by_real_path.values())


def as_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB. 16-bit greys (PNG, TIFF: modes I;16* and I) are scaled by 255/65535;
    Pillow's own conversion clips them at 255, which turns them almost white."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


class ImageFiles:
    """Images read from disk with Pillow."""

    def __init__(self, paths: Sequence[Path], root=None):
        self.paths = list(paths)
        self.root = root

    def __len__(self):
        return len(self.paths)

    def open(self, index: int) -> Image.Image:
        """The file opened lazily: its size and format are known, its pixels not decoded yet."""
        return Image.open(self.paths[index])

    def describe(self, index: int) -> str:
        return str(self.paths[index])


class EmbeddedScenes:
    """The embedded default dataset (``scenes.render_scene``), drawn once in memory."""

    root = None

    def __init__(self, count: int = DEFAULT_SCENE_COUNT):
        self.images = [render_scene(index) for index in range(count)]

    def __len__(self):
        return len(self.images)

    def open(self, index: int) -> Image.Image:
        return self.images[index]

    def describe(self, index: int) -> str:
        return f"embedded scene {index}"


def decode(image: Image.Image) -> Image.Image:
    """Decode all pixels now; a truncated or corrupt file raises here (one of ``UNREADABLE_ERRORS``)."""
    image.load()
    return image


def require_readable(source, probes: int = 16) -> None:
    """ValueError naming the folder and the count when no image of ``source`` can be decoded.
    A few files spread over the list are tried first; all of them only when those all fail."""
    spread = np.unique(np.linspace(0, len(source) - 1, min(probes, len(source))).astype(int)).tolist()
    probed = set(spread)
    for index in chain(spread, (i for i in range(len(source)) if i not in probed)):
        try:
            with source.open(index) as image:
                decode(image)
            return
        except UNREADABLE_ERRORS as error:
            last_error = f"{source.describe(index)}: {error}"
    raise ValueError(f"--data {source.root}: none of its {len(source)} image files can be read "
                     f"(last: {last_error})")


def open_image_source(data_path: Optional[str]):
    """The embedded scenes, a folder of images, or a folder written by ``prepare-data``; the data must
    have at least one readable image."""
    if not data_path:
        return EmbeddedScenes()
    from .prepared import PreparedImages, is_prepared

    source = PreparedImages(data_path) if is_prepared(data_path) else ImageFiles(find_images(data_path), data_path)
    require_readable(source)
    return source


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(generator: torch.Generator, high: int) -> int:
    return int(torch.randint(high, (), generator=generator))


def _offset(generator: torch.Generator, slack: int) -> int:
    """Uniform in 0..slack, as torchvision's randint(0, slack + 1), but from one uniform float: the
    same draw gives the same relative position in a larger or smaller copy of the image (the
    prepared store), so its samples stay comparable one for one with the original files'."""
    return min(int(_uniform(generator, 0.0, slack + 1.0)), slack)


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
            return _offset(generator, width - crop_w), _offset(generator, height - crop_h), crop_w, crop_h
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


def crop_and_flip(width: int, height: int, generator: torch.Generator) -> Tuple[Tuple[int, int, int, int], bool]:
    """The random geometry of a sample, in the original's draw order: the crop box, then the flip."""
    crop = random_resized_crop_box(width, height, generator)
    return crop, bool(torch.rand((), generator=generator) < 0.5)


class SimMIMTransform:
    """The original SimMIM pretraining transform, as the original computes it: the whole image decoded
    to RGB, RandomResizedCrop(img_size, scale=(0.67, 1), ratio=(3/4, 4/3)) with Pillow's bilinear
    filter, horizontal flip, ImageNet normalisation to float32 on the CPU; plus the sample's mask.
    The reference of ``FastCrop`` (tests, and the "original" path of the data benchmark)."""

    def __init__(self, img_size: int, mask_generator: MaskGenerator):
        self.img_size = img_size
        self.mask_generator = mask_generator

    def __call__(self, image: Image.Image, generator: torch.Generator, epoch: int = 0) -> Dict[str, torch.Tensor]:
        image = as_rgb(decode(image))
        (left, top, crop_w, crop_h), flip = crop_and_flip(image.width, image.height, generator)
        image = image.resize((self.img_size, self.img_size), Image.BILINEAR,
                             box=(left, top, left + crop_w, top + crop_h))
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        mask = self.mask_generator.generate(1, generator=generator, epoch=epoch)[0]  # epoch: ratio schedules
        return {"image": to_normalized_tensor(image), "mask": mask}


# Pillow's resize first box-averages by whole factors while the crop is at least this many times the
# output ("reducing_gap"); at 2.0 the result stays within a few grey levels of the exact filter.
REDUCING_GAP = 2.0


class FastCrop:
    """The training transform: the same crop and flip as ``SimMIMTransform`` (same draws from the same
    generator), as a (3, S, S) uint8 tensor. Normalisation and masks are left to the device
    (``device_batches``), so a sample costs one decode, one resize and one 150 KB copy.

    JPEGs are decoded at 1/2, 1/4 or 1/8 scale (Pillow's ``draft``, libjpeg's DCT scaling) when the crop
    stays at least ``img_size`` pixels wide and high at that scale: the output is then still a
    downscale, as in the original, and decoding costs up to 64x less."""

    def __init__(self, img_size: int, draft: bool = True, reducing_gap: Optional[float] = REDUCING_GAP):
        self.img_size = img_size
        self.draft = draft
        self.reducing_gap = reducing_gap

    def _draft_scale(self, image: Image.Image, crop_w: int, crop_h: int) -> float:
        """Ask libjpeg for the smallest decode that keeps the crop >= img_size; the scale it chose (1 if none)."""
        if not self.draft or image.format != "JPEG":
            return 1.0
        largest = min(crop_w, crop_h) // self.img_size
        factor = next((f for f in (8, 4, 2) if f <= largest), 1)
        if factor == 1:
            return 1.0
        # Pillow picks the largest of 8, 4, 2 that divides the image by at least the requested size.
        original_width = image.width
        chosen = image.draft(None, (original_width // factor, image.height // factor))
        return 1.0 if chosen is None else original_width / chosen[1][2]

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        (left, top, crop_w, crop_h), flip = crop_and_flip(image.width, image.height, generator)
        scale = self._draft_scale(image, crop_w, crop_h)
        image = decode(image)
        if image.mode not in ("RGB", "L"):  # L is resized as is and converted after (cheaper, same values)
            image = as_rgb(image)
        box = (left / scale, top / scale, (left + crop_w) / scale, (top + crop_h) / scale)
        image = image.resize((self.img_size, self.img_size), Image.BILINEAR, box=box, reducing_gap=self.reducing_gap)
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(as_rgb(image)))  # (S, S, 3): np.array makes it writable
        return {"image": pixels.permute(2, 0, 1)}  # the batch's stack copies it once, to (B, 3, S, S)


def sample_seed(seed: int, *key: int) -> int:
    """A 63-bit seed from (seed, *key): (seed, epoch, index) for a sample's random choices."""
    return int(np.random.SeedSequence([seed, *key]).generate_state(1, np.uint64)[0] >> 1)


class PretrainDataset(Dataset):
    """Indexed by (epoch, index) keys from ``EpochSampler``; a sample is the transform's dict ('image',
    and 'mask' for ``SimMIMTransform``) plus 'unreadable' (indices of files that failed to load for it,
    padded with -1)."""

    def __init__(self, source, transform, seed: int):
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
            state = generator.get_state()
            try:
                with self.source.open(index) as image:
                    sample = self.transform(image, generator)
            except UNREADABLE_ERRORS as error:
                warnings.warn(f"skipping unreadable image {self.source.describe(index)}: {error}")
                unreadable[attempt] = index
                generator.set_state(state)  # the replacement's draws do not depend on where the failure came
                index = _randint(generator, len(self.source))
                continue
            sample["unreadable"] = unreadable
            return sample
        raise ValueError(f"{MAX_UNREADABLE_PER_SAMPLE} unreadable images in a row (last: "
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
                 num_workers: int, pin_memory: bool, collate_fn=None) -> DataLoader:
    sampler = EpochSampler(dataset, world_size, rank, seed)
    if sampler.samples_per_epoch < batch_size:
        raise ValueError(f"{len(dataset)} images give {sampler.samples_per_epoch} per process, fewer than one "
                         f"batch of {batch_size}; lower --batch-size or add images")
    # The loader's own generator keeps worker seeding off the global torch RNG (drop path uses it).
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True, persistent_workers=num_workers > 0, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(seed))


def center_view_geometry(width: int, height: int, size: int, resize: int) -> Tuple[int, int, int, int]:
    """(resized width, resized height, left, top) of ``center_view``, in torchvision's arithmetic: Resize(int)
    makes the shorter side ``resize`` and the longer int(resize x longer / shorter); CenterCrop's offsets
    are int(round((side - size) / 2)) (Python's round: halves to even)."""
    if width <= height:
        new_width, new_height = resize, int(resize * height / width)
    else:
        new_width, new_height = int(resize * width / height), resize
    return new_width, new_height, int(round((new_width - size) / 2.0)), int(round((new_height - size) / 2.0))


def center_view(image: Image.Image, size: int, resize: Optional[int] = None) -> torch.Tensor:
    """The shorter side resized to ``resize`` (default ``size``, at least ``size``), then the centre ``size``
    square, as torchvision's Resize + CenterCrop (bicubic): the view for reconstruction pictures and, with
    resize = int(256/224 x size), the original's evaluation view."""
    resize = resize or size
    if resize < size:
        raise ValueError(f"center_view: resize {resize} is smaller than the crop {size}")
    width, height, left, top = center_view_geometry(image.width, image.height, size, resize)
    image = image.resize((width, height), Image.BICUBIC)  # Pillow copies an image already at that size
    return to_normalized_tensor(image.crop((left, top, left + size, top + size)))
