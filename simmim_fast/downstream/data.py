"""Labelled images for fine-tuning and probes: an ImageFolder tree (DATA_PATH/train/<class>/...,
DATA_PATH/val/<class>/..., the original's layout) or, without a path, the embedded scenes labelled by
their kind, scenes 0-511 (what the demo pretraining saw, unlabelled) for training and 512-767 held out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..train.data import (DEFAULT_SCENE_COUNT, UNREADABLE_ERRORS, center_view, find_images, random_resized_crop_box,
                          sample_seed, to_normalized_tensor)
from ..train.scenes import render_scene, scene_label
from .augment import RandAugment, random_erasing

HELD_OUT_SCENES = 256
SPLITS = ("train", "val")
# The original evaluates a centre crop of the image resized to 256/224 of the input size.
EVAL_RESIZE_RATIO = 256 / 224


class LabelledFolder:
    """ImageFolder layout: one sub-folder per class (sorted names = class ids), images at any depth."""

    def __init__(self, root, classes: Optional[Sequence[str]] = None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such directory (expected class folders, ImageFolder layout)")
        found = sorted(child.name for child in root.iterdir() if child.is_dir())
        if classes is None:
            if len(found) < 2:
                raise ValueError(f"{root}: {len(found)} class folder(s) ({', '.join(found) or 'none'}); a labelled "
                                 "folder needs at least 2 (ImageFolder layout: one sub-folder per class)")
            classes = found
        else:
            missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            if missing or extra:
                raise ValueError(f"{root}: its class folders differ from the training split's: "
                                 + "; ".join(part for part in (f"missing {', '.join(missing)}" if missing else "",
                                                               f"not in training {', '.join(extra)}" if extra else "")
                                             if part))
        self.root = root
        self.classes = list(classes)
        self.samples: List[Tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            try:
                self.samples.extend((path, label) for path in find_images(root / name))
            except ValueError:
                raise ValueError(f"{root / name}: class folder without image files") from None
        self.labels = [label for _, label in self.samples]

    def __len__(self):
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except UNREADABLE_ERRORS as error:
            raise ValueError(f"unreadable image {path}: {error}") from None

    def describe(self, index: int) -> str:
        return str(self.samples[index][0])


class LabelledScenes:
    """The embedded scenes with their kind as label; 'train' = scenes 0-511, 'val' = the next 256."""

    def __init__(self, split: str):
        first, count = (0, DEFAULT_SCENE_COUNT) if split == "train" else (DEFAULT_SCENE_COUNT, HELD_OUT_SCENES)
        self.indices = list(range(first, first + count))
        self.classes = sorted({scene_label(index) for index in range(4)})
        self.labels = [self.classes.index(scene_label(index)) for index in self.indices]
        self.images = [render_scene(index) for index in self.indices]

    def __len__(self):
        return len(self.indices)

    def load(self, index: int) -> Image.Image:
        return self.images[index]

    def describe(self, index: int) -> str:
        return f"embedded scene {self.indices[index]}"


def open_labelled(data_path: Optional[str], split: str, classes: Optional[Sequence[str]] = None):
    """The ``split`` ('train' or 'val') of DATA_PATH, or of the embedded scenes when it is empty."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not data_path:
        return LabelledScenes(split)
    return LabelledFolder(Path(data_path) / split, classes)


def open_splits(data_path: Optional[str]):
    """(train, val) sources with the same classes; the error names what is missing."""
    if data_path and not Path(data_path).is_dir():
        raise FileNotFoundError(f"--data {data_path}: no such directory (expected train/ and val/ inside)")
    train = open_labelled(data_path, "train")
    return train, open_labelled(data_path, "val", train.classes)


class FinetuneTransform:
    """The original fine-tuning transform (timm's create_transform as SimMIM calls it):
    RandomResizedCrop(scale 0.08-1, bicubic), horizontal flip, RandAugment, normalise, random erasing."""

    def __init__(self, img_size: int, auto_augment: str, erase_probability: float):
        self.img_size = img_size
        self.rand_augment = None if auto_augment in ("", "none", None) else RandAugment.from_spec(auto_augment)
        self.erase_probability = erase_probability

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        left, top, crop_w, crop_h = random_resized_crop_box(image.width, image.height, generator, scale=(0.08, 1.0))
        box = (left, top, left + crop_w, top + crop_h)
        image = image.resize((self.img_size, self.img_size), Image.BICUBIC, box=box)
        if torch.rand((), generator=generator) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:
            image = self.rand_augment(image, generator)
        pixels = to_normalized_tensor(image)
        if self.erase_probability > 0:
            pixels = random_erasing(pixels, generator, self.erase_probability)
        return pixels


def eval_view(image: Image.Image, img_size: int, crop: bool = True) -> torch.Tensor:
    """TEST.CROP: resize to 256/224 of the size and take the centre; else resize to the size."""
    if crop:
        return center_view(image, img_size, resize=int(EVAL_RESIZE_RATIO * img_size))
    return to_normalized_tensor(image.resize((img_size, img_size), Image.BICUBIC))


class TrainingSet(Dataset):
    """Augmented samples keyed by (epoch, index) (``train.data.EpochSampler``): each sample's draws
    come from a generator seeded by (seed, epoch, index), so resumes repeat them exactly."""

    def __init__(self, source, transform: FinetuneTransform, seed: int):
        self.source, self.transform, self.seed = source, transform, seed

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        epoch, index = key
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        return {"image": self.transform(self.source.load(index), generator),
                "label": torch.tensor(self.source.labels[index])}


class EvalSet(Dataset):
    """The evaluation view of every image, with its label."""

    def __init__(self, source, img_size: int, crop: bool = True):
        self.source, self.img_size, self.crop = source, img_size, crop

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {"image": eval_view(self.source.load(index), self.img_size, self.crop),
                "label": torch.tensor(self.source.labels[index])}


def write_scene_folder(root, train_count: int = DEFAULT_SCENE_COUNT, val_count: int = HELD_OUT_SCENES) -> Path:
    """The labelled scenes as PNG files in ImageFolder layout (root/train/<kind>/, root/val/<kind>/)."""
    root = Path(root)
    for split, first, count in (("train", 0, train_count), ("val", DEFAULT_SCENE_COUNT, val_count)):
        for index in range(first, first + count):
            folder = root / split / scene_label(index)
            folder.mkdir(parents=True, exist_ok=True)
            render_scene(index).save(folder / f"scene_{index:05d}.png")
    return root
