"""Cropping decoded uint8 RGB images to a square resolution (decoding: ``data.decoding``)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes the short side to ``size`` (bicubic, antialiased) and takes the central square."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    resized = Image.fromarray(image).resize(
        (max(size, round(width * scale)), max(size, round(height * scale))), Image.Resampling.BICUBIC
    )
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)
