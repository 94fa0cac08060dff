"""A tokenizer's reconstruction quality over a whole image set, from all tokens and from prefixes.

One pass over the images: each batch is encoded once and decoded from the first k tokens for
every prefix length k (1, 2, 4, ..., L), and every reconstruction is compared with its
original. Per length:

- ``psnr``: per image (MSE over pixels and channels, peak 255), averaged over images;
- ``ssim``: per image (:mod:`nativetok_jax.evaluation.ssim`), averaged over images (for images of
  at least its 11 x 11 window; left out for smaller ones);
- ``lpips``: per image, averaged (with an LPIPS module);
- ``codebook_usage``: distinct codes among the first k tokens of every image / codebook size (the
  mean-colour shortcut's ids, a colour, are not counted);
- ``perplexity``: ``exp`` of the entropy of those codes' histogram over the whole set;
- ``rfid``: Frechet distance between the Inception features of the reconstructions and of the
  originals (or given reference statistics), and ``inception_score`` (``_std`` over its splits)
  of the reconstructions (with an Inception module).

With the prefixes comes the rate-distortion curve (:mod:`nativetok_jax.evaluation.rate_distortion`):
every length's bits (``k log2(codebook_size)``) and the model's figures beside the no-model
codecs that spend as many bits, measured in the same pass by the same metric functions.

Images stay uint8 until the metrics read them. Every batch is padded to the first batch's size
(repeating its last image; the copies are dropped from every sum), so each jitted function
compiles once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from nativetok_jax.errors import UserError
from nativetok_jax.evaluation.fid import FeatureStatistics, frechet_distance, inception_score
from nativetok_jax.evaluation.metrics import psnr_per_image
from nativetok_jax.evaluation.rate_distortion import SameBitsTotals
from nativetok_jax.evaluation.ssim import WIN_SIZE, ssim
from nativetok_jax.models.frozen.inception import FEATURE_DIM, InceptionV3
from nativetok_jax.models.frozen.lpips import LPIPS
from nativetok_jax.models.nativetok.quantizer import histogram_statistics
from nativetok_jax.tokenizer import Tokenizer, preview_lengths

INCEPTION_SCORE_SPLITS = 10
LOG_EVERY_BATCHES = 10
PAIR_METRICS = ("psnr", "ssim", "lpips")  # per image pair, averaged; in the order they are reported

Statistics = tuple[np.ndarray, np.ndarray]  # (mu [D], sigma [D, D]) of Inception features


class TooFewImagesError(UserError, ValueError):
    """The images given to an evaluation were too few (none readable, or one where a covariance
    needs two): the data's fault, which the caller names."""


def check_image_count(num_images: int, inception: bool) -> None:
    """Raises ``TooFewImagesError`` for no images, or fewer than 2 with Inception metrics."""
    if num_images == 0:
        raise TooFewImagesError("no images to evaluate")
    if inception and num_images < 2:
        raise TooFewImagesError(f"rFID needs at least 2 images (a covariance), got {num_images}")


def inception_score_splits(num_images: int) -> int:
    """The number of splits the Inception Score is averaged over: 10, or fewer for fewer images."""
    return max(1, min(INCEPTION_SCORE_SPLITS, num_images))


@functools.lru_cache(maxsize=8)
def _jitted_pair_metrics(lpips_graphdef: nnx.GraphDef | None, with_ssim: bool) -> Callable[..., dict[str, jax.Array]]:
    """``(lpips_state, originals, reconstructions) -> {metric: [B]}`` on uint8 batches, jitted.

    Cached by the LPIPS graph, so evaluating again (another checkpoint, say) compiles nothing new.
    """

    @jax.jit
    def pair_metrics(lpips_state: Any, originals: jax.Array, reconstructions: jax.Array) -> dict[str, jax.Array]:
        out = {"psnr": psnr_per_image(originals, reconstructions)}
        if with_ssim:
            out["ssim"] = ssim(originals, reconstructions)
        if lpips_graphdef is not None:
            to_signed = lambda images: images.astype(jnp.float32) / 127.5 - 1.0  # noqa: E731
            lpips = nnx.merge(lpips_graphdef, lpips_state)
            out["lpips"] = lpips(to_signed(originals), to_signed(reconstructions))
        return out

    return pair_metrics


@functools.lru_cache(maxsize=8)
def _jitted_inception(graphdef: nnx.GraphDef) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """``(state, uint8 images) -> (features [B, 2048], logits_unbiased [B, 1008])``, jitted, cached."""

    @jax.jit
    def outputs(state: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        result = nnx.merge(graphdef, state)(images.astype(jnp.float32) / 255.0)
        return result.features, result.logits_unbiased

    return outputs


def _pair_metrics_fn(lpips: LPIPS | None, with_ssim: bool) -> Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]:
    graphdef, state = nnx.split(lpips) if lpips is not None else (None, None)
    jitted = _jitted_pair_metrics(graphdef, with_ssim)
    return lambda originals, reconstructions: jax.device_get(jitted(state, originals, reconstructions))


def inception_outputs_fn(inception: InceptionV3) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """uint8 images -> host ``(pool3 features, bias-free logits)``, jitted once per network graph."""
    graphdef, state = nnx.split(inception)
    jitted = _jitted_inception(graphdef)
    return lambda images: jax.device_get(jitted(state, images))


def _pad(batch: np.ndarray, size: int) -> np.ndarray:
    """``batch`` grown to ``size`` images by repeating its last one."""
    if len(batch) >= size:
        return batch
    return np.concatenate([batch, np.repeat(batch[-1:], size - len(batch), axis=0)])


class _PrefixTotals:
    """What one prefix length has accumulated: metric sums, Inception features and logits."""

    def __init__(self, num_tokens: int, with_inception: bool):
        self.num_tokens = num_tokens
        self.sums: dict[str, float] = {}
        self.features = FeatureStatistics() if with_inception else None
        self.logits: list[np.ndarray] = []

    def add(self, per_image: dict[str, np.ndarray], count: int) -> None:
        for name, values in per_image.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(np.sum(values[:count], dtype=np.float64))

    def add_inception(self, features: np.ndarray, logits: np.ndarray, count: int) -> None:
        self.features.add(features[:count])
        self.logits.append(np.asarray(logits[:count], np.float32))

    def row(self, num_images: int, code_counts: np.ndarray, reference: Statistics | None) -> dict[str, float]:
        row: dict[str, float] = {"num_tokens": self.num_tokens}
        row.update({name: self.sums[name] / num_images for name in PAIR_METRICS if name in self.sums})
        perplexity, usage = histogram_statistics(code_counts)
        row["codebook_usage"], row["perplexity"] = float(usage), float(perplexity)
        if self.features is not None:
            row["rfid"] = frechet_distance(self.features.mu, self.features.sigma, *reference)
            mean, spread = inception_score(np.concatenate(self.logits), inception_score_splits(num_images))
            row["inception_score"], row["inception_score_std"] = mean, spread
        return row


def evaluate_tokenizer(
    tokenizer: Tokenizer,
    batches: Iterable[np.ndarray],
    *,
    lpips: LPIPS | None = None,
    inception: InceptionV3 | None = None,
    reference: Statistics | None = None,
    prefix: bool = True,
    shown: list[np.ndarray] | None = None,
    num_shown: int = 8,
) -> tuple[dict[str, Any], Statistics | None]:
    """Reconstruction metrics of ``tokenizer`` on uint8 ``[B, S, S, 3]`` batches (S = its image size).

    Returns ``(metrics, reference)``. ``metrics`` holds the full-length ``psnr``, ``ssim``,
    ``codebook_usage``, ``perplexity`` and ``num_images``; ``lpips`` with an LPIPS module;
    ``rfid``, ``inception_score`` and ``inception_score_std`` with an Inception module; and, when
    ``prefix``, a ``prefix`` list with ``num_tokens`` and the same metrics for every preview length
    (the last is the full length). rFID compares the reconstructions with ``reference`` statistics
    when given, else with the originals' own, computed in the same pass and returned as
    ``reference`` (``None`` without Inception) so that they can be saved and reused. With
    ``prefix``, ``rate_distortion`` rows (:meth:`SameBitsTotals.rows`) put each length's bits and
    figures beside the same-bits thumbnail and the mean colour. ``shown``, a list, receives rows
    for a picture: the first ``num_shown`` originals, then their reconstructions from each preview
    length (1, 4, 16, ..., L). Raises ``ValueError`` for no images, fewer than 2
    with Inception, or reference statistics of the wrong size.
    """
    if reference is not None:
        if inception is None:
            raise ValueError("reference statistics are only used for rFID, which needs an Inception network")
        if np.shape(reference[0]) != (FEATURE_DIM,):
            raise ValueError(f"reference statistics have {np.shape(reference[0])} means; the Inception "
                             f"features have {FEATURE_DIM} dimensions")
    num_tokens = tokenizer.num_tokens
    lengths = preview_lengths(num_tokens, ratio=2) if prefix else [num_tokens]
    pictured = [k for k in lengths if k in preview_lengths(num_tokens)]
    same_bits = SameBitsTotals(lengths, tokenizer.codebook_size) if prefix else None
    pair_metrics = _pair_metrics_fn(lpips, with_ssim=tokenizer.image_size >= WIN_SIZE)
    inception_outputs = inception_outputs_fn(inception) if inception is not None else None
    originals_features = FeatureStatistics() if inception is not None and reference is None else None
    totals = {k: _PrefixTotals(k, inception is not None) for k in lengths}
    code_counts = np.zeros((num_tokens, tokenizer.codebook_size), np.int64)  # per token position
    num_images, padded_size = 0, None
    shown_parts: list[list[np.ndarray]] = [[] for _ in range(1 + len(pictured))]

    for batch_index, batch in enumerate(batches):
        batch = np.asarray(batch)
        count = len(batch)
        padded_size = padded_size or count
        images = _pad(batch, padded_size)
        ids = np.asarray(tokenizer.encode(images))
        np.add.at(code_counts, (np.arange(num_tokens)[None, :], ids[:count]), 1)
        if originals_features is not None:
            originals_features.add(inception_outputs(images)[0][:count])
        take = min(count, num_shown - num_images) if shown is not None else 0
        if take > 0:
            shown_parts[0].append(batch[:take])
        if same_bits is not None:
            same_bits.add(images, count, pair_metrics)
        for k in lengths:
            reconstructions = np.asarray(tokenizer.decode(ids[:, :k]))
            if take > 0 and k in pictured:  # the picture's rows: the preview lengths 1, 4, 16, ...
                shown_parts[1 + pictured.index(k)].append(reconstructions[:take])
            per_image = pair_metrics(images, reconstructions)
            totals[k].add(per_image, count)
            if same_bits is not None:
                same_bits.compare(k, per_image["psnr"][:count])
            if inception_outputs is not None:
                totals[k].add_inception(*inception_outputs(reconstructions), count)
        num_images += count
        if (batch_index + 1) % LOG_EVERY_BATCHES == 0:
            logging.info("evaluated %d images", num_images)

    check_image_count(num_images, inception is not None)
    if originals_features is not None:
        reference = (originals_features.mu, originals_features.sigma)
    if shown is not None:
        shown.extend(np.concatenate(parts) for parts in shown_parts)
    # Codebook figures count learned ids only: the mean-colour shortcut's ids are a colour, not codes.
    learned = code_counts[tokenizer.colour_ids:]
    rows = [totals[k].row(num_images, learned[:max(k - tokenizer.colour_ids, 0)].sum(axis=0), reference)
            for k in lengths]
    metrics: dict[str, Any] = {key: value for key, value in rows[-1].items() if key != "num_tokens"}
    metrics["num_images"] = num_images
    if prefix:
        metrics["prefix"] = rows
        metrics["rate_distortion"] = same_bits.rows(rows, num_images)
    return metrics, reference


def inception_statistics(batches: Iterable[np.ndarray], inception: InceptionV3,
                         features_out: list | None = None) -> tuple[Statistics, np.ndarray, int]:
    """Inception ``(mu, sigma)``, all bias-free logits and the image count of uint8 image batches
    (each padded to the first batch's size, so one program serves them all); ``features_out``, a
    list, also receives each batch's pool3 features (precision and recall need them)."""
    outputs = inception_outputs_fn(inception)
    statistics = FeatureStatistics()
    logits, size = [], None
    for batch in batches:
        size = size or len(batch)
        features, batch_logits = outputs(_pad(batch, size))
        statistics.add(np.asarray(features[: len(batch)], np.float64))
        if features_out is not None:
            features_out.append(np.asarray(features[: len(batch)], np.float32))
        logits.append(np.asarray(batch_logits[: len(batch)]))
    if statistics.count < 2:
        raise TooFewImagesError(f"Inception statistics need at least 2 images, got {statistics.count}")
    return (statistics.mu, statistics.sigma), np.concatenate(logits), statistics.count
