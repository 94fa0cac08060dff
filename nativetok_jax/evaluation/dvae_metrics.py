"""A Dynamic VAE's reconstruction quality over an image set, overall and per routed grain.

One pass: each batch is routed (the DVAE's own router), encoded to the posterior mean and
decoded, and compared with its original through the tokenizer path's metric code
(:mod:`nativetok_jax.evaluation.tokenizer_metrics`: PSNR, SSIM, LPIPS per image and averaged;
rFID and Inception Score from pool3 features). What is particular to the DVAE:

- ``psnr_fine`` / ``psnr_coarse``: ``10 log10(255^2 / MSE)`` with the MSE pooled over every pixel
  and channel of the regions routed fine (coarse) in the whole set (a per-image average would
  drop the images with no region of that grain and weigh a single region like a whole image);
- ``fine_fraction``: routed-fine regions / all regions; ``fine_fraction_per_class`` by label;
- ``block_mean_psnr`` (``_ssim``, ``_lpips``, ``_psnr_fine``, ``_psnr_coarse``): the model-free
  codec of the DVAE's *own* routing at the same number of codes
  (:func:`nativetok_jax.evaluation.block_mean_routing.routed_block_means`): each region routed to
  a grain rebuilt from that grain's block means (one rounded RGB mean per f x f block, f the
  grain's factor, where the DVAE holds one latent), measured as the DVAE is; ``codes_per_image``
  counts those codes (each coarse code once).

Batches are padded to the first batch's size (repeating the last image, the copies dropped from
every sum), so each jitted function compiles once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from nativetok_jax.evaluation.block_mean_routing import routed_block_means
from nativetok_jax.evaluation.fid import FeatureStatistics, frechet_distance, inception_score
from nativetok_jax.evaluation.metrics import psnr_of_squared_error
from nativetok_jax.evaluation.ssim import WIN_SIZE
from nativetok_jax.evaluation.tokenizer_metrics import (
    PAIR_METRICS,
    Statistics,
    _pad,
    _pair_metrics_fn,
    check_image_count,
    inception_outputs_fn,
    inception_score_splits,
)
from nativetok_jax.models.d2it import grain_router

COARSE_SHADE = 0.3  # how dark coarse regions are drawn in grain-map pictures


def grain_map_picture(images: np.ndarray, grains: np.ndarray) -> np.ndarray:
    """uint8 images ``[B, H, W, 3]`` with their coarse regions darkened (fine regions as they are):
    the grain map drawn on the image it routes."""
    scale = images.shape[1] // grains.shape[1]
    fine = np.repeat(np.repeat(np.asarray(grains), scale, axis=1), scale, axis=2)[..., None] > 0
    return np.where(fine, images, (images * COARSE_SHADE).astype(np.uint8))


def grid_with_grain_maps(images: np.ndarray, grains: np.ndarray, columns: int) -> list[np.ndarray]:
    """Rows for :func:`~nativetok_jax.evaluation.grids.save_grid`: each sample followed by itself with
    its coarse regions darkened (the grain map it was drawn with), ``columns`` samples a row."""
    pictures = grain_map_picture(images, np.asarray(grains))
    pairs = np.stack([images, pictures], axis=1).reshape(-1, *images.shape[1:])  # sample, map, sample, map ...
    width = 2 * max(1, columns)
    return [pairs[i:i + width] for i in range(0, len(pairs), width)]


def region_squared_errors(originals: np.ndarray, reconstructions: np.ndarray, grains: np.ndarray
                          ) -> dict[str, tuple[float, int]]:
    """``{"fine"|"coarse": (sum of squared errors, number of values)}`` over the pixels (and
    channels) of the regions routed to each grain."""
    scale = originals.shape[1] // grains.shape[1]
    fine = np.repeat(np.repeat(np.asarray(grains) > 0, scale, axis=1), scale, axis=2)
    error = np.sum(np.square(originals.astype(np.float64) - reconstructions.astype(np.float64)), axis=-1)
    channels = originals.shape[-1]
    return {"fine": (float(error[fine].sum()), int(fine.sum()) * channels),
            "coarse": (float(error[~fine].sum()), int((~fine).sum()) * channels)}


def evaluate_dvae(
    dvae: Any,
    batches: Iterable[np.ndarray | tuple[np.ndarray, np.ndarray]],
    *,
    lpips: Any = None,
    inception: Any = None,
    reference: Statistics | None = None,
    shown: list[np.ndarray] | None = None,
    num_shown: int = 8,
    seed: int = 0,
) -> tuple[dict[str, Any], Statistics | None]:
    """Reconstruction metrics of ``dvae`` (a :class:`nativetok_jax.dvae.DVAE`) on uint8 ``[B, S, S, 3]``
    batches, or ``(images, labels)`` pairs for per-class fine fractions.

    Returns ``(metrics, reference)``: ``psnr``, ``ssim`` (images of at least 11 px), ``lpips`` (with
    an LPIPS module), ``rfid``, ``inception_score``, ``inception_score_std`` (with an Inception
    module), ``psnr_fine``, ``psnr_coarse`` (None when no region had that grain), ``fine_fraction``,
    ``fine_fraction_per_class``, the block means of its own routing (``block_mean_psnr``,
    ``block_mean_ssim``, ``block_mean_lpips`` with LPIPS, ``block_mean_psnr_fine``,
    ``block_mean_psnr_coarse``), ``codes_per_image`` and ``num_images``. rFID uses ``reference`` when given, else the
    originals' own statistics (returned). ``shown`` receives three rows: originals,
    reconstructions, grain maps. ``seed`` drives random routing. Raises ``ValueError`` for no
    images or fewer than 2 with Inception.
    """
    pair_metrics = _pair_metrics_fn(lpips, with_ssim=dvae.image_size >= WIN_SIZE)
    inception_outputs = inception_outputs_fn(inception) if inception is not None else None
    originals_features = FeatureStatistics() if inception is not None and reference is None else None
    features = FeatureStatistics() if inception is not None else None
    logits: list[np.ndarray] = []
    sums: dict[str, float] = {}
    regions = {"fine": [0.0, 0], "coarse": [0.0, 0]}
    block_sums: dict[str, float] = {}
    block_regions = {"fine": [0.0, 0], "coarse": [0.0, 0]}
    codes = 0.0
    factors = dvae.router.factors
    fine_by_class: dict[int, list[int]] = {}
    shown_parts: list[list[np.ndarray]] = [[], [], []]
    num_images, padded_size = 0, None
    for batch_index, batch in enumerate(batches):
        images, labels = batch if isinstance(batch, tuple) else (batch, np.zeros(len(batch), np.int64))
        images = np.asarray(images)
        count = len(images)
        padded_size = padded_size or count
        padded = _pad(images, padded_size)
        latents, grains = dvae.encode(padded, seed=seed + batch_index)
        reconstructions = np.asarray(dvae.decode(latents, grains))
        grains = np.asarray(grains)
        for name, values in pair_metrics(padded, reconstructions).items():
            sums[name] = sums.get(name, 0.0) + float(np.sum(values[:count], dtype=np.float64))
        for name, (error, values) in region_squared_errors(images, reconstructions[:count], grains[:count]).items():
            regions[name][0] += error
            regions[name][1] += values
        block_means = routed_block_means(padded, grains, factors)  # the model-free codec of this routing
        for name, values in pair_metrics(padded, block_means).items():
            block_sums[name] = block_sums.get(name, 0.0) + float(np.sum(values[:count], dtype=np.float64))
        for name, (error, values) in region_squared_errors(images, block_means[:count], grains[:count]).items():
            block_regions[name][0] += error
            block_regions[name][1] += values
        codes += float(np.sum(np.asarray(grain_router.code_weights(grains[:count], factors)), dtype=np.float64))
        for label, grain_map in zip(np.asarray(labels)[:count], grains[:count]):
            totals = fine_by_class.setdefault(int(label), [0, 0])
            totals[0] += int(np.sum(grain_map > 0))
            totals[1] += grain_map.size
        if inception_outputs is not None:
            if originals_features is not None:
                originals_features.add(inception_outputs(padded)[0][:count])
            batch_features, batch_logits = inception_outputs(reconstructions)
            features.add(batch_features[:count])
            logits.append(np.asarray(batch_logits[:count], np.float32))
        take = min(count, num_shown - num_images) if shown is not None else 0
        if take > 0:
            for part, rows in zip(shown_parts, (images, reconstructions, grain_map_picture(images, grains[:count]))):
                part.append(rows[:take])
        num_images += count
    check_image_count(num_images, inception is not None)
    metrics: dict[str, Any] = {name: sums[name] / num_images for name in PAIR_METRICS if name in sums}
    metrics.update({f"psnr_{name}": psnr_of_squared_error(*totals) for name, totals in regions.items()})
    fine = sum(v[0] for v in fine_by_class.values())
    metrics["fine_fraction"] = fine / sum(v[1] for v in fine_by_class.values())
    metrics["fine_fraction_per_class"] = {str(k): v[0] / v[1] for k, v in sorted(fine_by_class.items())}
    metrics.update({f"block_mean_{name}": block_sums[name] / num_images for name in PAIR_METRICS if name in block_sums})
    metrics.update({f"block_mean_psnr_{name}": psnr_of_squared_error(*totals)
                    for name, totals in block_regions.items()})
    metrics["codes_per_image"] = codes / num_images
    if inception is not None:
        if originals_features is not None:
            reference = (originals_features.mu, originals_features.sigma)
        metrics["rfid"] = frechet_distance(features.mu, features.sigma, *reference)
        metrics["inception_score"], metrics["inception_score_std"] = inception_score(
            np.concatenate(logits), inception_score_splits(num_images))
    metrics["num_images"] = num_images
    if shown is not None:
        shown.extend(np.concatenate(parts) for parts in shown_parts)
    return metrics, reference


def dvae_protocol(dvae: Any) -> dict[str, Any]:
    """What ``evaluate`` records about how a Dynamic VAE was judged."""
    config = dvae.model_config
    return {
        "reconstruction": "decode(encode(x)) in uint8: the posterior mean of the routed latents, decoded",
        "routing": {"mode": config.routing, "fine_ratio": config.fine_ratio, "thresholds": config.thresholds,
                    "region_size": config.coarse_factor, "entropy": config.entropy_settings.to_dict(),
                    "random_seed": "batch index (random routing only)"},
        "grains": {"coarse_factor": config.coarse_factor, "fine_factor": config.fine_factor},
        "latent_scale": dvae.latent_scale,
        "psnr_by_grain": "10 log10(255^2 / MSE), MSE pooled over every pixel and channel of the regions routed "
                         "fine (coarse) in the whole set; null when no region had that grain",
        "fine_fraction": "regions routed fine / all regions; per class by label",
        "block_mean": (f"the model-free codec of the same routing at the same number of codes: each region rebuilt "
                       f"from its grain's block means (the rounded mean colour of every f x f block, f = "
                       f"{config.coarse_factor} coarse, {config.fine_factor} fine; 3 uint8 values per code where the "
                       f"DVAE holds {config.latent_channels} floats), measured as the DVAE; codes_per_image counts "
                       f"each coarse code once"),
    }
