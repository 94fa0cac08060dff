"""D²iT's sampling pipeline: grain maps (drawn by the grain transformer, the held-out store's, or
random at the data's fine fraction), then the latent given them by DDPM or DDIM with guidance, then
the Dynamic VAE's decoding. Used by the trainer's preview and ``python -m nativetok_jax.sample``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from nativetok_jax.dvae import DVAE
from nativetok_jax.generation.diffusion_sampling import diffusion_sampler
from nativetok_jax.generation.grain_maps import sample_grain_maps
from nativetok_jax.layers.partitioning import axis_rules
from nativetok_jax.models.d2it import grain_router
from nativetok_jax.models.d2it.grain_transformer import grain_sampling_settings

GRAIN_MAP_MODES = ("model", "ground_truth", "random")


class D2iTSampler:
    """Draws images from a D²iT: grain maps, then the latent given them, then the DVAE's decoding.

    ``sample(params, labels, key, sample_indices, grains)`` -> float32 scaled latents, and
    :meth:`grain_maps` / :meth:`decode` around it. Used by the trainer's preview and by
    ``python -m nativetok_jax.sample`` (``sample_d2it``).
    """

    def __init__(self, graphdef: nnx.GraphDef, config: ml_collections.ConfigDict, dvae: DVAE, latent_scale: float,
                 mesh: jax.sharding.Mesh, rules: Any, *, method: str, respacing: str, eta: float = 0.0,
                 guidance_scale: float = 1.0, grain_settings: dict[str, Any] | None = None):
        self.mesh, self.rules, self.dvae, self.latent_scale = mesh, rules, dvae, float(latent_scale)
        self.grain_shape = tuple(dvae.grain_map_shape)
        self.sample = diffusion_sampler(
            graphdef, config.model, mesh, method=method, respacing=respacing, eta=eta, guidance_scale=guidance_scale,
            apply_fn=lambda params, x, t, y, g: nnx.merge(graphdef, params).content(x, t, y, g),
            shape=dvae.latent_shape)
        settings = grain_sampling_settings(config.grain_transformer) if grain_settings is None else grain_settings
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._grain_maps = jax.jit(
            lambda params, labels, key: sample_grain_maps(nnx.merge(graphdef, params).grain, labels, key, **settings),
            out_shardings=replicated)

    def generated_grain_maps(self, params: Any, labels: np.ndarray, key: jax.Array) -> np.ndarray:
        """int32 ``[B, gh, gw]`` drawn by the grain transformer for ``labels``."""
        with jax.set_mesh(self.mesh), axis_rules(self.rules):
            return np.asarray(self._grain_maps(params, jnp.asarray(labels, jnp.int32), key))

    def latents(self, params: Any, labels: np.ndarray, key: jax.Array, indices: np.ndarray,
                grains: np.ndarray) -> np.ndarray:
        """Scaled latents ``[B, h, w, C]`` for ``labels`` and grain maps (sample ``i``'s noise from
        ``fold_in(key, indices[i])``)."""
        with jax.set_mesh(self.mesh), axis_rules(self.rules):
            return np.asarray(self.sample(params, jnp.asarray(labels, jnp.int32), key,
                                          jnp.asarray(indices, jnp.int32), jnp.asarray(grains, jnp.int32)))

    def decode(self, latents: np.ndarray, grains: np.ndarray) -> np.ndarray:
        """uint8 images ``[B, H, W, 3]`` of scaled latents."""
        return np.asarray(self.dvae.decode(latents / self.latent_scale, np.asarray(grains, np.int32)))


def random_grain_maps(key: jax.Array, count: int, grain_shape: Sequence[int], ratio: float) -> np.ndarray:
    """int32 ``[count, gh, gw]``: every region fine with probability ``ratio``, independently (the
    paper's "random" grain-map row; ``ratio`` the data's fine fraction)."""
    return np.asarray(grain_router.random_grain_map(key, (count, *grain_shape), float(ratio)))
