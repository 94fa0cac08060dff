"""Images as viewers show them: any file or array to uint8 RGB ``[H, W, 3]`` by its meaning.

Every image that enters training or evaluation passes through :func:`to_viewed_rgb`, so a photo
looks to the model as it looks to the person who took it:

- **Orientation.** The EXIF orientation tag (1-8) is applied (``PIL.ImageOps.exif_transpose``):
  a phone photo stored sideways with orientation 6 is read upright, as every viewer shows it.
- **Depth by meaning.** 16-bit samples (``I;16*`` grey, 48-bit RGB) are scaled to 8 bits,
  ``round(v * 255 / 65535)``, never clipped at 255 (what ``Image.convert`` does to ``I;16``,
  turning a 16-bit photo almost white). PIL opens 16-bit PGM/PPM and PNG files and 16-bit TIFFs of
  some kinds as ``I``: those are scaled from 16 bits too. Other ``I`` (32-bit integer) and ``F``
  (32-bit float) images have no agreed brightness scale, and both conventions occur (float TIFFs
  of [0, 1] and of 0..255; integer TIFFs of 0..255 and of 0..65535), so the scale is read from the
  values (:func:`full_scale`): the smallest of 1 (floats only), 255 and 65535 that holds the
  image's largest value; small overshoots of a float scale are clipped. An image whose values fit
  no scale (negative, or beyond 65535) is refused, and so is one with NaN pixels (an
  ``UnreadableImageError`` naming the file: the data pipeline skips it with a warning). 48-bit
  RGB PNGs are read by PIL as 8-bit RGB (their high bytes): already the meaning.
- **Colour.** Palette (``P``), bilevel (``1``), grey (``L``), ``CMYK``, ``YCbCr``, ``LAB`` and
  ``HSV`` are converted with PIL's own rules (``Image.convert("RGB")``; CMYK without an ICC
  transform, as PIL does).
- **Alpha is composited on white.** ``LA``, ``RGBA``, ``PA`` and palette images with a
  transparent entry are blended over an opaque white background. White, not black, because
  transparent images are mostly logos, icons and line art drawn dark on nothing, which viewers
  and web pages show over a light background; composited on black they would vanish, and
  dropping alpha would expose whatever colour the encoder left under transparent pixels.

TFDS ``Image`` features are read undecoded and decoded here too (TensorFlow's decoder ignores
EXIF orientation). Arrays follow the same rules by dtype: ``uint8`` as is, ``uint16`` scaled,
floats scaled by :func:`full_scale` (NaN refused); ``[H, W]`` and ``[H, W, 1]`` are grey,
``[H, W, 2]`` grey + alpha, ``[H, W, 4]`` RGBA.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from etils import epath
from PIL import Image, ImageOps, UnidentifiedImageError

from nativetok_jax.errors import UserError

WHITE = 255
ORIENTATION = 0x0112  # the EXIF tag
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Formats whose ``I`` images PIL makes only from 16-bit samples (PGM/PPM maxval > 255, 16-bit PNG).
SIXTEEN_BIT_I_FORMATS = ("PNG", "PPM")
BITS_PER_SAMPLE = 258  # the TIFF tag
# A float image whose largest value exceeds a scale by at most this fraction is taken at that
# scale (resampling overshoots a little), its excess clipped.
FLOAT_OVERSHOOT = 0.05
ALPHA_MODES = ("LA", "La", "RGBA", "RGBa", "PA")
# PIL raises SyntaxError for some malformed headers (a broken PNG chunk), DecompressionBombError
# for images over twice Image.MAX_IMAGE_PIXELS.
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


class UnreadableImageError(UserError, ValueError):
    """An image file that cannot be decoded; the message names the file."""


def read_rgb(path: str | epath.PathLike) -> np.ndarray:
    """The image file at ``path`` (local or ``gs://``) as a viewer shows it: uint8 ``[H, W, 3]``.

    Raises:
      UnreadableImageError: the file is missing, not an image, truncated, or of a mode this
        module cannot map (the message names the file and the cause).
    """
    try:
        with epath.Path(path).open("rb") as file:
            return _decode_file(file)
    except DECODE_ERRORS as error:
        raise UnreadableImageError(f"cannot read image {path}: {error}") from None


def decode_rgb(data: bytes, name: str) -> np.ndarray:
    """Encoded image bytes (a TFDS ``Image`` feature left undecoded) as :func:`read_rgb` reads a
    file; ``name`` identifies them in the ``UnreadableImageError``."""
    try:
        return _decode_file(io.BytesIO(data))
    except DECODE_ERRORS as error:
        raise UnreadableImageError(f"cannot read image {name}: {error}") from None


def _decode_file(file: Any) -> np.ndarray:
    with Image.open(file) as image:
        return to_viewed_rgb(image)


def to_viewed_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image, orientation applied and every mode mapped to uint8 RGB ``[H, W, 3]`` (module doc)."""
    if image.getexif().get(ORIENTATION, 1) != 1:  # copies only images that need turning
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and _sixteen_bit_source(image)):
        return _grey_to_rgb(_scale(np.asarray(image), 65535))
    if mode in ("I", "F"):
        values = np.asarray(image)
        return _grey_to_rgb(_scale(values, full_scale(values)))
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return _on_white(np.asarray(image.convert("RGBA")))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def array_to_rgb(array: Any) -> np.ndarray:
    """An image array (uint8, uint16 or float; grey, grey + alpha, RGB or RGBA) as uint8 RGB.

    A C-contiguous uint8 RGB array is returned itself, not a copy: callers must not write to it.

    Raises:
      UnreadableImageError: an array of another rank, channel count or dtype (the message
        names its shape and dtype).
    """
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4) or 0 in array.shape:
        raise UnreadableImageError(f"cannot read an image array of shape {array.shape} and dtype {array.dtype}")
    if array.dtype == np.uint8:
        pixels = array
    elif array.dtype == np.uint16:
        pixels = _scale(array, 65535)
    elif np.issubdtype(array.dtype, np.floating):
        pixels = _scale(array, full_scale(array))
    else:
        raise UnreadableImageError(f"cannot read an image array of shape {array.shape} and dtype {array.dtype} "
                                   "(expected uint8, uint16 or float)")
    if pixels.shape[-1] in (2, 4):
        colour = pixels[..., :-1]
        return _on_white(np.concatenate([np.repeat(colour, 3 // colour.shape[-1], -1), pixels[..., -1:]], -1))
    if pixels.shape[-1] == 3:
        # As it is: the data pipeline calls this once per crop on a photograph held in memory,
        # and a copy of the whole photograph cost 9 times the crop itself.
        return np.ascontiguousarray(pixels)
    return _grey_to_rgb(pixels[..., 0])


def _sixteen_bit_source(image: Image.Image) -> bool:
    """Whether an ``I`` image came from 16-bit samples (module doc)."""
    if image.format in SIXTEEN_BIT_I_FORMATS:
        return True
    bits = getattr(image, "tag_v2", {}).get(BITS_PER_SAMPLE) if image.format == "TIFF" else None
    return bits == 16 or (isinstance(bits, tuple) and bits[:1] == (16,))


def full_scale(values: np.ndarray) -> float:
    """The brightness of white in an image of 32-bit integer or float ``values`` (module doc): 1.0
    (floats only), 255 or 65535, the smallest whose range holds the values (a float's by up to
    :data:`FLOAT_OVERSHOOT`).

    Raises:
      UnreadableImageError: NaN values, or values no scale holds (negative, or above 65535).
    """
    values = np.asarray(values)
    floating = np.issubdtype(values.dtype, np.floating)
    if floating and np.isnan(values).any():
        raise UnreadableImageError(f"{int(np.isnan(values).sum())} of its {values.size} pixels are NaN")
    low, high = (values.min(), values.max()) if values.size else (0, 0)
    slack = 1 + FLOAT_OVERSHOOT if floating else 1
    scales = (1.0, 255.0, 65535.0) if floating else (255.0, 65535.0)
    for scale in scales:
        if high <= scale * slack:
            if low < -FLOAT_OVERSHOOT * scale:
                break
            return scale
    raise UnreadableImageError(f"its {values.dtype} values span [{low:g}, {high:g}], which fits no brightness scale "
                               "(0..1, 0..255 or 0..65535)")


def _scale(values: np.ndarray, full_scale: float) -> np.ndarray:
    """``values`` in [0, full_scale] to uint8 [0, 255] by rounding (out-of-range values clipped)."""
    scaled = np.asarray(values, np.float64) * (255.0 / full_scale)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))


def _on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 4]`` blended over opaque white, rounded as PIL's ``alpha_composite``."""
    background = Image.new("RGBA", (rgba.shape[1], rgba.shape[0]), (WHITE, WHITE, WHITE, 255))
    return np.asarray(Image.alpha_composite(background, Image.fromarray(np.ascontiguousarray(rgba), "RGBA"))
                      .convert("RGB"), dtype=np.uint8)
