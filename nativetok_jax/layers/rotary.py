"""Rotary position embeddings (RoPE) for queries and keys.

Positions are passed explicitly rather than inferred from the sequence length, so a cached
decoding step that computes one row can rotate it by its true position. Each head's features
are split into two halves that form the (real, imaginary) parts of ``head_dim / 2`` rotating
pairs; the rotation is computed in float32 and cast back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary_frequencies(head_dim: int, base: float = 10000.0) -> jax.Array:
    """The ``head_dim / 2`` angular frequencies ``base ** (-2i / head_dim)``."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    return base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rotary(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotates ``x`` of shape ``[batch, length, heads, head_dim]`` by its positions.

    Args:
      x: queries or keys.
      positions: integer ``[length]`` or ``[batch, length]``, the absolute position of each row.
      base: the RoPE wavelength base.
    """
    dtype = x.dtype
    angles = positions.astype(jnp.float32)[..., None] * rotary_frequencies(x.shape[-1], base)  # [(B,) T, D/2]
    if angles.ndim == 2:
        angles = angles[None]
    cos = jnp.cos(angles)[:, :, None, :]  # [B|1, T, 1, D/2]
    sin = jnp.sin(angles)[:, :, None, :]
    real, imaginary = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([real * cos - imaginary * sin, real * sin + imaginary * cos], axis=-1)
    return rotated.astype(dtype)
