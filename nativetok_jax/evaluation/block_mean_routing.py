"""The model-free routing experiment: does entropy routing put the fine grain where it pays?

A grain's "codec" here is the block mean: every f x f pixel block replaced by its mean colour
(rounded to uint8), f being the grain's factor. A grain map chooses, region by region (S x S px),
which grain's block means an image is rebuilt from. Arms, at the same number of codes:

- ``entropy``: the router's grain map (D²iT's routing);
- ``random``: the same number of fine regions in every image as ``entropy``, at random positions
  (so only *where* the fine grain goes differs);
- ``fine`` and ``coarse``: every region at one grain (the upper and lower bounds).

For each arm: PSNR over all pixels (the project's one PSNR, the mean over images), PSNR over the
pixels of its fine-routed and of its coarse-routed regions (MSE pooled over the set), the fine fraction and codes per image. It needs no
training and runs in seconds; ``python -m nativetok_jax.experiments.grain_routing`` reports it
beside the trained DVAE arms.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from nativetok_jax.evaluation.metrics import pooled_psnr, psnr
from nativetok_jax.models.d2it import grain_router

ARMS = ("entropy", "random", "fine", "coarse")


def block_means(images: np.ndarray, factor: int) -> np.ndarray:
    """uint8 ``[B, H, W, C]`` -> uint8, each ``factor x factor`` block set to its rounded mean colour."""
    b, h, w, c = images.shape
    blocks = images.astype(np.float64).reshape(b, h // factor, factor, w // factor, factor, c)
    means = np.round(blocks.mean(axis=(2, 4)))
    return np.repeat(np.repeat(means, factor, axis=1), factor, axis=2).astype(np.uint8)


def routed_block_means(images: np.ndarray, grains: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Each S x S region rebuilt from the block means of its grain (``factors`` coarsest first)."""
    per_grain = [block_means(images, f) for f in factors]
    return np.asarray(grain_router.neighbour_copy(per_grain, np.asarray(grains)))


def shuffled_grains(grains: np.ndarray, seed: int) -> np.ndarray:
    """Every image's grain map with its regions' grains permuted at random (same counts per image)."""
    rng = np.random.default_rng(seed)
    flat = np.asarray(grains).reshape(len(grains), -1)
    return np.stack([rng.permutation(row) for row in flat]).reshape(np.shape(grains))


def _psnr_where(images: np.ndarray, rebuilt: np.ndarray, pixel_mask: np.ndarray) -> float | None:
    # Pooled, as the protocol says (metrics.psnr is a per-image mean and needs whole images).
    return pooled_psnr(images[pixel_mask], rebuilt[pixel_mask])


def block_mean_routing(images: Any, router: grain_router.GrainRouter, seed: int = 0) -> dict[str, Any]:
    """Runs the four arms on uint8 images ``[B, H, W, 3]`` with a two-grain entropy router.

    Returns ``{"arms": {arm: {"psnr", "psnr_fine_regions", "psnr_coarse_regions", "fine_fraction",
    "codes_per_image"}}, "factors", "region_size", "num_images", "protocol"}``; a PSNR is ``None``
    where an arm routes no region to that grain. Raises ``GrainError`` for a router of other than
    two grains or images it cannot split.
    """
    if router.num_grains != 2:
        raise grain_router.GrainError(f"the block-mean experiment compares two grains, the router has {router.num_grains}")
    images = np.asarray(images)
    entropy_grains = np.asarray(router(images))
    maps = {
        "entropy": entropy_grains,
        "random": shuffled_grains(entropy_grains, seed),
        "fine": np.ones_like(entropy_grains),
        "coarse": np.zeros_like(entropy_grains),
    }
    size = router.settings.region_size
    codes_per_fine_region = (size // router.factors[-1]) ** 2
    arms = {}
    for arm, grains in maps.items():
        rebuilt = routed_block_means(images, grains, router.factors)
        fine_pixels = np.asarray(grain_router.expand(jnp.asarray(grains), size)) == 1
        fine_pixels = np.broadcast_to(fine_pixels[..., None], images.shape)
        codes = np.asarray(grain_router.code_weights(grains, router.factors)).sum(axis=(1, 2))
        arms[arm] = dict(
            psnr=psnr(images, rebuilt),
            psnr_fine_regions=_psnr_where(images, rebuilt, fine_pixels),
            psnr_coarse_regions=_psnr_where(images, rebuilt, ~fine_pixels),
            fine_fraction=float(grains.mean()),
            codes_per_image=float(codes.mean()),
        )
    return dict(
        arms=arms, factors=list(router.factors), region_size=size, num_images=int(len(images)),
        codes_per_image_all_fine=codes_per_fine_region * entropy_grains[0].size,
        protocol=("block means (rounded to uint8) at each grain's factor, routed per S x S region; psnr: mean over "
                  "images of each image's PSNR (dB); region PSNRs with the squared error pooled over the routed "
                  "regions' pixels of all images; "
                  "random = each image's entropy grain map with its regions permuted"),
    )
