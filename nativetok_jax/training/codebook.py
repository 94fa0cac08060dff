"""The codebook's care: fitted to the encoder after a continuous warm-up, dead codes restarted.

With a quantiser warm-up (``train.quantizer_warmup_steps``, or ``train.quantizer_warmup_fraction``
of the steps) the decoder first reads the continuous tokens, so the encoder learns what to say
before it must say it in codes; then the codebook is fitted to encoder outputs. Random codes would
otherwise sit far from everything the encoder produces, and only a handful would ever be used
(tokens collapse to one code per position).

The fit (``train.codebook``):

- ``kmeans_iterations`` 0: the codebook becomes randomly chosen encoder outputs (slightly
  jittered); on the demo a training batch's 1,024 tokens then use about 720 distinct codes.
- ``kmeans_iterations`` > 0: that start is refined by spherical k-means (Lloyd's iterations with
  cosine similarity, the quantiser's own distance) over ``samples_per_code`` encoder outputs per
  code, so the codes are spread where the encoder's outputs are dense.
- ``restart_dead_every`` > 0: every so many quantised steps, codes that none of a fresh sample of
  encoder outputs chooses are re-seeded to encoder outputs drawn with probability proportional to
  their squared distance from their nearest code (k-means++'s rule: the worst-served outputs get
  the new codes). Jukebox (Dhariwal et al., 2020, "random restarts") does the same for the same
  reason: a code that is never chosen gets no gradient and would stay dead.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.models.nativetok import Autoencoder
from nativetok_jax.models.nativetok.quantizer import l2_normalize
from nativetok_jax.models.pixels import images_to_model

# Points per chunk of the nearest-code search: bounds its similarity matrix (chunk x codebook).
_CHUNK = 4096


def encoder_outputs(graphdef: nnx.GraphDef, params: Any, images: jax.Array) -> jax.Array:
    """The l2-normalised continuous tokens of ``images`` ``[B, H, W, 3]`` uint8, as ``[B * L, D]`` float32."""
    model: Autoencoder = nnx.merge(graphdef, params)
    tokens = model.encode(images_to_model(images)).continuous
    return tokens.reshape(-1, tokens.shape[-1]).astype(jnp.float32)


def nearest_codes(points: jax.Array, codebook: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(indices ``[N]`` int32, cosine similarity ``[N]``) of the nearest code of each of ``points``
    ``[N, D]`` (unit vectors) in ``codebook`` ``[K, D]`` (any norm), searched in chunks."""
    codes = l2_normalize(codebook)
    n = points.shape[0]
    chunk = min(_CHUNK, n)
    padded = jnp.pad(points, ((0, -n % chunk), (0, 0)))

    def search(block):
        similarity = block @ codes.T
        return jnp.argmax(similarity, axis=-1).astype(jnp.int32), jnp.max(similarity, axis=-1)

    ids, best = jax.lax.map(search, padded.reshape(-1, chunk, points.shape[-1]))
    return ids.reshape(-1)[:n], best.reshape(-1)[:n]


def spherical_kmeans(points: jax.Array, codebook: jax.Array, iterations: int) -> jax.Array:
    """``codebook`` ``[K, D]`` after ``iterations`` Lloyd iterations on ``points`` ``[N, D]`` (unit
    vectors): each code becomes the normalised mean of the points nearest to it; a code nearest to
    none keeps its place."""

    def lloyd(codes, _):
        ids, _ = nearest_codes(points, codes)
        sums = jax.ops.segment_sum(points, ids, num_segments=codes.shape[0])
        counts = jax.ops.segment_sum(jnp.ones_like(ids), ids, num_segments=codes.shape[0])
        return jnp.where(counts[:, None] > 0, l2_normalize(sums), codes), None

    codebook, _ = jax.lax.scan(lloyd, l2_normalize(codebook), None, length=iterations)
    return codebook


def fit_codebook(points: jax.Array, codebook_size: int, key: jax.Array, kmeans_iterations: int = 0) -> jax.Array:
    """A ``[codebook_size, D]`` float32 codebook fitted to encoder outputs ``points`` ``[N, D]``:
    randomly chosen outputs (with a 0.01 jitter, so repeated choices differ), then
    ``kmeans_iterations`` of spherical k-means."""
    choose, jitter = jax.random.split(key)
    rows = jax.random.choice(choose, points.shape[0], (codebook_size,), replace=points.shape[0] < codebook_size)
    codebook = points[rows] + 0.01 * jax.random.normal(jitter, (codebook_size, points.shape[-1]))
    if kmeans_iterations:
        codebook = spherical_kmeans(points, codebook, kmeans_iterations)
    return codebook.astype(jnp.float32)


def restart_dead_codes(points: jax.Array, codebook: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(new codebook ``[K, D]`` float32, dead ``[K]`` bool): the codes that none of ``points``
    ``[N, D]`` chooses, re-seeded to points drawn with probability proportional to their squared
    distance from their nearest code (uniformly if every point sits on a code)."""
    ids, similarity = nearest_codes(points, codebook)
    used = jax.ops.segment_sum(jnp.ones_like(ids), ids, num_segments=codebook.shape[0]) > 0
    distance = jnp.maximum(2.0 - 2.0 * similarity, 0.0)  # |a - b|^2 of unit vectors
    total = distance.sum()
    weights = jnp.where(total > 0, distance / jnp.where(total > 0, total, 1.0), 1.0 / points.shape[0])
    choose, jitter = jax.random.split(key)
    rows = jax.random.choice(choose, points.shape[0], (codebook.shape[0],), p=weights)
    fresh = points[rows] + 0.01 * jax.random.normal(jitter, codebook.shape)
    return jnp.where(used[:, None], codebook, fresh).astype(jnp.float32), ~used


def care_at(step: int, warmup: int, restart_every: int) -> str | None:
    """What the codebook gets before ``step``: ``"fit"`` at the end of a warm-up, ``"restart"`` every
    ``restart_every`` steps after it (0: never), else None."""
    if warmup and step == warmup:
        return "fit"
    if restart_every and step > warmup and (step - warmup) % restart_every == 0:
        return "restart"
    return None


def batches_needed(codebook_size: int, batch_size: int, num_tokens: int, per_code: int = 1, limit: int = 64) -> int:
    """Batches that give ``per_code`` encoder outputs per code (at least 1, at most ``limit``)."""
    return max(1, min(limit, -(-codebook_size * per_code // (batch_size * num_tokens))))
