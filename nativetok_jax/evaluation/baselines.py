"""Reference points for reconstruction quality that need no model.

- mean colour: every pixel replaced by its crop's mean colour (what a model that ignores its
  tokens learns first);
- thumbnail: the crop shrunk to a tiny RGB thumbnail at 8 bits per value and enlarged again
  bicubically, a classical codec with a fixed bit budget (4 x 4 x 3 x 8 = 384 bits, the budget
  of 32 tokens x 12 bits);
- :func:`same_bits_codec`: the thumbnail that fits a bit budget; under one 24-bit pixel, the
  mean colour quantised to fewer bits per channel (a 1 x 1 thumbnail at that depth).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

BITS_PER_VALUE = 8  # a uint8 colour value
BITS_PER_PIXEL = 3 * BITS_PER_VALUE  # an RGB pixel


def mean_colour(images: np.ndarray) -> np.ndarray:
    means = np.asarray(images, np.float64).mean(axis=(1, 2), keepdims=True)
    return np.broadcast_to(np.round(means), images.shape).astype(np.uint8)


def quantised_mean_colour(images: np.ndarray, bits_per_channel: int) -> np.ndarray:
    """uint8 ``[B, H, W, C]`` -> each image's mean colour quantised to ``bits_per_channel`` (0 to 7)
    bits per channel: ``[0, 256)`` cut into ``2**b`` equal bins, each value replaced by its bin's
    centre (an integer for b < 8; b = 0: mid-grey 128, no information; b = 1: 64 or 192)."""
    if not 0 <= bits_per_channel < BITS_PER_VALUE:
        raise ValueError(f"bits_per_channel must lie in [0, {BITS_PER_VALUE}), got {bits_per_channel}")
    step = 256.0 / 2**bits_per_channel
    means = np.asarray(images, np.float64).mean(axis=(1, 2), keepdims=True)
    bins = np.minimum(np.floor(means / step), 2**bits_per_channel - 1)
    centres = (bins + 0.5) * step
    return np.broadcast_to(centres, images.shape).astype(np.uint8)


def thumbnail(images: np.ndarray, side: int) -> np.ndarray:
    """Each image shrunk to ``side x side`` (antialiased, uint8) and enlarged bicubically."""
    out = []
    for image in images:
        small = Image.fromarray(image).resize((side, side), Image.Resampling.BOX)
        out.append(np.asarray(small.resize(image.shape[1::-1], Image.Resampling.BICUBIC)))
    return np.stack(out)


def token_bits(num_tokens: int, codebook_size: int) -> float:
    """Bits that ``num_tokens`` ids of a ``codebook_size`` codebook carry: ``num_tokens * log2(codebook_size)``."""
    return num_tokens * math.log2(codebook_size)


def thumbnail_side_for_bits(bits: float) -> int:
    """The largest side ``s`` with ``s * s * 24 <= bits`` (an RGB thumbnail at 8 bits per value);
    0 under 24 bits. A hair of tolerance keeps budgets that are exact multiples exact."""
    return math.isqrt(int(bits / BITS_PER_PIXEL + 1e-9))


def thumbnail_side(num_tokens: int, bits_per_token: float) -> int:
    """The largest square RGB thumbnail at 8 bits per value within the tokens' bit budget (at least 1)."""
    return max(1, thumbnail_side_for_bits(num_tokens * bits_per_token))


@dataclasses.dataclass(frozen=True)
class SameBitsCodec:
    """A no-model codec: an RGB thumbnail ``side x side`` at ``bits_per_channel`` bits per value
    (``side == 1`` and fewer than 8 bits: the quantised mean colour)."""

    side: int
    bits_per_channel: int = BITS_PER_VALUE

    @property
    def bits(self) -> int:
        """What the codec spends per image."""
        return self.side * self.side * 3 * self.bits_per_channel

    @property
    def name(self) -> str:
        if self.bits_per_channel < BITS_PER_VALUE:
            return f"mean_colour_{self.bits_per_channel}bit"
        return f"thumbnail_{self.side}x{self.side}"

    @property
    def description(self) -> str:
        if self.bits_per_channel < BITS_PER_VALUE:
            return (f"mean colour quantised to {self.bits_per_channel} bits per channel ({self.bits} bits; "
                    f"the budget is under one 24-bit pixel)")
        return f"thumbnail {self.side} x {self.side} at 8 bits per value ({self.bits} bits), enlarged bicubically"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[B, S, S, 3]`` -> the codec's uint8 reconstructions; a thumbnail as large as the
        image is the image itself."""
        if self.bits_per_channel < BITS_PER_VALUE:
            return quantised_mean_colour(images, self.bits_per_channel)
        if self.side >= min(images.shape[1:3]):
            return np.asarray(images)
        return thumbnail(images, self.side)


def same_bits_codec(bits: float) -> SameBitsCodec:
    """The no-model codec for a budget of ``bits`` per image: the largest RGB thumbnail at 8 bits
    per value that fits; under 24 bits, the mean colour at ``floor(bits / 3)`` bits per channel."""
    side = thumbnail_side_for_bits(bits)
    if side >= 1:
        return SameBitsCodec(side)
    return SameBitsCodec(1, int(bits / 3 + 1e-9))
