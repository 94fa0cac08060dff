"""PSNR of uint8 images: one convention everywhere, the per-image mean.

Every PSNR the project reports (training's held-out evaluation and its ``eval.json``, the
no-model baselines, ``python -m nativetok_jax.evaluate``) is the mean over images of each
image's PSNR, as the papers' tables report it (TiTok, MaskGIT, skimage's ``peak_signal_noise_ratio``
averaged over a set). Pooling the squared error over a batch first gives a different, lower
number whenever images differ in error; it is not used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PEAK = 255.0


def psnr_per_image(reference: jax.Array, reconstruction: jax.Array) -> jax.Array:
    """PSNR in dB ``[B]`` of each uint8 image pair ``[B, H, W, C]``: ``10 log10(255^2 / MSE)``
    with the MSE over pixels and channels (``inf`` for an exact reconstruction); jittable."""
    error = jnp.square(reference.astype(jnp.float32) - reconstruction.astype(jnp.float32))
    mse = jnp.mean(error, axis=(1, 2, 3))
    return jnp.where(mse > 0, 10.0 * jnp.log10(PEAK**2 / jnp.where(mse > 0, mse, 1.0)), jnp.inf)


def psnr_of_squared_error(squared_error: float, count: int) -> float | None:
    """PSNR (dB, peak 255) of a squared error summed over ``count`` values: None when there were
    none, inf for an exact match."""
    if count == 0:
        return None
    mse = squared_error / count
    return float("inf") if mse == 0 else float(10.0 * np.log10(PEAK**2 / mse))


def pooled_psnr(reference: np.ndarray, reconstruction: np.ndarray) -> float | None:
    """PSNR (dB) of the MSE pooled over every value of two uint8 arrays of any (equal) shape, e.g.
    the pixels of some regions of a set; None for empty arrays."""
    error = np.square(np.asarray(reference, np.float64) - np.asarray(reconstruction, np.float64))
    return psnr_of_squared_error(float(error.sum()), error.size)


def psnr(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """Mean over images of :func:`psnr_per_image`, in dB, for uint8 ``[B, H, W, C]`` batches."""
    return float(np.mean(np.asarray(psnr_per_image(jnp.asarray(reference), jnp.asarray(reconstruction)), np.float64)))
