"""Masks for SimMIM: which patches of each image the model must reconstruct.

One interface, ``MaskGenerator``, several strategies over a grid of cells (each cell repeated to the
model's patch grid); every strategy masks exactly ``mask_count(epoch)`` cells per sample:

- ``random`` (default): SimMIM's random mask-patch, cells of ``mask_patch_size`` (the original, unchanged);
- ``patch``: random at the model's own patch granularity (cells of ``model_patch_size``, as MAE);
- ``block``: BEiT's block-wise masking (rectangles of 4 or more cells, aspect 0.3-3.3) on the
  ``mask_patch_size`` grid, topped up at random on the rare sample where its attempts stall;
- ``grid``: an ordered-dither (Bayer) pattern with a random offset: evenly spread cells for any ratio;
  at 0.75 it is MAE's grid sampling (one visible cell per 2x2), at 0.5 a checkerboard.

``mask_ratio_end`` makes the ratio a schedule over training: linear from ``mask_ratio`` at epoch 0 to
``mask_ratio_end`` at epoch ``total_epochs - 1``.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ._checks import check_count

STRATEGIES = ("random", "patch", "block", "grid")
# BEiT's block-wise masking: smallest block, aspect ratio range, attempts per block.
BLOCK_MIN_CELLS, BLOCK_MIN_ASPECT, BLOCK_ATTEMPTS = 4, 0.3, 10


class MaskGenerator:
    """``MaskGenerator(input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)``.

    ``gen()`` returns the original's int array of shape (input/model_patch, input/model_patch) using
    numpy's global RNG (random strategy; the others draw from torch's global RNG); ``generate(batch,
    generator=, device=, epoch=)`` draws a (B, h, w) batch on any device from a ``torch.Generator``.
    """

    def __init__(self, input_size: int = 192, mask_patch_size: int = 32, model_patch_size: int = 4,
                 mask_ratio: float = 0.6, strategy: str = "random", mask_ratio_end: Optional[float] = None,
                 total_epochs: int = 1):
        for name, size in (("input_size", input_size), ("mask_patch_size", mask_patch_size),
                           ("model_patch_size", model_patch_size)):
            check_count(name, size, 1)
        if input_size % mask_patch_size != 0:
            raise ValueError(f"input_size {input_size} must be a multiple of mask_patch_size {mask_patch_size}")
        if mask_patch_size % model_patch_size != 0:
            raise ValueError(f"mask_patch_size {mask_patch_size} must be a multiple of model_patch_size {model_patch_size}")
        for name, key, ratio in (("mask_ratio", "DATA.MASK_RATIO", mask_ratio),
                                 ("mask_ratio_end", "DATA.MASK_RATIO_END", mask_ratio_end)):
            if ratio is not None and not (isinstance(ratio, (int, float)) and 0.0 < ratio <= 1.0):
                raise ValueError(f"{name} ({key}) must be in (0, 1], got {ratio}: the SimMIM loss is over masked "
                                 "patches only, so masking none trains on a loss of exactly 0")
        if strategy not in STRATEGIES:
            raise ValueError(f"mask strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        check_count("total_epochs", total_epochs, 1)
        self.input_size = input_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.strategy = strategy
        self.mask_ratio_end = mask_ratio_end
        self.total_epochs = total_epochs
        cell = model_patch_size if strategy == "patch" else mask_patch_size
        self.rand_size = input_size // cell
        self.scale = cell // model_patch_size
        self.token_count = self.rand_size ** 2
        self.mask_count = self.mask_count_at(0)

    @classmethod
    def from_config(cls, config, model_patch_size: int) -> "MaskGenerator":
        """From DATA.IMG_SIZE / MASK_PATCH_SIZE / MASK_RATIO / MASK_STRATEGY / MASK_RATIO_END, TRAIN.EPOCHS."""
        data = config.DATA
        return cls(data.IMG_SIZE, data.MASK_PATCH_SIZE, model_patch_size, data.MASK_RATIO, data.MASK_STRATEGY,
                   data.MASK_RATIO_END, config.TRAIN.EPOCHS)

    def ratio_at(self, epoch: int) -> float:
        if self.mask_ratio_end is None:
            return self.mask_ratio
        progress = min(max(epoch, 0), self.total_epochs - 1) / max(self.total_epochs - 1, 1)
        return self.mask_ratio + (self.mask_ratio_end - self.mask_ratio) * progress

    def mask_count_at(self, epoch: int) -> int:
        """Cells masked per sample in ``epoch`` (the original's ceil(cells * ratio))."""
        return int(math.ceil(self.token_count * self.ratio_at(epoch)))

    @property
    def mask_shape(self):
        side = self.rand_size * self.scale
        return side, side

    def __call__(self, epoch: int = 0) -> np.ndarray:
        if self.strategy != "random":
            return self.generate(1, epoch=epoch)[0].numpy()
        mask_idx = np.random.permutation(self.token_count)[: self.mask_count_at(epoch)]
        mask = np.zeros(self.token_count, dtype=int)
        mask[mask_idx] = 1
        mask = mask.reshape((self.rand_size, self.rand_size))
        return mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)

    gen = __call__

    def generate(self, batch_size: int, generator: Optional[torch.Generator] = None,
                 device: Optional[torch.device] = None, epoch: int = 0) -> torch.Tensor:
        """(B, h, w) int64 masks, ``mask_count_at(epoch)`` cells each."""
        check_count("batch_size", batch_size, 1)
        device = torch.device(device) if device is not None else (generator.device if generator else torch.device("cpu"))
        count = self.mask_count_at(epoch)
        if self.strategy == "block":
            coarse = torch.stack([self._block_mask(count, generator) for _ in range(batch_size)]).to(device)
        else:
            scores = (self._grid_scores(batch_size, generator, device) if self.strategy == "grid"
                      else torch.rand(batch_size, self.token_count, generator=generator, device=device))
            coarse = _lowest(scores, count)
        coarse = coarse.view(batch_size, self.rand_size, self.rand_size)
        return coarse.repeat_interleave(self.scale, 1).repeat_interleave(self.scale, 2)

    def _grid_scores(self, batch_size, generator, device) -> torch.Tensor:
        """(B, cells): a Bayer matrix tiled over the grid at a random offset per sample; lowest first."""
        side = 1 << max(self.rand_size - 1, 0).bit_length()
        dither = bayer_matrix(side).to(device)
        offsets = torch.randint(0, side, (batch_size, 2, 1), generator=generator, device=device)
        rows = (torch.arange(self.rand_size, device=device) + offsets[:, 0]) % side  # (B, R)
        cols = (torch.arange(self.rand_size, device=device) + offsets[:, 1]) % side
        return dither[rows[:, :, None], cols[:, None, :]].flatten(1).float()

    def _block_mask(self, count: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        """BEiT's block-wise masking of ``count`` cells (its algorithm, drawing from ``generator``)."""
        side = self.rand_size
        mask = torch.zeros(side, side, dtype=torch.long)
        log_aspect = (math.log(BLOCK_MIN_ASPECT), math.log(1 / BLOCK_MIN_ASPECT))

        def uniform(low, high):
            return low + (high - low) * torch.rand((), generator=generator).item()

        masked = 0
        while masked < count:
            budget = count - masked
            added = 0
            for _ in range(BLOCK_ATTEMPTS):
                area = uniform(BLOCK_MIN_CELLS, budget)
                aspect = math.exp(uniform(*log_aspect))
                height, width = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if width < side and height < side:
                    top = int(torch.randint(0, side - height + 1, (), generator=generator))
                    left = int(torch.randint(0, side - width + 1, (), generator=generator))
                    block = mask[top:top + height, left:left + width]
                    new = height * width - int(block.sum())
                    if 0 < new <= budget:
                        block.fill_(1)
                        added = new
                if added > 0:
                    break
            if added == 0:  # BEiT stops short here; we fill the rest at random so every sample has `count`
                free = (mask.flatten() == 0).nonzero().flatten()
                chosen = free[torch.randperm(len(free), generator=generator)[:budget]]
                mask.view(-1)[chosen] = 1
                break
            masked += added
        return mask.flatten()


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """(B, N) 0/1 int64 with ones at each row's ``count`` lowest scores."""
    chosen = scores.argsort(dim=1)[:, :count]
    mask = torch.zeros(scores.shape, dtype=torch.long, device=scores.device)
    return mask.scatter_(1, chosen, 1)


def bayer_matrix(side: int) -> torch.Tensor:
    """The (side, side) ordered-dither matrix, side a power of two: every value 0..side^2-1 once, each
    threshold's cells spread as evenly as the grid allows."""
    matrix = torch.zeros(1, 1, dtype=torch.long)
    while matrix.shape[0] < side:
        matrix = torch.cat([torch.cat([4 * matrix, 4 * matrix + 2], 1), torch.cat([4 * matrix + 3, 4 * matrix + 1], 1)], 0)
    return matrix
