"""The tokenizer as a codec (issue 24): the rate-distortion rows of the prefix decoder beside the
same-bits no-model codecs, and the DVAE beside the block means of its own routing, each figure
recomputed here independently (PIL, numpy, scikit-image) or known in closed form."""

import math
import types

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity

from conftest import tiny_config
from nativetok_jax.data.images import center_crop
from nativetok_jax.data.photos import load_photos
from nativetok_jax.evaluation.baselines import same_bits_codec, thumbnail_side_for_bits, token_bits
from nativetok_jax.evaluation.dvae_metrics import evaluate_dvae
from nativetok_jax.evaluation.plots import plot_rate_distortion
from nativetok_jax.evaluation.rate_distortion import margin_interval
from nativetok_jax.evaluation.tokenizer_metrics import evaluate_tokenizer
from nativetok_jax.tokenizer import Tokenizer, preview_lengths

PEAK = 255.0


def per_image_psnr(originals: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """Each image's PSNR, in float64 numpy."""
    error = np.square(originals.astype(np.float64) - reconstructions.astype(np.float64))
    return 10 * np.log10(PEAK**2 / error.reshape(len(originals), -1).mean(axis=1))


def mean_psnr(originals: np.ndarray, reconstructions: np.ndarray) -> float:
    """The mean over images of each image's PSNR, in float64 numpy."""
    return float(np.mean(per_image_psnr(originals, reconstructions)))


def pil_thumbnails(images: np.ndarray, side: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BOX)
                                .resize(image.shape[1::-1], Image.Resampling.BICUBIC)) for image in images])


def skimage_ssim(originals: np.ndarray, reconstructions: np.ndarray) -> float:
    return float(np.mean([structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                                data_range=255, channel_axis=-1)
                          for a, b in zip(originals, reconstructions)]))


def test_bits_are_tokens_times_log2_codebook_and_the_lengths_double():
    assert preview_lengths(32, ratio=2) == [1, 2, 4, 8, 16, 32]
    assert preview_lengths(24, ratio=2) == [1, 2, 4, 8, 16, 24]  # L itself when not a power of two
    assert preview_lengths(32) == [1, 4, 16, 32]  # the pictures keep their rows
    assert token_bits(32, 4096) == 384.0
    assert token_bits(3, 1000) == pytest.approx(3 * math.log(1000) / math.log(2), rel=1e-12)


@pytest.mark.parametrize("bits", [1, 2, 3, 12, 23, 23.99, 24, 48, 95.9, 96, 383.99, 384, 3 * math.log2(1000) * 40])
def test_the_same_bits_codec_is_the_largest_thumbnail_that_fits(bits):
    side = 0
    while 24 * (side + 1) ** 2 <= bits:  # counted up, not by a square root
        side += 1
    codec = same_bits_codec(bits)
    assert thumbnail_side_for_bits(bits) == side
    if side:
        assert (codec.side, codec.bits_per_channel, codec.bits) == (side, 8, 24 * side * side)
    else:  # under one 24-bit pixel: the mean colour at floor(bits / 3) bits per channel
        assert (codec.side, codec.bits_per_channel) == (1, int(bits // 3))
    assert codec.bits <= bits


def test_the_quantised_mean_colour_is_its_bins_centre():
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[0] = [10, 130, 255]
    images[1, :2] = 100  # mean 50 in every channel
    for bits_per_channel, expected in [(0, [[128] * 3, [128] * 3]), (1, [[64, 192, 192], [64] * 3]),
                                       (4, [[8, 136, 248], [56] * 3])]:
        got = same_bits_codec(3 * bits_per_channel)(images)
        np.testing.assert_array_equal(got[:, 2, 3], expected)
        assert (got == got[:, :1, :1]).all()


@pytest.fixture(scope="module")
def photos():
    return np.stack([center_crop(photo, 16) for photo in load_photos("heldout")])


@pytest.fixture(scope="module")
def codec_rows(photos):
    """An untrained 8-token tokenizer with 4,096 codes (12 bits a token: 12, 24, 48 and 96 bits)
    judged on the held-out photographs in batches of 3 and 1 (the last padded)."""
    config = tiny_config()
    config.model.quantizer.codebook_size = 4096
    tokenizer = Tokenizer.from_config(config, seed=0)
    metrics, _ = evaluate_tokenizer(tokenizer, [photos[:3], photos[3:]])
    return tokenizer, metrics


def test_rate_distortion_rows_against_independent_computations(photos, codec_rows):
    tokenizer, metrics = codec_rows
    rows = metrics["rate_distortion"]
    assert [row["tokens"] for row in rows] == [1, 2, 4, 8]
    assert [row["bits"] for row in rows] == [12.0, 24.0, 48.0, 96.0]
    assert [row["thumbnail_side"] for row in rows] == [1, 1, 1, 2]
    assert [row["thumbnail_bits_per_channel"] for row in rows] == [4, 8, 8, 8]
    assert [row["same_bits_codec"] for row in rows] == ["mean_colour_4bit", "thumbnail_1x1", "thumbnail_1x1",
                                                        "thumbnail_2x2"]
    padded = np.concatenate([photos, np.repeat(photos[-1:], 2, axis=0)])  # the batches' shape: no new compile
    ids = np.concatenate([np.asarray(tokenizer.encode(padded[i:i + 3])) for i in (0, 3)])
    means = photos.astype(np.float64).mean(axis=(1, 2), keepdims=True)
    mean_colour = np.broadcast_to(np.round(means), photos.shape).astype(np.uint8)
    four_bit_mean = np.broadcast_to(np.floor(means / 16) * 16 + 8, photos.shape).astype(np.uint8)
    for row, prefix in zip(rows, metrics["prefix"]):
        k = row["tokens"]
        assert prefix["num_tokens"] == k and (row["psnr"], row["ssim"]) == (prefix["psnr"], prefix["ssim"])
        decoded = np.concatenate([np.asarray(tokenizer.decode(ids[i:i + 3, :k])) for i in (0, 3)])[:4]
        assert row["psnr"] == pytest.approx(mean_psnr(photos, decoded), abs=1e-3)
        same_bits = four_bit_mean if k == 1 else pil_thumbnails(photos, row["thumbnail_side"])
        assert row["thumbnail_psnr"] == pytest.approx(mean_psnr(photos, same_bits), abs=1e-3), k
        assert row["thumbnail_ssim"] == pytest.approx(skimage_ssim(photos, same_bits), abs=1e-4), k
        assert row["mean_colour_psnr"] == pytest.approx(mean_psnr(photos, mean_colour), abs=1e-3)
    assert metrics["psnr"] == rows[-1]["psnr"]


def test_the_rate_distortion_plot_is_a_png(codec_rows, tmp_path):
    path = tmp_path / "rd.png"
    plot_rate_distortion(codec_rows[1]["rate_distortion"], str(path))
    with Image.open(path) as plot:
        plot.verify()
        assert plot.format == "PNG" and min(plot.size) > 100
    with pytest.raises(ValueError, match="at least one row"):
        plot_rate_distortion([], str(path))


class RampDVAE:
    """A stand-in DVAE (what ``evaluate_dvae`` calls): coarse f4 / fine f2 over 4 px regions, its
    routing a fixed grain map, its reconstruction the image itself."""

    image_size = 16
    router = types.SimpleNamespace(factors=(4, 2))

    def __init__(self, grains: np.ndarray):
        self.grains = grains

    def encode(self, images, seed=0):
        return images, np.broadcast_to(self.grains, (len(images),) + self.grains.shape)

    def decode(self, latents, grains):
        return latents


def test_block_means_of_the_dvaes_own_routing_in_closed_form():
    # A horizontal ramp 2x (x = 0..15): a 2 px block's mean is its centre (errors +-1, MSE 1), a
    # 4 px block's too (errors +-1, +-3, MSE 5). Left half routed fine, right half coarse.
    ramp = np.broadcast_to((2 * np.arange(16))[None, None, :, None], (3, 16, 16, 3)).astype(np.uint8)
    grains = np.array([[1, 1, 0, 0]] * 4, np.int32)
    metrics, _ = evaluate_dvae(RampDVAE(grains), [ramp[:2], ramp[2:]])
    assert metrics["block_mean_psnr"] == pytest.approx(10 * math.log10(PEAK**2 / 3), abs=1e-4)
    assert metrics["block_mean_psnr_fine"] == pytest.approx(10 * math.log10(PEAK**2 / 1), abs=1e-9)
    assert metrics["block_mean_psnr_coarse"] == pytest.approx(10 * math.log10(PEAK**2 / 5), abs=1e-9)
    assert metrics["codes_per_image"] == 8 * 4 + 8 * 1  # 8 fine regions of 2 x 2 codes, 8 coarse of one
    assert metrics["psnr"] == math.inf  # the stand-in reconstructs exactly

    # Constant on every 4 px region: both grains' block means are exact.
    blocks = np.kron(np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1) * 15, np.ones((1, 4, 4, 3), np.uint8))
    exact, _ = evaluate_dvae(RampDVAE(grains), [blocks])
    assert exact["block_mean_psnr"] == exact["block_mean_psnr_fine"] == exact["block_mean_psnr_coarse"] == math.inf


class _NoisyCopies:
    """A stand-in tokenizer (what evaluate_tokenizer calls on one) whose decode returns each image
    plus noise of a known size per image: image i's noise has standard deviation sigma[i] at every
    prefix length, so which images beat the thumbnail is known from numpy alone."""

    def __init__(self, images: np.ndarray, sigma: np.ndarray, num_tokens: int = 2):
        self.images, self.sigma = images, sigma
        self.num_tokens, self.codebook_size, self.image_size = num_tokens, 4096, images.shape[1]
        self.colour_ids = 0  # no mean-colour shortcut: every id is a code
        self.noise = np.random.default_rng(0).normal(size=images.shape)

    def encode(self, images):
        index = [int(np.flatnonzero((self.images == image).all(axis=(1, 2, 3)))[0]) for image in images]
        return np.repeat(np.asarray(index)[:, None], self.num_tokens, axis=1)

    def decode(self, ids):
        index = ids[:, 0]
        noisy = self.images[index] + self.sigma[index, None, None, None] * self.noise[index]
        return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def test_the_psnr_win_rate_counts_the_images_where_the_model_beats_the_same_bits_codec(photos):
    """Four held-out photographs, two reconstructed almost exactly and two with heavy noise: the
    win rate is the share numpy finds, at each prefix length (12 bits: 4-bit mean colour; 24 bits:
    the 1 x 1 thumbnail), while the mean PSNR alone would not say how many images each codec wins."""
    stub = _NoisyCopies(photos, np.array([0.5, 80.0, 1.0, 90.0]))
    metrics, _ = evaluate_tokenizer(stub, [photos[:3], photos[3:]], num_shown=0)
    decoded = stub.decode(stub.encode(photos))
    model = per_image_psnr(photos, decoded)
    for row in metrics["rate_distortion"]:
        k = row["tokens"]
        codec = per_image_psnr(photos, same_bits_codec(token_bits(k, 4096))(photos))
        expected = np.mean((model > codec) + 0.5 * (model == codec))
        assert row["psnr_win_rate"] == pytest.approx(expected), k
        assert 0 < row["psnr_win_rate"] < 1, k  # the noisy pair loses, the near-copies win


def test_the_psnr_margin_and_its_interval_are_the_paired_t_interval_of_the_per_image_differences(photos):
    """The same stand-in: psnr_margin is the mean of (model - codec) per image, and its 95 % interval
    is mean +- t * s / sqrt(n), with t = 3.182446 (Student's t table, 3 degrees of freedom, 0.975)."""
    stub = _NoisyCopies(photos, np.array([0.5, 80.0, 1.0, 90.0]))
    metrics, _ = evaluate_tokenizer(stub, [photos[:3], photos[3:]], num_shown=0)
    model = per_image_psnr(photos, stub.decode(stub.encode(photos)))
    for row in metrics["rate_distortion"]:
        k = row["tokens"]
        difference = model - per_image_psnr(photos, same_bits_codec(token_bits(k, 4096))(photos))
        half_width = 3.182446305284263 * difference.std(ddof=1) / math.sqrt(len(difference))
        assert row["psnr_margin"] == pytest.approx(difference.mean()), k
        assert row["psnr_margin"] == pytest.approx(row["psnr"] - row["thumbnail_psnr"]), k
        assert row["psnr_margin_ci95"] == pytest.approx([difference.mean() - half_width,
                                                         difference.mean() + half_width]), k


def test_the_margin_interval_of_degenerate_differences():
    """One image has no interval; identical differences give a zero-width one; an exact
    reconstruction on one side only gives an infinite margin and no interval."""
    mean, interval = margin_interval(np.array([1.5]))
    assert mean == 1.5 and all(math.isnan(x) for x in interval)
    assert margin_interval(np.array([2.0, 2.0, 2.0])) == (2.0, [2.0, 2.0])
    mean, interval = margin_interval(np.array([1.0, math.inf]))
    assert mean == math.inf and all(math.isnan(x) for x in interval)
