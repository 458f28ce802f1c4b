"""The embedded default dataset: natural-looking scenes drawn procedurally from a seed.

No files, no downloads: ``render_scene(index)`` always gives the same picture. Landscapes (sky,
sun, mountain ridges, fields or sea), still lifes (shaded objects on a smooth backdrop with
shadows) and textures (wood grain, tiles, ripples) give the model colour fields, edges and
repeating structure to reconstruct.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

SCENE_SIZE = 96


def _smooth_noise(rng: np.random.RandomState, size: int, cells: int, channels: int = 1) -> np.ndarray:
    """Values in [0, 1] varying smoothly over ``cells`` x ``cells`` control points (bicubic upsampled)."""
    coarse = rng.rand(cells, cells, channels)
    layers = [np.asarray(Image.fromarray((coarse[..., c] * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                         dtype=np.float32) / 255.0 for c in range(channels)]
    return np.stack(layers, axis=-1)


def _ridge(rng: np.random.RandomState, size: int, base: float, roughness: float) -> np.ndarray:
    """A mountain ridge: the height (in rows) of a sum of random sines along x."""
    x = np.linspace(0, 1, size)
    height = np.full(size, base)
    for octave in range(1, 5):
        height += roughness / octave * np.sin(2 * np.pi * (octave * rng.uniform(0.5, 1.5) * x + rng.rand()))
    return height * size


def _landscape(rng: np.random.RandomState, size: int) -> np.ndarray:
    rows = np.linspace(0, 1, size)[:, None, None]
    dusk = rng.rand() < 0.35
    top = np.array([0.95, 0.5, 0.3]) if dusk else np.array([0.2, 0.45, 0.85])
    top = np.clip(top + rng.uniform(-0.1, 0.1, 3), 0, 1)
    bottom = np.clip(np.array([1.0, 0.85, 0.6]) if dusk else np.array([0.75, 0.85, 0.95]), 0, 1)
    image = top * (1 - rows) + bottom * rows
    image = np.broadcast_to(image, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    sun_y, sun_x, radius = rng.uniform(0.1, 0.45) * size, rng.uniform(0.1, 0.9) * size, rng.uniform(0.05, 0.1) * size
    distance = np.hypot(yy - sun_y, xx - sun_x)
    glow = np.exp(-np.maximum(distance - radius, 0) / (radius * 1.5))[..., None]
    image = image * (1 - 0.6 * glow) + np.array([1.0, 0.95, 0.75]) * 0.6 * glow
    image[distance < radius] = [1.0, 0.97, 0.85]
    horizon = rng.uniform(0.55, 0.75)
    for layer, shade in enumerate(np.linspace(0.55, 0.25, rng.randint(1, 4))):
        ridge = _ridge(rng, size, horizon - 0.12 + 0.06 * layer, rng.uniform(0.03, 0.08))
        colour = np.array([0.35, 0.4, 0.55]) * shade / 0.55 + rng.uniform(-0.05, 0.05, 3)
        image[yy > ridge[None, :]] = np.clip(colour, 0, 1)
    ground_top = int(horizon * size)
    ground = image[ground_top:]
    depth = np.linspace(0, 1, size - ground_top)[:, None, None]
    if rng.rand() < 0.4:  # sea: the sky's colours mirrored, darker, with ripples
        mirrored = image[ground_top - 1::-1][: size - ground_top] * 0.7
        ripple = 0.08 * np.sin(yy[ground_top:, :, None] * 1.7 + 3 * np.sin(xx[ground_top:, :, None] * 0.15))
        ground[:] = np.clip(mirrored * (1 - 0.3 * depth) + ripple, 0, 1)
    else:  # fields: green or ochre with grass texture
        field = np.array([0.3, 0.55, 0.2]) if rng.rand() < 0.6 else np.array([0.75, 0.6, 0.3])
        texture = _smooth_noise(rng, size, 12)[ground_top:] - 0.5
        grain = rng.rand(size - ground_top, size, 1) * 0.12
        ground[:] = np.clip(field * (0.7 + 0.5 * depth) + 0.25 * texture + grain, 0, 1)
    return image


def _still_life(rng: np.random.RandomState, size: int) -> np.ndarray:
    backdrop = rng.uniform(0.3, 0.9, 3)
    image = backdrop * (0.75 + 0.4 * _smooth_noise(rng, size, 3, 1))
    table = int(rng.uniform(0.55, 0.8) * size)
    image[table:] = np.clip(rng.uniform(0.2, 0.7, 3) * (0.8 + 0.3 * _smooth_noise(rng, size, 6)[table:]), 0, 1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    light = np.array([-0.5, -0.6])
    for _ in range(rng.randint(2, 5)):
        cy, cx = rng.uniform(0.35, 0.8) * size, rng.uniform(0.15, 0.85) * size
        ry, rx = rng.uniform(0.08, 0.2) * size, rng.uniform(0.08, 0.2) * size
        colour = rng.uniform(0.05, 1.0, 3)
        shadow = ((yy - cy - 0.5 * ry) / ry) ** 2 + ((xx - cx - 0.4 * rx) / (rx * 1.2)) ** 2 < 1
        image[shadow & (yy > table)] *= 0.6
        if rng.rand() < 0.6:  # a sphere-like object, lit from the top left
            dy, dx = (yy - cy) / ry, (xx - cx) / rx
            inside = dy ** 2 + dx ** 2 < 1
            shading = np.clip(0.55 + 0.8 * (-(dy * light[0] + dx * light[1])) / 1.5, 0.2, 1.2)
            image[inside] = np.clip(colour * shading[inside][:, None], 0, 1)
        else:  # a box with a lit face and a darker side
            inside = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
            image[inside] = colour
            side = inside & (xx > cx + 0.4 * rx)
            image[side] = colour * 0.6
    return image


def _texture(rng: np.random.RandomState, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    warp = _smooth_noise(rng, size, 4)[..., 0] - 0.5
    kind = rng.randint(3)
    if kind == 0:  # wood: rings around an off-image centre, warped
        cy, cx = rng.uniform(-1, 2, 2)
        value = np.sin(40 * (np.hypot(yy - cy, xx - cx) + 0.15 * warp))
        light, dark = np.array([0.8, 0.6, 0.35]), np.array([0.45, 0.28, 0.12])
    elif kind == 1:  # tiles with grout
        period = rng.uniform(0.15, 0.3)
        value = np.minimum(np.abs(np.sin(np.pi * yy / period)), np.abs(np.sin(np.pi * (xx + 0.05 * warp) / period)))
        value = np.where(value < 0.15, -1.0, 0.6 + 0.4 * warp * 2)
        light, dark = rng.uniform(0.4, 1.0, 3), np.full(3, 0.2)
    else:  # ripples / dunes
        angle = rng.uniform(0, np.pi)
        value = np.sin(25 * (np.cos(angle) * yy + np.sin(angle) * xx) + 6 * warp)
        light, dark = rng.uniform(0.5, 1.0, 3), rng.uniform(0.0, 0.5, 3)
    mix = ((value + 1) / 2)[..., None]
    return light * mix + dark * (1 - mix)


SCENE_KINDS = (_landscape, _landscape, _still_life, _texture)  # landscapes twice as often


def render_scene(index: int, size: int = SCENE_SIZE) -> Image.Image:
    """Scene ``index`` of the embedded dataset as an RGB image; the same index always gives the same image."""
    rng = np.random.RandomState(index)
    image = SCENE_KINDS[index % len(SCENE_KINDS)](rng, size)
    image = image + rng.normal(0, 0.015, image.shape)  # a little sensor noise
    return Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8), "RGB")


def scene_label(index: int) -> str:
    """The kind of scene ``index`` ('landscape', 'still_life' or 'texture'): its class for fine-tuning."""
    return SCENE_KINDS[index % len(SCENE_KINDS)].__name__.lstrip("_")
