"""Pixels <-> PNG: [-1, 1] float images to uint8 and a grid PNG."""

from __future__ import annotations

import math
import pathlib

import numpy as np
from PIL import Image


def to_uint8(pixels) -> np.ndarray:
    """`[..., H, W, C]` in [-1, 1] -> uint8 (Janus-Pro's post-processing: clip((x + 1) / 2 * 255))."""
    x = np.asarray(pixels, dtype=np.float32)
    return np.clip((x + 1.0) / 2.0 * 255.0, 0, 255).astype(np.uint8)


def save_grid(pixels, path, cols: int | None = None, pad: int = 2) -> pathlib.Path:
    """Writes images `[N, H, W, C]` ([-1, 1] floats or uint8) as one PNG grid; returns the path."""
    imgs = np.asarray(pixels)
    imgs = imgs if imgs.dtype == np.uint8 else to_uint8(imgs)
    n, h, w, c = imgs.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(imgs):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(path)
    return path
