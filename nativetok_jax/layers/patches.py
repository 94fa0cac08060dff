"""Images <-> sequences of flattened patches."""

from __future__ import annotations

import einops
import jax


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, (H/p)*(W/p), p*p*C]``, row-major over the patch grid."""
    return einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(patches: jax.Array, patch_size: int, grid: int, channels: int = 3) -> jax.Array:
    """Inverse of :func:`patchify` for a square ``grid x grid`` patch layout."""
    return einops.rearrange(
        patches, "b (h w) (p q c) -> b (h p) (w q) c", h=grid, w=grid, p=patch_size, q=patch_size, c=channels
    )
