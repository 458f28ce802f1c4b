"""SimMIM: an encoder, a 1x1-conv + PixelShuffle decoder, and the masked L1 loss on raw pixels (or, as
the successor's NORM_TARGET, on pixels normalised by their local mean and variance)."""
from __future__ import annotations

from typing import Optional, Set

import torch
import torch.nn as nn

from .. import ops


class SimMIM(nn.Module):
    """Drop-in for the original ``SimMIM(encoder, encoder_stride)``; ``forward(x, mask)`` -> scalar loss.

    The training path runs the decoder and the loss as one op (``ops.masked_decoder_loss``): fast
    backends decode only the masked patches. ``reconstruct`` gives the full image for pictures.

    ``norm_target_patch_size`` (odd, e.g. 47): the successor's NORM_TARGET, the loss compares the decoder
    output with each pixel normalised by the mean and variance of its k x k neighbourhood; None: raw pixels.
    """

    def __init__(self, encoder: nn.Module, encoder_stride: int, norm_target_patch_size: Optional[int] = None):
        super().__init__()
        self.encoder = encoder
        self.encoder_stride = encoder_stride
        self.norm_target_patch_size = norm_target_patch_size
        self.decoder = nn.Sequential(
            nn.Conv2d(in_channels=self.encoder.num_features, out_channels=self.encoder_stride ** 2 * 3, kernel_size=1),
            nn.PixelShuffle(self.encoder_stride),
        )
        self.in_chans = self.encoder.in_chans
        self.patch_size = self.encoder.patch_size

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x, mask)
        conv = self.decoder[0]
        return ops.masked_decoder_loss(features, mask, conv.weight, conv.bias, x, self.encoder_stride,
                                       self.patch_size, self.in_chans, self.norm_target_patch_size)

    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The decoder's full (B, 3, H, W) reconstruction, in the normalised pixel space of ``x`` (in the
        locally normalised space of ``reference.normalized_target`` when the model has a norm target)."""
        return self.decoder(self.encoder(x, mask))

    def no_weight_decay(self) -> Set[str]:
        if hasattr(self.encoder, "no_weight_decay"):
            return {"encoder." + name for name in self.encoder.no_weight_decay()}
        return set()

    def no_weight_decay_keywords(self) -> Set[str]:
        if hasattr(self.encoder, "no_weight_decay_keywords"):
            return {"encoder." + name for name in self.encoder.no_weight_decay_keywords()}
        return set()
