"""PNG grids of images, for looking at inputs and reconstructions side by side."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from nativetok_jax import storage


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


def save_png(path: storage.PathLike, image: np.ndarray) -> None:
    """Writes uint8 ``[H, W, 3]`` ``image`` to ``path`` (local or a URL) as PNG, parents created."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    storage.write_bytes(path, buffer.getvalue())


def save_grid(path: storage.PathLike, rows: list[np.ndarray], upscale: int = 1) -> np.ndarray:
    """Writes :func:`image_grid` of ``rows`` to ``path`` (local or a URL) as PNG, nearest-upscaled
    by ``upscale``, creating its directory. Returns the written image, uint8 ``[H, W, 3]``."""
    grid = image_grid(rows)
    if upscale > 1:
        grid = np.repeat(np.repeat(grid, upscale, axis=0), upscale, axis=1)  # nearest-neighbour
    save_png(path, grid)
    return grid
