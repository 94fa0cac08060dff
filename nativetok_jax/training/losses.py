"""The training objective: a pixel loss and the quantiser's losses.

Perceptual and adversarial terms (the paper's full recipe) plug in as further entries of the
same dictionary of weighted terms; each term is also reported as a metric.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from nativetok_jax.models.quantizer import Quantized


def pixel_loss(kind: str, reconstruction: jax.Array, images: jax.Array) -> jax.Array:
    """Mean L1 or L2 distance of images in [-1, 1]."""
    difference = reconstruction.astype(jnp.float32) - images
    return jnp.mean(jnp.abs(difference)) if kind == "l1" else jnp.mean(jnp.square(difference))


def loss_terms(
    losses: ml_collections.ConfigDict, images: jax.Array, reconstruction: jax.Array, quantized: Quantized
) -> dict[str, jax.Array]:
    """Weighted terms whose sum is the loss; keys name them in logs."""
    return {
        f"{losses.pixel}_loss": losses.pixel_weight * pixel_loss(losses.pixel, reconstruction, images),
        "quantizer_loss": losses.quantizer_weight * quantized.loss,
    }
