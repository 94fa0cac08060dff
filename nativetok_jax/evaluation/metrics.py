"""PSNR of uint8 images, in its two conventions.

Training's held-out evaluation pools the squared error over the whole batch (:func:`psnr`);
``python -m nativetok_jax.evaluate`` averages per-image PSNRs (:func:`psnr_per_image`), as the
papers' tables do. The pooled figure is the lower of the two when images differ in error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def psnr(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over a batch of uint8 images (MSE pooled over the batch)."""
    error = np.mean(np.square(np.asarray(reference, np.float64) - np.asarray(reconstruction, np.float64)))
    return float("inf") if error == 0 else float(10.0 * np.log10(255.0**2 / error))


def psnr_per_image(reference: jax.Array, reconstruction: jax.Array) -> jax.Array:
    """PSNR in dB ``[B]`` of each uint8 image pair (``inf`` for an exact reconstruction); jittable."""
    error = jnp.square(reference.astype(jnp.float32) - reconstruction.astype(jnp.float32))
    mse = jnp.mean(error, axis=(1, 2, 3))
    return jnp.where(mse > 0, 10.0 * jnp.log10(255.0**2 / jnp.where(mse > 0, mse, 1.0)), jnp.inf)
