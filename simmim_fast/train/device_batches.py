"""The device side of the input pipeline: uint8 batches become normalised floats there, and the masks
of a whole optimizer step are drawn there in one call.

A step's masks come from a generator seeded by (seed, epoch, step in the epoch) and are split the way
``EpochSampler`` hands out that step's samples: a sample at a given place of the global step gets the
same mask whatever the process count or the accumulation, which keeps resumes exact and a 2-process
run equal to a 1-process run with the same global batch.
"""
from __future__ import annotations

import functools
from typing import List

import torch

from ..masking import MaskGenerator
from .data import IMAGENET_MEAN, IMAGENET_STD, sample_seed

MASK_STREAM = 1  # keeps the mask seeds apart from the per-sample seeds (seed, epoch, index)


@functools.lru_cache(maxsize=None)
def _mean_and_std(device: torch.device):
    """Made once per device: no host-to-device copy per batch."""
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> ToTensor + Normalize(ImageNet mean, std) float32, on the tensor's device;
    the same operations in the same order as ``data.to_normalized_tensor``, so the same values."""
    mean, std = _mean_and_std(pixels.device)
    return (pixels.float().div_(255) - mean) / std


class StepMasks:
    """The masks of every micro-batch of one optimizer step on ``device``."""

    def __init__(self, mask_generator: MaskGenerator, device: torch.device, seed: int, world_size: int, rank: int,
                 batch_size: int, accumulation: int):
        self.mask_generator = mask_generator
        self.device = device
        self.seed = seed
        self.world_size, self.rank = world_size, rank
        self.batch_size, self.accumulation = batch_size, accumulation
        # CUDA draws on the GPU; other devices (CPU, XLA) draw on the CPU and copy (tiny tensors).
        self.draw_device = device if device.type == "cuda" else torch.device("cpu")

    def for_step(self, epoch: int, step_in_epoch: int) -> List[torch.Tensor]:
        """One (batch, h, w) mask tensor per micro-batch of this process.

        This process's j-th sample of micro-batch m is the global step's sample (m * batch + j) *
        world_size + rank (the sampler deals samples to ranks in turn), so the step's masks, drawn
        in global order, are viewed as (accumulation, batch, world_size) and this rank's column taken."""
        generator = torch.Generator(self.draw_device).manual_seed(
            sample_seed(self.seed, epoch, step_in_epoch, MASK_STREAM))
        count = self.accumulation * self.batch_size * self.world_size
        masks = self.mask_generator.generate(count, generator=generator, device=self.draw_device, epoch=epoch)
        masks = masks.view(self.accumulation, self.batch_size, self.world_size, *masks.shape[1:])[:, :, self.rank]
        return list(masks.contiguous().to(self.device, non_blocking=True).unbind(0))
