"""Structural similarity (SSIM) of Wang et al. 2004, "Image quality assessment: from error
visibility to structural similarity", batched in jax.numpy.

The numbers are those of scikit-image's ``structural_similarity(a, b, gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1)`` on uint8 RGB images,
the settings its documentation gives for matching the paper: local statistics under an 11 x 11
Gaussian window (sigma 1.5, truncated at 3.5 sigma), population (co)variances, K1 = 0.01,
K2 = 0.03, and the SSIM map averaged over each channel and then over channels. scikit-image
filters the whole image (reflecting at the borders) and then drops the 5-pixel border strip
before averaging; the kept pixels are exactly those whose window lies inside the image, so
filtering only those ("valid" filtering) gives the same values without any padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SIGMA = 1.5
TRUNCATE = 3.5
RADIUS = int(TRUNCATE * SIGMA + 0.5)  # scipy.ndimage's window radius: 5
WIN_SIZE = 2 * RADIUS + 1  # 11
K1, K2 = 0.01, 0.03
DATA_RANGE = 255.0


def _gaussian_window() -> np.ndarray:
    """The normalised 1-D Gaussian taps scipy.ndimage.gaussian_filter uses for sigma 1.5."""
    offsets = np.arange(-RADIUS, RADIUS + 1, dtype=np.float64)
    taps = np.exp(-0.5 * np.square(offsets / SIGMA))
    return taps / taps.sum()


def _filter_valid(x: jax.Array, axis: int, taps: np.ndarray) -> jax.Array:
    """The Gaussian-weighted sum along ``axis`` at every position whose window fits inside.

    Written as a sum of shifted slices rather than a convolution, so no accelerator rounds it
    to a lower-precision matrix product.
    """
    length = x.shape[axis] - WIN_SIZE + 1
    return sum(float(w) * jax.lax.slice_in_dim(x, i, i + length, axis=axis) for i, w in enumerate(taps))


def _local_mean(x: jax.Array) -> jax.Array:
    taps = _gaussian_window()
    return _filter_valid(_filter_valid(x, 1, taps), 2, taps)


def ssim(reference: jax.Array, reconstruction: jax.Array) -> jax.Array:
    """Per-image SSIM ``[B]`` of uint8 (or 0..255 valued) RGB batches ``[B, H, W, C]``.

    Images must be at least 11 x 11 pixels (the window), else ``ValueError``.
    """
    if reference.shape != reconstruction.shape or reference.ndim != 4:
        raise ValueError(f"ssim compares two [B, H, W, C] batches of one shape, got "
                         f"{reference.shape} and {reconstruction.shape}")
    height, width = reference.shape[1:3]
    if min(height, width) < WIN_SIZE:
        raise ValueError(f"ssim needs images of at least {WIN_SIZE} x {WIN_SIZE} pixels (its Gaussian "
                         f"window), got {height} x {width}")
    x = reference.astype(jnp.float32)
    y = reconstruction.astype(jnp.float32)
    mean_x, mean_y = _local_mean(x), _local_mean(y)
    # (Co)variances are shift invariant; centring on mid-grey first keeps the squares, and so
    # the float32 cancellation in E[x^2] - E[x]^2, four times smaller.
    centre = DATA_RANGE / 2
    xc, yc = x - centre, y - centre
    mean_xc, mean_yc = mean_x - centre, mean_y - centre
    var_x = _local_mean(xc * xc) - mean_xc * mean_xc
    var_y = _local_mean(yc * yc) - mean_yc * mean_yc
    cov_xy = _local_mean(xc * yc) - mean_xc * mean_yc
    c1, c2 = (K1 * DATA_RANGE) ** 2, (K2 * DATA_RANGE) ** 2
    numerator = (2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)
    denominator = (mean_x * mean_x + mean_y * mean_y + c1) * (var_x + var_y + c2)
    return jnp.mean(numerator / denominator, axis=(1, 2, 3))
