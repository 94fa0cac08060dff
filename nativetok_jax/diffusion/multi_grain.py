"""D²iT's multi-grained diffusion: noise, outputs and loss weights that respect a grain map.

Source: D²iT (Jia et al., CVPR 2025, arXiv 2504.09454) section 3.2, "multi-grained noise"; the
details the paper leaves open are ours (``docs/d2it.md``, "Dynamic Diffusion Transformer").

A grain map ``grains`` is int ``[B, gh, gw]``, one cell per region (1 fine, 0 coarse). The latent
lives on the fine grid ``[B, 2gh, 2gw, C]``; a coarse region holds one code copied onto its 2 x 2
cells (the Dynamic VAE's neighbour copying), a fine region four codes. Our choices [C]:

- the noise is drawn on the coarse grid and copied 2 x 2 in coarse regions, independently per
  cell in fine regions: unit variance at every cell, so DiT's schedule is unchanged, and a coarse
  region's cells stay one code through the forward process;
- the network's noise and variance outputs are averaged over each coarse region's copies
  (:func:`average_coarse`), so with multi-grained noise every reverse step keeps the copies exact;
- the dynamic grain loss weights each latent *code* once: a coarse region's four copies 1/4
  each, a fine cell 1 (DQ-VAE's codebook mask [A]); ``(1, 1)`` weighs every cell alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FINE = 1  # the grain map's value of a fine region (0 is coarse), as the Dynamic VAE's router writes it
COPIES = 2  # fine cells per region side: the fine grid (f8) is twice the coarse grid (f16)


def check_grains(grains: jax.Array, latent_shape: tuple[int, ...], name: str = "grains") -> None:
    """Raises ``ValueError`` naming ``name`` unless ``grains`` is an integer ``[B, h/2, w/2]`` map for
    fine-grid latents of shape ``latent_shape`` ``[B, h, w, ...]`` (checked at trace time, before
    anything compiles)."""
    if not jnp.issubdtype(grains.dtype, jnp.integer) and grains.dtype != jnp.bool_:
        raise ValueError(f"{name} must be an integer grain map (1 fine, 0 coarse), got dtype {grains.dtype}")
    b, h, w = latent_shape[:3]
    if h % COPIES or w % COPIES:
        raise ValueError(f"{name}: the fine latent grid {h} x {w} is not a whole number of 2 x 2 regions")
    expected = (b, h // COPIES, w // COPIES)
    if tuple(grains.shape) != expected:
        raise ValueError(f"{name} must be [{', '.join(map(str, expected))}] for latents "
                         f"{tuple(latent_shape)}, got {tuple(grains.shape)}")


def to_fine_grid(grid: jax.Array) -> jax.Array:
    """``[B, gh, gw, ...]`` per region -> ``[B, 2gh, 2gw, ...]``, each region's value on its 2 x 2 cells."""
    return jnp.repeat(jnp.repeat(grid, COPIES, axis=1), COPIES, axis=2)


def fine_cells(grains: jax.Array) -> jax.Array:
    """bool ``[B, 2gh, 2gw, 1]``: whether each fine-grid cell lies in a fine region."""
    return to_fine_grid(grains == FINE)[..., None]


def copy_coarse(coarse: jax.Array, fine: jax.Array, grains: jax.Array) -> jax.Array:
    """``fine [B, h, w, C]`` in fine regions, ``coarse [B, h/2, w/2, C]`` copied 2 x 2 in coarse ones."""
    return jnp.where(fine_cells(grains), fine, to_fine_grid(coarse))


def average_coarse(x: jax.Array, grains: jax.Array) -> jax.Array:
    """Each coarse region's 2 x 2 cells replaced by their mean; fine cells untouched.

    Args:
      x: ``[B, h, w, C]`` on the fine grid (any float dtype; the model's noise and variance values).
      grains: int ``[B, h/2, w/2]``, 1 fine, 0 coarse.

    Returns:
      ``x``'s shape and dtype. A coarse region's four cells are bit-identical, and an input whose
      coarse regions already are exact copies comes back bit-identical: the mean is taken as
      ``((a + b) + (c + d)) / 4``, which is exact for ``a = b = c = d`` (``a + a`` and ``2a + 2a``
      are exact in floating point, a division by 4 too). So the samplers may average an output the
      model has averaged already.

    Raises:
      ValueError: ``grains`` of the wrong shape or dtype.
    """
    check_grains(grains, x.shape)
    b, h, w = x.shape[:3]
    blocks = x.reshape(b, h // COPIES, COPIES, w // COPIES, COPIES, *x.shape[3:])
    mean = ((blocks[:, :, 0, :, 0] + blocks[:, :, 0, :, 1]) + (blocks[:, :, 1, :, 0] + blocks[:, :, 1, :, 1])) * 0.25
    return copy_coarse(mean.astype(x.dtype), x, grains)


def multi_grain_noise(key: jax.Array, grains: jax.Array, channels: int) -> jax.Array:
    """Multi-grained standard-normal noise on the fine grid: float32 ``[B, 2gh, 2gw, channels]``.

    Drawn on the coarse grid and copied 2 x 2 in coarse regions, independently per cell in fine
    regions: every cell has unit variance, and a coarse region's cells are exact copies.

    Args:
      key: one PRNG key for the batch, or ``[B]`` keys, one per sample; with per-sample keys a
        sample's noise depends on its own key and grain map only, not on its batch (the samplers
        fold each sample's key from its index).
      grains: int ``[B, gh, gw]``, 1 fine, 0 coarse.
      channels: latent channels ``C``.

    Raises:
      ValueError: ``grains`` not ``[B, gh, gw]`` integers, or ``[B]`` keys for another ``B``.
    """
    if grains.ndim != 3:
        raise ValueError(f"grains must be an integer grain map [B, gh, gw], got shape {tuple(grains.shape)}")
    b, gh, gw = grains.shape
    check_grains(grains, (b, COPIES * gh, COPIES * gw))

    def draw(k: jax.Array, g: jax.Array) -> jax.Array:
        coarse_key, fine_key = jax.random.split(k)
        coarse = jax.random.normal(coarse_key, (gh, gw, channels), jnp.float32)
        fine = jax.random.normal(fine_key, (COPIES * gh, COPIES * gw, channels), jnp.float32)
        return copy_coarse(coarse[None], fine[None], g[None])[0]

    if key.ndim == 0:
        key = jax.random.split(key, b)
    elif key.shape != (b,):
        raise ValueError(f"multi_grain_noise: {key.shape[0]} keys for a batch of {b} grain maps")
    return jax.vmap(draw)(key, grains)


def grain_loss_weights(grains: jax.Array, coarse_weight: float = 0.25, fine_weight: float = 1.0) -> jax.Array:
    """The dynamic grain loss's per-position weights, float32 ``[B, 2gh, 2gw]`` on the fine grid.

    Defaults weigh each latent code once (a coarse region's four copies 1/4 each, a fine cell 1;
    DQ-VAE's codebook mask [A]); ``(1, 1)`` weighs every cell alike (the paper's ablation without
    the dynamic grain loss). Pass to :func:`nativetok_jax.diffusion.losses.diffusion_loss` as
    ``weights``.

    Raises:
      ValueError: a negative weight, or both zero.
    """
    if coarse_weight < 0 or fine_weight < 0 or coarse_weight + fine_weight == 0:
        raise ValueError(f"grain loss weights must be >= 0 and not both 0, got ({coarse_weight}, {fine_weight})")
    return to_fine_grid(jnp.where(grains == FINE, jnp.float32(fine_weight), jnp.float32(coarse_weight)))
