"""Reconstruction metrics on uint8 images."""

from __future__ import annotations

import numpy as np


def psnr(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over a batch of uint8 images (MSE pooled over the batch)."""
    error = np.mean(np.square(np.asarray(reference, np.float64) - np.asarray(reconstruction, np.float64)))
    return float("inf") if error == 0 else float(10.0 * np.log10(255.0**2 / error))
