"""Reading images into uint8 RGB arrays and cropping them to a square resolution."""

from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded; the message names the file."""


def read_rgb(path: str) -> np.ndarray:
    """The image at ``path`` as uint8 ``[H, W, 3]`` (grey and RGBA images become RGB)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise UnreadableImageError(f"cannot read image {path}: {error}") from None


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
