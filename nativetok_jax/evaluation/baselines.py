"""Reference points for reconstruction quality that need no model.

- mean colour: every pixel replaced by its crop's mean colour (what a model that ignores its
  tokens learns first);
- thumbnail: the crop shrunk to a tiny RGB thumbnail at 8 bits per value and enlarged again
  bicubically, a classical codec with a fixed bit budget (4 x 4 x 3 x 8 = 384 bits, the budget
  of 32 tokens x 12 bits).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from nativetok_jax.evaluation.metrics import psnr


def mean_colour(images: np.ndarray) -> np.ndarray:
    means = np.asarray(images, np.float64).mean(axis=(1, 2), keepdims=True)
    return np.broadcast_to(np.round(means), images.shape).astype(np.uint8)


def thumbnail(images: np.ndarray, side: int) -> np.ndarray:
    """Each image shrunk to ``side x side`` (antialiased, uint8) and enlarged bicubically."""
    out = []
    for image in images:
        small = Image.fromarray(image).resize((side, side), Image.Resampling.BOX)
        out.append(np.asarray(small.resize(image.shape[1::-1], Image.Resampling.BICUBIC)))
    return np.stack(out)


def thumbnail_side(num_tokens: int, bits_per_token: float) -> int:
    """The largest square RGB thumbnail at 8 bits per value within the tokens' bit budget."""
    return max(1, int(np.sqrt(num_tokens * bits_per_token / 24)))


def baseline_psnrs(images: np.ndarray, num_tokens: int, codebook_size: int) -> dict[str, float]:
    side = thumbnail_side(num_tokens, np.log2(codebook_size))
    return {
        "mean_colour": psnr(images, mean_colour(images)),
        f"thumbnail_{side}x{side}": psnr(images, thumbnail(images, side)),
    }
