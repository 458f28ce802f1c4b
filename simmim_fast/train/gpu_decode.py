"""Optional GPU JPEG decoding: the CPU reads the file's bytes and draws the crop and flip (the same
draws as ``data.FastCrop``); ``torchvision.io.decode_jpeg`` decodes on CUDA (nvJPEG) and the crop,
the antialiased bilinear resize and the flip run there too.

``gpu_decode_unavailable_reason(device)`` says why it cannot run (no CUDA, no torchvision, a
torchvision without CUDA decoding); callers then keep the CPU path and print the reason.
"""
from __future__ import annotations

import io
from typing import Dict, List, Optional

import torch

from .data import PretrainDataset, crop_and_flip


def _tiny_jpeg() -> torch.Tensor:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buffer, format="JPEG")
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def gpu_decode_unavailable_reason(device: torch.device) -> Optional[str]:
    """None when JPEGs can be decoded on ``device``, else why not (one line)."""
    if device.type != "cuda":
        return f"GPU JPEG decoding needs a CUDA device, this run is on {device.type}"
    try:
        from torchvision.io import decode_jpeg
    except ImportError as error:
        return f"torchvision is not installed ({error}); pip install torchvision matching torch {torch.__version__}"
    try:
        decode_jpeg(_tiny_jpeg(), device=device)
    except Exception as error:  # a CPU-only torchvision build, or nvJPEG missing from the driver
        return f"torchvision.io.decode_jpeg cannot decode on {device}: {str(error).splitlines()[0]}"
    return None


class EncodedCrop:
    """The CPU side: the file's bytes and the crop box and flip, no decoding. JPEG files only."""

    def __call__(self, image, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        if image.format != "JPEG":
            raise ValueError(f"GPU decoding takes JPEG files only, this one is {image.format}")
        (left, top, crop_w, crop_h), flip = crop_and_flip(image.width, image.height, generator)
        image.fp.seek(0)
        return {"jpeg": torch.frombuffer(bytearray(image.fp.read()), dtype=torch.uint8),
                "box": torch.tensor([left, top, crop_w, crop_h]), "flip": torch.tensor(flip)}


class GpuJpegCrop:
    """Batches of ``EncodedCrop`` samples to (B, 3, S, S) uint8 crops on ``device``."""

    def __init__(self, img_size: int, device: torch.device):
        self.img_size = img_size
        self.device = device

    def dataset(self, source, seed: int) -> PretrainDataset:
        return PretrainDataset(source, EncodedCrop(), seed)

    @staticmethod
    def collate_crops(samples: List[Dict]) -> List[Dict]:
        """The file bytes differ in length: a batch stays a list."""
        return samples

    def crops(self, samples: List[Dict]) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        decoded = decode_jpeg([sample["jpeg"] for sample in samples], mode=ImageReadMode.RGB, device=self.device)
        out = []
        for image, sample in zip(decoded, samples):
            left, top, crop_w, crop_h = sample["box"].tolist()
            crop = image[None, :, top:top + crop_h, left:left + crop_w].float()
            # antialias=True: the same triangle filter widened by the scale as Pillow's BILINEAR.
            crop = torch.nn.functional.interpolate(crop, size=(self.img_size, self.img_size), mode="bilinear",
                                                   align_corners=False, antialias=True)
            out.append(crop.flip(-1) if bool(sample["flip"]) else crop)
        return torch.cat(out).round_().clamp_(0, 255).to(torch.uint8)
