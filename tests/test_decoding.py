"""Images are decoded as viewers show them: a table over PIL modes, bit depths and the eight EXIF
orientations, each against PIL's own conversion (``convert``, ``ImageOps.exif_transpose``) or the
by-meaning mapping the module documents (16-bit scaled, float [0, 1], alpha over white)."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from nativetok_jax.data.decoding import UnreadableImageError, array_to_rgb, read_rgb
from nativetok_jax.data.pipeline import SkippedImages, decode

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)  # 7 wide, 5 tall: orientation shows
GREY16 = np.array([[0, 1, 128, 257, 32767], [32896, 40000, 65000, 65534, 65535]], np.uint16)
ALPHA = np.array([[0, 64, 128, 191, 255, 255, 0]] * 5, np.uint8)
ORIENTATION = 0x0112


def on_white(rgba: Image.Image) -> np.ndarray:
    """The RGBA image blended over opaque white by PIL."""
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba.convert("RGBA")).convert("RGB"))


def scaled16(values: np.ndarray) -> np.ndarray:
    grey = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def png48(values: np.ndarray) -> bytes:
    """A 48-bit RGB PNG (16 bits a channel), which PIL can read but not write."""
    height, width, _ = values.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + values[r].astype(">u2").tobytes() for r in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def write(tmp_path, name: str, image: Image.Image, **save) -> str:
    path = str(tmp_path / name)
    image.save(path, **save)
    return path


def pil_rgb(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def palette_with_transparency() -> Image.Image:
    image = Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    image.info["transparency"] = int(np.asarray(image)[0, 0])
    return image


# (file name, image to save, the 8-bit RGB a viewer shows for the saved file)
CASES = {
    "1": ("bilevel.png", lambda: Image.fromarray(RGB[..., 0] > 127), pil_rgb),
    "L": ("grey.png", lambda: Image.fromarray(RGB[..., 0]), pil_rgb),
    "P": ("palette.png", lambda: Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=8), pil_rgb),
    "RGB": ("rgb.png", lambda: Image.fromarray(RGB), pil_rgb),
    "CMYK": ("cmyk.tif", lambda: Image.fromarray(RGB).convert("CMYK"), pil_rgb),
    "YCbCr": ("ycbcr.jpg", lambda: Image.fromarray(RGB).convert("YCbCr"), pil_rgb),
    "LA": ("grey_alpha.png", lambda: Image.fromarray(np.stack([RGB[..., 0], ALPHA], -1), "LA"),
           lambda p: on_white(Image.open(p))),
    "RGBA": ("rgba.png", lambda: Image.fromarray(np.concatenate([RGB, ALPHA[..., None]], -1), "RGBA"),
             lambda p: on_white(Image.open(p))),
    "P+transparency": ("palette_alpha.png", palette_with_transparency, lambda p: on_white(Image.open(p))),
    "I;16": ("grey16.png", lambda: Image.fromarray(GREY16), lambda p: scaled16(GREY16)),
    "I": ("int.tif", lambda: Image.fromarray(GREY16.astype(np.int32)), lambda p: scaled16(GREY16)),
    "F": ("float.tif", lambda: Image.fromarray((GREY16 / 65535).astype(np.float32)), lambda p: scaled16(GREY16)),
}


@pytest.mark.parametrize("mode", list(CASES))
def test_every_mode_and_depth_is_read_as_a_viewer_shows_it(tmp_path, mode):
    name, make, expected = CASES[mode]
    path = write(tmp_path, name, make())
    got = read_rgb(path)
    assert got.dtype == np.uint8 and got.ndim == 3 and got.shape[-1] == 3
    np.testing.assert_array_equal(got, expected(path))


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG: PIL's ``convert`` clips every value above 255 to white."""
    got = read_rgb(write(tmp_path, "grey16.png", Image.fromarray(GREY16)))[..., 0]
    assert got.tolist() == [[0, 0, 0, 1, 127], [128, 156, 253, 255, 255]]


def test_forty_eight_bit_rgb_keeps_its_high_bytes(tmp_path):
    values = RNG.integers(0, 65536, (4, 6, 3)).astype(np.uint16)
    path = tmp_path / "rgb48.png"
    path.write_bytes(png48(values))
    got = read_rgb(str(path))
    np.testing.assert_array_equal(got, pil_rgb(str(path)))
    assert np.abs(got.astype(int) - np.rint(values.astype(np.float64) * 255 / 65535)).max() <= 1  # the scaled meaning


def test_alpha_is_composited_on_white(tmp_path):
    black = np.zeros((1, 3, 3), np.uint8)
    rgba = np.concatenate([black, np.array([[[0], [128], [255]]], np.uint8)], -1)
    got = read_rgb(write(tmp_path, "a.png", Image.fromarray(rgba, "RGBA")))
    assert got[0, :, 0].tolist() == [255, 127, 0]  # transparent: white; half: grey; opaque: black


# EXIF orientation -> the numpy operation a viewer applies to the stored pixels.
VIEWED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # rotate 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", list(VIEWED))
def test_exif_orientations_are_applied(tmp_path, orientation):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    path = write(tmp_path, f"o{orientation}.png", Image.fromarray(RGB), exif=exif)
    got = read_rgb(path)
    np.testing.assert_array_equal(got, pil_rgb(path))
    np.testing.assert_array_equal(got, VIEWED[orientation](RGB))


def test_a_sideways_phone_photo_is_read_upright(tmp_path):
    """Issue 17, case 1: a JPEG stored 40 wide x 80 tall with orientation 6 is shown 80 x 40."""
    stored = np.zeros((80, 40, 3), np.uint8)
    stored[:20] = (255, 0, 0)  # red along the stored top: the viewer's right side
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    path = write(tmp_path, "phone.jpg", Image.fromarray(stored), exif=exif, quality=95)
    got = read_rgb(path)
    assert got.shape == (40, 80, 3)
    np.testing.assert_array_equal(got, pil_rgb(path))
    assert got[:, -10:, 0].min() > 200 and got[:, :50, 0].max() < 60


@pytest.mark.parametrize("array, expected", [
    (GREY16, scaled16(GREY16)),
    (GREY16[..., None], scaled16(GREY16)),
    ((GREY16 / 65535).astype(np.float32), scaled16(GREY16)),
    (RGB[..., 0], np.repeat(RGB[..., :1], 3, -1)),
    (np.concatenate([RGB, ALPHA[..., None]], -1),
     on_white(Image.fromarray(np.concatenate([RGB, ALPHA[..., None]], -1), "RGBA"))),
    (np.stack([RGB[..., 0], ALPHA], -1), on_white(Image.fromarray(np.stack([RGB[..., 0], ALPHA], -1), "LA"))),
])
def test_arrays_follow_the_same_rules_by_dtype_and_channels(array, expected):
    np.testing.assert_array_equal(array_to_rgb(array), expected)


@pytest.mark.parametrize("array", [np.zeros((4, 4, 5), np.uint8), np.zeros((4,), np.uint8),
                                   np.zeros((4, 4, 3), np.int64)])
def test_arrays_that_are_not_images_are_refused_with_their_shape(array):
    with pytest.raises(UnreadableImageError, match=str(array.shape).replace("(", r"\(").replace(")", r"\)")):
        array_to_rgb(array)


def test_truncated_and_foreign_files_name_the_file(tmp_path):
    whole = io.BytesIO()
    Image.fromarray(RGB).save(whole, "PNG")
    (tmp_path / "cut.png").write_bytes(whole.getvalue()[:40])
    (tmp_path / "text.jpg").write_text("not an image")
    for name in ("cut.png", "text.jpg", "missing.png"):
        with pytest.raises(UnreadableImageError, match=f"cannot read image .*{name}"):
            read_rgb(str(tmp_path / name))


# Depths with no agreed scale: what a viewer (and PIL's own 8-bit view) shows for each.
LEVELS = np.array([[0, 1, 64, 128], [200, 254, 255, 17]])


@pytest.mark.parametrize("name, values", [
    ("float255.tif", LEVELS.astype(np.float32)),  # read as [0, 1] before: 98 % white
    ("int255.tif", LEVELS.astype(np.int32)),  # read as 16-bit before: black
])
def test_32_bit_images_of_0_to_255_read_as_pils_8_bit_view(tmp_path, name, values):
    path = write(tmp_path, name, Image.fromarray(values))
    with Image.open(path) as image:
        pil_view = np.asarray(image.convert("L"))
    np.testing.assert_array_equal(pil_view, LEVELS)
    np.testing.assert_array_equal(read_rgb(path), np.repeat(LEVELS[..., None], 3, -1).astype(np.uint8))


def test_a_dark_16_bit_pgm_stays_dark(tmp_path):
    """PIL opens a 16-bit PGM as ``I``; its values are 16-bit whatever their range."""
    path = tmp_path / "dark.pgm"
    path.write_bytes(b"P5 4 2 65535\n" + LEVELS.astype(">u2").tobytes())
    np.testing.assert_array_equal(read_rgb(str(path)), scaled16(LEVELS))


def test_float_images_slightly_over_1_are_clipped_not_rescaled(tmp_path):
    values = np.array([[0.0, 0.5, 1.0, 1.03]], np.float32)
    got = read_rgb(write(tmp_path, "over.tif", Image.fromarray(values)))[..., 0]
    assert got.tolist() == [[0, 128, 255, 255]]


@pytest.mark.parametrize("name, values, message", [
    ("nan.tif", np.array([[0.1, np.nan], [0.5, 0.7]], np.float32), "1 of its 4 pixels are NaN"),
    ("negative.tif", np.array([[-200, 0], [100, 255]], np.int32), r"int32 values span \[-200, 255\]"),
    ("huge.tif", np.array([[0, 1e6], [5, 9]], np.float32), r"float32 values span \[0, 1e\+06\], which fits no brightness"),
])
def test_images_with_no_brightness_scale_are_refused_naming_the_file(tmp_path, name, values, message):
    path = write(tmp_path, name, Image.fromarray(values))
    with pytest.raises(UnreadableImageError, match=rf"^cannot read image .*{name}: (its )?{message}"):
        read_rgb(path)
    if values.dtype == np.float32:
        with pytest.raises(UnreadableImageError, match=message):
            array_to_rgb(values)


def test_a_folder_skips_a_nan_image_with_a_warning(tmp_path):
    path = write(tmp_path, "nan.tif", Image.fromarray(np.full((4, 4), np.nan, np.float32)))
    skipped = SkippedImages()
    assert decode(path, skipped) is None
    assert skipped.names == [path] and "16 of its 16 pixels are NaN" in skipped.examples[0]
