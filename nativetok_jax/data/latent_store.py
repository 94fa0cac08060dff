"""A latent store: a dataset encoded once by the diffusion model's autoencoder (the array store of
:mod:`nativetok_jax.data.token_store`, with posterior moments as its one field).

    DIR/meta.json              what was encoded, how, and whether it is complete
    DIR/moments-00000.npy      float32 [shard_size, 2, K, h, w, c]
    DIR/labels-00000.npy       int32 [shard_size]

Axis 1 is the image and its horizontal flip (DiT trains on random flips: both are encoded once,
the step picks one). Axis 2 holds the posterior's mean and log-variance (``K = 2``; the trainer
draws a fresh latent from them every step, as DiT does), or the mean alone (``K = 1``) for a
deterministic autoencoder: pixel space, whose "latent" is the image in [-1, 1] exactly, with no
noise to draw and half the bytes.
"""

from __future__ import annotations

import numpy as np

from nativetok_jax.data.token_store import ArraySource


class LatentSource(ArraySource):
    """Random access to a complete latent store:
    ``source[i] -> {"moments": float32 [2, K, h, w, c], "label": int32}``."""

    FIELDS = {"moments": np.float32}
    kind = "latent"

    @property
    def moments_shape(self) -> tuple[int, ...]:
        """``(2, K, h, w, c)``: flips, moments (K = 2: mean and log-variance; 1: mean only), latent."""
        return tuple(self.meta["moments_shape"])

    @property
    def deterministic(self) -> bool:
        """The store holds means only: the latent is the mean (pixel space)."""
        return self.moments_shape[1] == 1
