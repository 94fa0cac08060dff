"""One entry to both samplers, configured by ``config.generator.sample``."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from flax import nnx

from nativetok_jax.generation import autoregressive, masked


def generate_ids(
    kind: str, model: tuple[nnx.GraphDef, Any], labels: jax.Array, key: jax.Array, num_tokens: int,
    settings: ml_collections.ConfigDict,
) -> jax.Array:
    """Token ids ``[B, num_tokens]`` for class ``labels [B]`` from an ``"ar"`` or ``"maskgit"`` generator."""
    if kind == "ar":
        return autoregressive.sample(model, labels, key=key, num_tokens=num_tokens, temperature=settings.temperature,
                                     top_k=settings.top_k, top_p=settings.top_p, guidance_scale=settings.guidance_scale)
    return masked.sample(model, labels, key=key, num_tokens=num_tokens, num_steps=settings.num_steps,
                         temperature=settings.temperature, choice_temperature=settings.choice_temperature,
                         guidance_scale=settings.guidance_scale, top_k=settings.top_k, top_p=settings.top_p)
