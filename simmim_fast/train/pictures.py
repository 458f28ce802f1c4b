"""Pictures of a run: reconstruction grids (original | masked input | reconstruction | original's
visible patches with the reconstructed masked ones) and the loss curve."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..checkpoint import write_atomic
from .data import denormalize
from .device_batches import normalize

COLUMNS = ("original", "masked input", "reconstruction", "visible + reconstructed")
MIN_TILE = 128  # small images are enlarged (nearest) so the patches stay visible
GAP = 4
LABEL_HEIGHT = 16


@torch.no_grad()
def reconstruction_panels(model, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, 4, 3, H, W) pixels in [0, 1] for the four columns; ``model`` is a SimMIM (not wrapped)."""
    was_training = model.training
    model.eval()
    try:
        reconstruction = model.reconstruct(images, masks).float()
    finally:
        model.train(was_training)
    scale = images.shape[-1] // masks.shape[-1]
    pixel_mask = masks.repeat_interleave(scale, 1).repeat_interleave(scale, 2).unsqueeze(1).to(images.dtype)
    original = denormalize(images)
    rebuilt = denormalize(reconstruction)
    masked_input = original * (1 - pixel_mask) + 0.5 * pixel_mask  # masked patches shown grey
    blended = original * (1 - pixel_mask) + rebuilt * pixel_mask
    return torch.stack([original, masked_input, rebuilt, blended], dim=1).cpu()


def save_grid(panels: torch.Tensor, path: Path, title: str = "") -> Path:
    """One row per image, one column per panel, with column labels; written atomically enough for a
    viewer (a temp name, then a rename)."""
    rows, columns, _, height, width = panels.shape
    zoom = max(1, -(-MIN_TILE // max(height, width)))
    tile_h, tile_w = height * zoom, width * zoom
    header = LABEL_HEIGHT * (2 if title else 1)
    canvas = Image.new("RGB", (columns * (tile_w + GAP) + GAP, header + rows * (tile_h + GAP) + GAP), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((GAP, 2), title, fill="black")
    for column, name in enumerate(COLUMNS[:columns]):
        draw.text((GAP + column * (tile_w + GAP), header - LABEL_HEIGHT + 2), name, fill="black")
    pixels = (panels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
    for row in range(rows):
        for column in range(columns):
            tile = Image.fromarray(pixels[row, column]).resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(tile, (GAP + column * (tile_w + GAP), header + GAP + row * (tile_h + GAP)))
    return write_atomic(path, lambda file: canvas.save(file, format="PNG"))


def save_loss_curve(steps: Sequence[int], losses: Sequence[float], path: Path) -> Path:
    """Loss per step and its running mean; matplotlib (Agg) is imported only here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = np.asarray(steps), np.asarray(losses, dtype=float)
    window = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    axes.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss per step")
    if len(smooth):
        axes.plot(steps[window - 1:], smooth, color="tab:blue", linewidth=2, label=f"mean of {window}")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("masked L1 loss (normalised pixels)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    try:
        return write_atomic(path, lambda file: figure.savefig(file, format="png"))
    finally:
        plt.close(figure)


PICTURE_EPOCH = 2 ** 31 - 1  # an epoch number training never reaches: picture samples are their own


def picture_batch(dataset, count: int, mask_generator):
    """The same ``count`` samples (normalised images, masks) for every picture of a run, so the grids
    show progress; ``dataset`` gives uint8 images (``data.FastCrop``)."""
    count = min(count, len(dataset))
    spread = np.linspace(0, len(dataset) - 1, count).astype(int)
    images = torch.stack([dataset[(PICTURE_EPOCH, int(index))]["image"] for index in spread])
    masks = mask_generator.generate(count, generator=torch.Generator().manual_seed(dataset.seed))
    return normalize(images), masks
