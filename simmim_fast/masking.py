"""SimMIM's random masking: a coarse grid of mask patches, a fixed fraction of them masked, each
repeated to the model's patch grid."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch


class MaskGenerator:
    """``MaskGenerator(input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)``.

    ``gen()`` returns the original's int array of shape (input/model_patch, input/model_patch) using
    numpy's global RNG; ``generate(batch, generator=, device=)`` draws a (B, h, w) batch on any device
    from a ``torch.Generator``. Both mask exactly ``mask_count`` coarse cells per sample.
    """

    def __init__(self, input_size: int = 192, mask_patch_size: int = 32, model_patch_size: int = 4,
                 mask_ratio: float = 0.6):
        if input_size % mask_patch_size != 0:
            raise ValueError(f"input_size {input_size} must be a multiple of mask_patch_size {mask_patch_size}")
        if mask_patch_size % model_patch_size != 0:
            raise ValueError(f"mask_patch_size {mask_patch_size} must be a multiple of model_patch_size {model_patch_size}")
        if not 0.0 < mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio (DATA.MASK_RATIO) must be in (0, 1], got {mask_ratio}: the SimMIM loss is "
                             "over masked patches only, so masking none trains on a loss of exactly 0")
        self.input_size = input_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.rand_size = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.token_count = self.rand_size ** 2
        self.mask_count = int(math.ceil(self.token_count * self.mask_ratio))

    @property
    def mask_shape(self):
        side = self.rand_size * self.scale
        return side, side

    def __call__(self) -> np.ndarray:
        mask_idx = np.random.permutation(self.token_count)[: self.mask_count]
        mask = np.zeros(self.token_count, dtype=int)
        mask[mask_idx] = 1
        mask = mask.reshape((self.rand_size, self.rand_size))
        return mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)

    gen = __call__

    def generate(self, batch_size: int, generator: Optional[torch.Generator] = None,
                 device: Optional[torch.device] = None) -> torch.Tensor:
        """(B, h, w) int64 masks: a random permutation per sample via argsort of uniform noise."""
        device = torch.device(device) if device is not None else (generator.device if generator else torch.device("cpu"))
        noise = torch.rand(batch_size, self.token_count, generator=generator, device=device)
        chosen = noise.argsort(dim=1)[:, : self.mask_count]
        coarse = torch.zeros(batch_size, self.token_count, dtype=torch.long, device=device)
        coarse.scatter_(1, chosen, 1)
        coarse = coarse.view(batch_size, self.rand_size, self.rand_size)
        return coarse.repeat_interleave(self.scale, 1).repeat_interleave(self.scale, 2)
