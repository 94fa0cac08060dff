"""The terms of the training objective (TiTok/VQGAN practice; docs/nativetok.md "Training").

Reconstruction: a pixel loss (L1/L2), a perceptual loss (LPIPS, from a file the user names),
or, for the proxy-code head, cross-entropy against a VQGAN's codes or an L1 distance between
soft code embeddings and the VQGAN's quantised latents. Adversarial: VQGAN's hinge losses with
the adaptive generator weight, and the LeCam regulariser of the discriminator (Tseng et al.
2021). Every function returns an unweighted scalar; the train step weighs and logs them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax


def pixel_loss(kind: str, reconstruction: jax.Array, images: jax.Array) -> jax.Array:
    """Mean L1 or L2 distance of images in [-1, 1]."""
    difference = reconstruction.astype(jnp.float32) - images
    return jnp.mean(jnp.abs(difference)) if kind == "l1" else jnp.mean(jnp.square(difference))


def proxy_code_loss(logits: jax.Array, codes: jax.Array) -> jax.Array:
    """Cross-entropy of the proxy-code head's logits ``[..., K]`` against VQGAN codes ``[...]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), codes).mean()


def soft_embeddings(logits: jax.Array, codebook: jax.Array, temperature: float = 1.0) -> jax.Array:
    """The codebook's rows weighted by ``softmax(logits / temperature)``: a differentiable code."""
    return jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1) @ codebook.astype(jnp.float32)


def soft_embedding_l1(logits: jax.Array, codebook: jax.Array, target_embeddings: jax.Array) -> jax.Array:
    """The prototype's proxy loss: L1 between soft code embeddings and the VQGAN's quantised latents."""
    return jnp.mean(jnp.abs(soft_embeddings(logits, codebook) - target_embeddings.astype(jnp.float32)))


def hinge_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """VQGAN's discriminator loss: ``(E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]) / 2``."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits)))


def hinge_generator_loss(fake_logits: jax.Array) -> jax.Array:
    """The generator's side of the hinge game: ``-E[D(G(z))]``."""
    return -jnp.mean(fake_logits)


def lecam_regularizer(
    real_logits: jax.Array, fake_logits: jax.Array, real_ema: jax.Array, fake_ema: jax.Array
) -> jax.Array:
    """``E[relu(D(x) - ema_fake)^2] + E[relu(ema_real - D(G(z)))^2]``: keeps the discriminator's
    predictions near their running means, which regularises GANs trained on little data."""
    return (jnp.mean(jnp.square(jax.nn.relu(real_logits - fake_ema)))
            + jnp.mean(jnp.square(jax.nn.relu(real_ema - fake_logits))))


def adaptive_weight(
    reconstruction_loss: Callable[[jax.Array], jax.Array],
    generator_loss: Callable[[jax.Array], jax.Array],
    last_layer: jax.Array,
    max_weight: float = 1e4,
) -> jax.Array:
    """VQGAN's balance of the adversarial term: ``|grad_W rec| / (|grad_W gan| + 1e-4)``.

    ``W`` is the last layer of the pixel decoder; both callables map that weight to their loss
    (with everything before the last layer held fixed). No gradient flows through the result.
    """
    last_layer = jax.lax.stop_gradient(last_layer)
    rec_grad = jax.grad(reconstruction_loss)(last_layer)
    gan_grad = jax.grad(generator_loss)(last_layer)
    weight = jnp.linalg.norm(rec_grad) / (jnp.linalg.norm(gan_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))
