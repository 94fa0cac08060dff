"""Logit filters shared by the generators: temperature, top-k, top-p and guidance mixing.

Every filter maps float logits ``[..., vocab]`` to logits of the same shape, with the excluded
entries set to ``-inf`` so that ``jax.random.categorical`` never draws them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def guide(conditional: jax.Array, unconditional: jax.Array, scale: jax.Array | float) -> jax.Array:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)`` (scale 1: conditional, 0: unconditional)."""
    return unconditional + scale * (conditional - unconditional)


def apply_temperature(logits: jax.Array, temperature: jax.Array | float) -> jax.Array:
    """Divides by ``temperature``: below 1 sharpens, above 1 flattens; 0 is the limit, greedy
    decoding: only the largest logit (and any tied with it) survives, as ``softmax(logits / t)``
    does as ``t -> 0``. ``temperature`` may be traced; it must be >= 0."""
    temperature = jnp.asarray(temperature, logits.dtype)
    greedy = jnp.where(logits >= logits.max(axis=-1, keepdims=True), jnp.zeros_like(logits), -jnp.inf)
    # The divisor is never 0, so the unused branch holds no inf or nan either.
    scaled = logits / jnp.where(temperature > 0, temperature, jnp.ones_like(temperature))
    return jnp.where(temperature > 0, scaled, greedy)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the ``k`` largest logits (and any tied with the k-th); ``k <= 0`` keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits: jax.Array, p: jax.Array | float) -> jax.Array:
    """Nucleus filtering: keeps the smallest set of most likely tokens whose probability is >= ``p``.

    A token is kept when the mass of the tokens ranked above it is still below ``p``, so the most
    likely token always survives and ``p >= 1`` keeps everything. Ties are ranked by index.
    """
    order = jnp.argsort(-logits, axis=-1, stable=True)
    sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1).astype(jnp.float32), axis=-1)
    cumulative = jnp.cumsum(sorted_probs, axis=-1)
    mass_above = jnp.concatenate([jnp.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], axis=-1)
    keep_sorted = mass_above < p
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits, -jnp.inf)


def filter_logits(
    logits: jax.Array,
    *,
    temperature: jax.Array | float = 1.0,
    top_k: int = 0,
    top_p: jax.Array | float | None = None,
) -> jax.Array:
    """Temperature (0: greedy), then top-k, then top-p (``None`` skips it), in float32."""
    logits = apply_temperature(logits.astype(jnp.float32), temperature)
    logits = top_k_filter(logits, top_k)
    return logits if top_p is None else top_p_filter(logits, top_p)
