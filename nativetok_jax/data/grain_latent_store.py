"""A grain latent store: a dataset encoded once by a Dynamic VAE, for the diffusion stage (D²iT).

    DIR/meta.json              what was encoded, how, and whether it is complete
    DIR/labels-00000.npy       int32 [n]
    DIR/grains-00000.npy       int8 [n, 2, H/S, W/S]      grain maps (1 fine, 0 coarse)
    DIR/logvar-00000.npy       float32 [n, 2, h, w, C]    routed posterior log-variances
    DIR/mean-00000.npy         float32 [n, 2, h, w, C]    routed posterior means (unscaled)

Axis 1 holds the image (0) and its horizontal flip (1), each routed and encoded on its own (a
flip's grain map is the flipped map, ``grain_map(flip(x)) == flip(grain_map(x))``, but its latents
are the encoder's, not flipped latents), so a diffusion trainer samples ``mean + exp(logvar / 2) *
noise`` (noise drawn per grain and neighbour-copied, :func:`nativetok_jax.models.d2it.dvae.sample_latents`)
of a random one of the two each step, as DiT does with its flips. Latents are unscaled: multiply
by ``meta["latent_scale"]``.

The files, resumption and refusal are the array store's (:mod:`nativetok_jax.data.token_store`):
shards are written whole, the means last, so an interrupted extraction resumes after the last
finished shard; a store whose ``meta.json`` describes other settings is refused with a one-line
:class:`~nativetok_jax.data.token_store.TokenStoreError`. The writer is
:func:`nativetok_jax.training.grain_latent_extraction.extract_grain_latents`.
"""

from __future__ import annotations

import numpy as np

from nativetok_jax.data.token_store import ArraySource


class GrainLatentSource(ArraySource):
    """Random access to a complete store: ``source[i] -> {"mean", "logvar": float32 [2, h, w, C],
    "grains": int32 [2, H/S, W/S], "label": int32}`` (axis 0: the image and its flip)."""

    FIELDS = {"grains": np.int32, "logvar": np.float32, "mean": np.float32}  # in the order they are written
    kind = "grain latent"

    @property
    def latent_scale(self) -> float:
        return float(self.meta["latent_scale"])
