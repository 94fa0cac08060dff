"""The diffusion pipelines: a DiT's (or D²iT content transformer's) sampler and a latent space's
image decoder, as ``sample``, the trainers' previews and the benchmarks use them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from nativetok_jax.config import dit_latent_shape
from nativetok_jax.diffusion.gaussian import build_diffusion
from nativetok_jax.diffusion.samplers import make_sampler
from nativetok_jax.models.dit.kl_autoencoder import KLAutoencoder, PixelSpace

Autoencoder = KLAutoencoder | PixelSpace


def diffusion_sampler(graphdef: nnx.GraphDef, model: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                      method: str, respacing: str, eta: float = 0.0, guidance_scale: float = 1.0,
                      apply_fn: Any = None, shape: Sequence[int] | None = None):
    """``sample(params, labels [B], key, sample_indices=None[, grains]) -> float32 latents [B, h, w, c]``,
    replicated (every process may read them): ``make_sampler`` on the network of ``model`` with the
    respaced process, guidance on every channel unless ``model.sample.guided_channels`` says
    otherwise, and clipping as ``model.sample.clip_denoised``.

    The network is the DiT of ``graphdef`` on ``dit_latent_shape(model)`` unless ``apply_fn``
    (``(params, x, t, labels[, grains]) -> output``) and ``shape`` say otherwise (D²iT's content
    transformer, sampled multi-grained when ``grains`` is given)."""
    diffusion = build_diffusion(model.diffusion.schedule, model.diffusion.num_steps, respacing,
                                learn_sigma=model.learn_sigma)
    if apply_fn is None:
        apply_fn = lambda params, x, t, y: nnx.merge(graphdef, params)(x, t, y)  # noqa: E731
    sampler = make_sampler(apply_fn, diffusion, dit_latent_shape(model) if shape is None else shape, method=method,
                           eta=eta, guidance_scale=guidance_scale, null_label=model.num_classes,
                           guided_channels=model.sample.guided_channels or None,
                           clip_denoised=model.sample.clip_denoised)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(sampler, out_shardings=replicated)


def image_decoder(autoencoder: Autoencoder):
    """``decode(latents [B, h, w, c]) -> uint8 [B, H, W, 3]`` (one jitted program)."""
    graphdef, state = nnx.split(autoencoder)

    @jax.jit
    def decode(state, latents):
        images = nnx.merge(graphdef, state).decode(latents)
        return jnp.round(images * 255.0).astype(jnp.uint8)

    return lambda latents: np.asarray(decode(state, latents))
