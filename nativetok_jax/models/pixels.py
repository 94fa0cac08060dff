"""The pixel range the models work in, and the conversions from and to uint8 images."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def images_to_model(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def model_to_images(x: jax.Array) -> jax.Array:
    """float [-1, 1] -> uint8, rounding to the nearest level."""
    return jnp.round(jnp.clip((x.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0)).astype(jnp.uint8)
