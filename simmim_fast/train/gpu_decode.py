"""GPU JPEG decoding (``pretrain --decode gpu|auto``): the loader's workers read each file's bytes and
draw the crop and flip (the same draws as ``data.FastCrop``, from the same per-sample generator);
``torchvision.io.decode_jpeg`` decodes the batch on CUDA (nvJPEG) in the main process, and the crop,
the antialiased bilinear resize and the flip run there too.

``gpu_decode_unavailable_reason(device, source)`` says why it cannot run (not CUDA, no torchvision, a
torchvision without CUDA decoding, data that is not JPEG files); callers then keep the CPU path and
print the reason. Files that are not JPEGs (or not RGB/grey ones: CMYK) are cropped on the CPU by the
worker as ``FastCrop`` does, and a JPEG that nvJPEG rejects is redone on the CPU in the main process
(``FastCrop`` again, with its unreadable-file replacement): every sample of a batch is still the one
the CPU path would train on, in the same place.
"""
from __future__ import annotations

import io
from typing import Dict, List, Optional, Tuple

import torch

from .data import EmbeddedScenes, FastCrop, PretrainDataset, crop_and_flip

DECODE_CHOICES = ("cpu", "gpu", "auto")


def _tiny_jpeg() -> torch.Tensor:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buffer, format="JPEG")
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def gpu_decode_unavailable_reason(device: torch.device, source=None) -> Optional[str]:
    """None when the JPEGs of ``source`` (an image source of ``data``; None: any) can be decoded on
    ``device``, else why not (one line)."""
    if isinstance(source, EmbeddedScenes) or getattr(source, "encoding", "jpeg") != "jpeg":
        what = "the embedded scenes" if isinstance(source, EmbeddedScenes) else "a prepare-data --format raw store"
        return f"the data ({what}) is not JPEG files: nothing to decode"
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


def resolve_decode(choice: str, device: torch.device, source) -> Tuple[str, Optional[str]]:
    """("cpu" or "gpu", the reason GPU decoding was not taken when it was asked for or "auto")."""
    if choice not in DECODE_CHOICES:
        raise ValueError(f"--decode / DATA.DECODE must be one of {', '.join(DECODE_CHOICES)}, got {choice!r}")
    if choice == "cpu":
        return "cpu", None
    reason = gpu_decode_unavailable_reason(device, source)
    return ("cpu", reason) if reason else ("gpu", None)


class EncodedCrop:
    """The worker's side: a JPEG's bytes and its crop box and flip, no decoding; other files (PNG,
    CMYK JPEGs...) cropped here as ``FastCrop`` does (the same draws)."""

    def __init__(self, img_size: int):
        self.cpu_crop = FastCrop(img_size)

    def __call__(self, image, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        if image.format != "JPEG" or image.mode not in ("RGB", "L"):
            return {"cpu_image": self.cpu_crop(image, generator)["image"]}
        (left, top, crop_w, crop_h), flip = crop_and_flip(image.width, image.height, generator)
        image.fp.seek(0)
        return {"jpeg": torch.frombuffer(bytearray(image.fp.read()), dtype=torch.uint8),
                "box": torch.tensor([left, top, crop_w, crop_h]), "flip": torch.tensor(flip)}


class EncodedDataset(PretrainDataset):
    """``PretrainDataset`` of ``EncodedCrop`` samples that also carry their (epoch, index) key, so a
    sample nvJPEG rejects can be redone on the CPU."""

    def __getitem__(self, key: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        sample = super().__getitem__(key)
        sample["key"] = torch.tensor(key)
        return sample


class GpuJpegCrop:
    """Batches of ``EncodedCrop`` samples of ``source`` to (B, 3, S, S) uint8 crops on ``device``."""

    def __init__(self, img_size: int, device: torch.device, source, seed: int):
        self.img_size = img_size
        self.device = device
        self.cpu_dataset = PretrainDataset(source, FastCrop(img_size), seed)  # for samples nvJPEG rejects

    def dataset(self) -> EncodedDataset:
        return EncodedDataset(self.cpu_dataset.source, EncodedCrop(self.img_size), self.cpu_dataset.seed)

    def collate(self, samples: List[Dict]) -> Dict:
        """The file bytes differ in length: they stay a list; the CPU-cropped samples are stacked apart
        with their places in the batch."""
        on_cpu = [index for index, sample in enumerate(samples) if "cpu_image" in sample]
        no_box, no_flip = torch.zeros(4, dtype=torch.long), torch.tensor(False)
        return {"jpeg": [sample.get("jpeg") for sample in samples if "jpeg" in sample],
                "box": torch.stack([sample.get("box", no_box) for sample in samples]),
                "flip": torch.stack([sample.get("flip", no_flip) for sample in samples]),
                "key": torch.stack([sample["key"] for sample in samples]),
                "unreadable": torch.stack([sample["unreadable"] for sample in samples]),
                "cpu_index": torch.tensor(on_cpu, dtype=torch.long),
                "cpu_image": torch.stack([samples[index]["cpu_image"] for index in on_cpu]) if on_cpu else
                torch.empty((0, 3, self.img_size, self.img_size), dtype=torch.uint8)}

    def _decode(self, jpegs: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """Decoded (3, H, W) uint8 images on the device; None for a file nvJPEG cannot decode."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if not jpegs:
            return []
        try:
            return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad file fails the batch call: find it
            decoded = []
            for jpeg in jpegs:
                try:
                    decoded.append(decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    decoded.append(None)
            return decoded

    def crops(self, batch: Dict) -> torch.Tensor:
        """(B, 3, S, S) uint8 on the device. Samples redone on the CPU add the files they found
        unreadable to ``batch["unreadable"]``."""
        size = self.img_size
        out = torch.empty((len(batch["key"]), 3, size, size), dtype=torch.uint8, device=self.device)
        on_cpu = set(batch["cpu_index"].tolist())
        if on_cpu:
            out[batch["cpu_index"].to(self.device)] = batch["cpu_image"].to(self.device, non_blocking=True)
        redone = []
        on_device = (position for position in range(len(out)) if position not in on_cpu)
        for position, image in zip(on_device, self._decode(batch["jpeg"])):
            if image is None:
                sample = self.cpu_dataset[tuple(batch["key"][position].tolist())]
                out[position] = sample["image"].to(self.device)
                redone.append(sample["unreadable"])
                continue
            left, top, crop_w, crop_h = batch["box"][position].tolist()
            crop = image[None, :, top:top + crop_h, left:left + crop_w].float()
            # antialias=True: the same triangle filter widened by the scale as Pillow's BILINEAR.
            crop = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                                                   antialias=True)
            crop = crop.round_().clamp_(0, 255).to(torch.uint8)[0]
            out[position] = crop.flip(-1) if bool(batch["flip"][position]) else crop
        if redone:
            batch["unreadable"] = torch.cat([batch["unreadable"], torch.stack(redone)])
        return out
