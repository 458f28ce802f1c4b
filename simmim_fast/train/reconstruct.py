"""``simmim-fast reconstruct``: a pretrained SimMIM's reconstructions of your own images, as a PNG grid."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from .._checks import check_count, check_writable_folder, usable_device
from ..checkpoint import CheckpointReadError, fitting_state_dict, load_checkpoint, state_dict_of
from ..config import build_simmim, get_config, merge
from ..masking import MaskGenerator
from . import checkpoints
from .configs import build_config
from .data import UNREADABLE_ERRORS, as_rgb, center_view, find_images
from .pictures import reconstruction_panels, save_grid


def reconstruct_images(checkpoint: str, images: str, out: str, count: int = 8, seed: int = 0,
                       preset: Optional[str] = None, config_file: Optional[str] = None, device: str = "cpu",
                       trust_checkpoint: bool = False) -> Path:
    """Mask ``count`` images from the folder ``images`` at the checkpoint's ratio (seeded) and write the grid.

    The model's config comes from the checkpoint (simmim-fast checkpoints carry it); for other
    checkpoints give ``preset`` or ``config_file``. ``trust_checkpoint`` unpickles arbitrary objects
    (the original's checkpoints hold a yacs config), which runs code from the file: trusted files only.
    """
    check_count("--count", count, 1)
    check_writable_folder("--out", Path(out).parent)
    if Path(out).suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {out}: not an image file name (e.g. grid.png)")
    device = usable_device("--device", device)
    image_paths = find_images(images, "--images")  # a wrong folder fails before the model is built
    given_config = build_config(preset, config_file) if preset or config_file else None
    state = load_checkpoint(checkpoint, trust_checkpoint=trust_checkpoint)
    weights = state_dict_of(state, checkpoint)  # the file holds weights at all, before any model is built
    if isinstance(state, dict) and state.get("format") == checkpoints.FINETUNE_FORMAT:
        raise CheckpointReadError(f"{checkpoint} is {checkpoints.FORMAT_DESCRIPTIONS[checkpoints.FINETUNE_FORMAT][0]}: "
                                  "a classifier without SimMIM's decoder, it cannot reconstruct; give a pretraining one")
    if given_config is None and not (isinstance(state, dict) and isinstance(state.get("config"), dict)):
        raise ValueError(f"{checkpoint} has no simmim-fast config; give --preset or --config for its model")
    config = given_config or merge(get_config(), state["config"])
    model = build_simmim(config)
    model.load_state_dict(fitting_state_dict(model, weights, checkpoint))
    model.to(device)

    pictures = []
    for path in image_paths:
        try:
            with Image.open(path) as image:
                pictures.append(center_view(as_rgb(image), config.DATA.IMG_SIZE))
        except UNREADABLE_ERRORS:
            continue
        if len(pictures) == count:
            break
    if not pictures:
        raise ValueError(f"{images}: none of the image files could be read")
    masks = MaskGenerator.from_config(config, model.patch_size).generate(
        len(pictures), generator=torch.Generator().manual_seed(seed))
    panels = reconstruction_panels(model, torch.stack(pictures).to(device), masks.to(device))
    return save_grid(panels, Path(out), title=f"{Path(checkpoint).name}: {len(pictures)} images from {images}")

