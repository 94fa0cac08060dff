"""PNG grids of images, for looking at inputs and reconstructions side by side."""

from __future__ import annotations

import numpy as np
from PIL import Image


def image_grid(rows: list[np.ndarray], padding: int = 2) -> np.ndarray:
    """Tiles ``rows`` (each uint8 ``[N, H, W, 3]``) into one uint8 image with white gaps."""
    num_rows, num_cols = len(rows), max(len(r) for r in rows)
    height, width = rows[0].shape[1:3]
    grid = np.full(
        (num_rows * (height + padding) + padding, num_cols * (width + padding) + padding, 3), 255, np.uint8
    )
    for i, row in enumerate(rows):
        for j, image in enumerate(np.asarray(row)):
            top, left = padding + i * (height + padding), padding + j * (width + padding)
            grid[top : top + height, left : left + width] = image
    return grid


def save_grid(path: str, rows: list[np.ndarray], upscale: int = 1) -> np.ndarray:
    """Writes :func:`image_grid` of ``rows`` to ``path`` as PNG, nearest-upscaled by ``upscale``.

    Returns the written image.
    """
    image = Image.fromarray(image_grid(rows))
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.Resampling.NEAREST)
    image.save(path)
    return np.asarray(image)
