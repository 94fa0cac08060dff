"""Patch embedding with a class token and learned positions, shared by the image encoders."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.layers.dense import Dense
from nativetok_jax.layers.partitioning import param
from nativetok_jax.layers.patches import patchify

POSITION_INIT = nnx.initializers.normal(stddev=1.0)


class PatchEmbedding(nnx.Module):
    """Image ``[B, H, W, 3]`` -> ``[B, 1 + (H/p)*(W/p), width]``: class token, then patches."""

    def __init__(self, image_size: int, patch_size: int, width: int, *, rngs: nnx.Rngs, dtype: jnp.dtype):
        self.patch_size = patch_size
        num_patches = (image_size // patch_size) ** 2
        self.projection = Dense(patch_size * patch_size * 3, width, axes=("patch", "embed"), rngs=rngs, dtype=dtype)
        self.class_token = param(rngs, POSITION_INIT, (width,), ("embed",))
        self.position = param(rngs, POSITION_INIT, (num_patches + 1, width), ("position", "embed"))

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.projection(patchify(images, self.patch_size))
        cls = jnp.broadcast_to(self.class_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position[...].astype(x.dtype)
