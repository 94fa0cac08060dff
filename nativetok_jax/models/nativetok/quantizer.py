"""Vector quantiser with an l2-normalised codebook (docs/nativetok.md "The tokenizer" 3; as in TiTok).

Inputs and codes are both projected onto the unit sphere, so the nearest code is the one of
highest cosine similarity. The codebook loss pulls codes towards the (fixed) inputs, the
commitment loss pulls inputs towards the (fixed) codes. How the decoder's gradient reaches the
encoder through the (non-differentiable) choice of code is the ``estimator``:

- ``straight_through`` (VQ-VAE, TiTok): as if quantisation were the identity; every input of one
  code's cell gets the same gradient.
- ``rotation`` (Fifty et al., 2024, "Restructuring Vector Quantization with the Rotation Trick",
  section 4): the code is written as a fixed rotation of the input, ``q = R z`` with ``R`` the
  rotation that takes ``z`` to ``q`` in their common plane, and the gradient is rotated back
  (``R^T g``), so it depends on where the input lies in its cell. Input and code are unit vectors
  here, so no rescaling is needed. The forward value is the code in both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from nativetok_jax.layers.partitioning import param


def l2_normalize(x: jax.Array, axis: int = -1, epsilon: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + epsilon)


@struct.dataclass
class Quantized:
    """What the quantiser returns; every field is an array, so this crosses ``jit`` boundaries."""

    tokens: jax.Array  # [..., D] straight-through codes: values of the codes, gradients to the input.
    continuous: jax.Array  # [..., D] the l2-normalised input, before quantisation.
    ids: jax.Array  # [...] int32 code indices.
    codebook_loss: jax.Array  # scalar: mean ||sg(z) - e||^2.
    commitment_loss: jax.Array  # scalar: mean ||z - sg(e)||^2.
    loss: jax.Array  # scalar: codebook_loss + commitment_weight * commitment_loss.
    perplexity: jax.Array  # scalar: exp(entropy of the batch's code histogram).
    usage: jax.Array  # scalar: fraction of the codebook used at least once in the batch.


def code_statistics(ids: jax.Array, codebook_size: int) -> tuple[jax.Array, jax.Array]:
    """(perplexity, fraction of codes used) of a batch of code indices."""
    return histogram_statistics(jnp.bincount(ids.reshape(-1), length=codebook_size))


def histogram_statistics(counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(perplexity, fraction of codes used) of a code histogram (counts accumulated over batches)."""
    probs = counts / jnp.maximum(counts.sum(), 1)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
    return jnp.exp(entropy), jnp.mean(counts > 0)


ESTIMATORS = ("straight_through", "rotation")


def rotation_trick(z: jax.Array, codes: jax.Array, epsilon: float = 1e-6) -> jax.Array:
    """``codes`` in value, ``R^T g`` in gradient: ``R z`` with ``R = I - 2 r r^T + 2 q z^T`` held fixed,
    ``r = (z + q) / |z + q|``, for unit vectors ``z`` (the inputs, ``[..., D]``) and ``q`` (their codes).
    ``R`` is the Householder reflection through ``r`` followed by the one through ``q``, so it is
    orthogonal and takes ``z`` to ``q``. Where ``z = -q`` (no common plane) ``r`` is 0 and the value
    is ``z + 2 q = q`` still."""
    zs, q = jax.lax.stop_gradient(z), jax.lax.stop_gradient(codes)
    r = zs + q
    r = r * jax.lax.rsqrt(jnp.maximum(jnp.sum(r * r, axis=-1, keepdims=True), epsilon))
    along = lambda u, v: jnp.sum(u * v, axis=-1, keepdims=True)
    return z - 2.0 * r * along(r, z) + 2.0 * q * along(zs, z)


class Quantizer(nnx.Module):
    def __init__(
        self, codebook_size: int, token_dim: int, *, commitment_weight: float = 0.25,
        estimator: str = "straight_through", rngs: nnx.Rngs
    ):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.estimator = estimator
        self.codebook = param(rngs, nnx.initializers.normal(stddev=1.0), (codebook_size, token_dim),
                              ("codebook", "token_dim"))
        self.codebook_size = codebook_size
        self.commitment_weight = commitment_weight

    def normalized_codebook(self) -> jax.Array:
        return l2_normalize(self.codebook[...])

    def lookup(self, ids: jax.Array) -> jax.Array:
        """The (normalised) code vectors of ``ids``."""
        return jnp.take(self.normalized_codebook(), ids, axis=0)

    def nearest(self, z: jax.Array) -> jax.Array:
        """Indices of the codes of highest cosine similarity with ``z`` ``[..., D]``."""
        similarity = jnp.einsum("...d,kd->...k", l2_normalize(z), self.normalized_codebook())
        return jnp.argmax(similarity, axis=-1).astype(jnp.int32)

    def __call__(self, z: jax.Array) -> Quantized:
        z = l2_normalize(z)
        ids = self.nearest(z)
        codes = self.lookup(ids)
        codebook_loss = jnp.mean(jnp.square(codes - jax.lax.stop_gradient(z)))
        commitment_loss = jnp.mean(jnp.square(z - jax.lax.stop_gradient(codes)))
        perplexity, usage = code_statistics(ids, self.codebook_size)
        if self.estimator == "rotation":
            tokens = rotation_trick(z, codes)
        else:
            tokens = z + jax.lax.stop_gradient(codes - z)
        return Quantized(
            tokens=tokens,
            continuous=z,
            ids=ids,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            loss=codebook_loss + self.commitment_weight * commitment_loss,
            perplexity=perplexity,
            usage=usage,
        )
