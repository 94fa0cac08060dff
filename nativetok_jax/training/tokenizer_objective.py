"""The tokenizer's objective for the shared train step (``training/step.py``).

It follows the config (``train.losses``): a pixel loss, or for the proxy-code head cross-entropy
/ soft-embedding L1 against a frozen VQGAN's codes, or pixels through that VQGAN's decoder; then
LPIPS, and a hinge GAN whose generator term is balanced by VQGAN's adaptive weight (gradients at
the last pixel-producing layer). The discriminator is an extra part of the state, updated in the
same step from the step's reconstructions. Before ``train.losses.adversarial_start_step`` neither
the generator's adversarial term nor the discriminator runs (``lax.cond``: one program, the
branch skipped), and during the quantiser warm-up there is no quantiser loss (the codebook is
replaced by encoder outputs when it ends, so pulling the encoder towards it would be wasted).
Randomness (which examples decode from a token prefix only) comes from the step's key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from nativetok_jax.config import adversarial_start_step
from nativetok_jax.models.nativetok import Autoencoder
from nativetok_jax.models.pixels import images_to_model
from nativetok_jax.training import losses as L
from nativetok_jax.training.adversarial import Discriminator
from nativetok_jax.training.networks import FrozenNetworks
from nativetok_jax.training.state import BuiltState
from nativetok_jax.training.step import Objective, StepContext, TrainStep, batch_shardings, make_train_step

# The last pixel-producing layer: (its input, its weight) -> pixels in [-1, 1].
Readout = Callable[[jax.Array, jax.Array | None], jax.Array]


def prefix_lengths(key: jax.Array, batch_size: int, num_tokens: int, probability: float) -> jax.Array:
    """Per example: all ``num_tokens`` or, with ``probability``, a random prefix length in [1, L].

    Training the decoder on prefixes makes decoding from the first k tokens meaningful; the
    lengths are log-uniform so that short, coarse prefixes are seen often.
    """
    use_prefix, length = jax.random.split(key)
    log_length = jax.random.uniform(length, (batch_size,), maxval=jnp.log(num_tokens + 1.0))
    prefix = jnp.clip(jnp.floor(jnp.exp(log_length)).astype(jnp.int32), 1, num_tokens)
    return jnp.where(jax.random.uniform(use_prefix, (batch_size,)) < probability, prefix, num_tokens)


def tokenizer_objective(
    graphdef: nnx.GraphDef,
    config: ml_collections.ConfigDict,
    *,
    num_tokens: int,
    quantizer_warmup_steps: int = 0,
    frozen_experts: int = 0,
    networks: FrozenNetworks | None = None,
    discriminator: Discriminator | None = None,
) -> Objective:
    """The loss of ``config.train.losses`` (and the discriminator's update when there is one)."""
    train, weights = config.train, config.train.losses
    networks = networks or FrozenNetworks({}, {})
    proxy_mode = weights.proxy if config.model.decoder.head == "proxy_codes" else None
    makes_pixels = proxy_mode in (None, "pixels")

    def pixel_readout(model: Autoencoder, nets: dict[str, Any], images: jax.Array,
                      features: jax.Array) -> tuple[jax.Array, jax.Array, Readout]:
        """The last pixel-producing layer's input and weight, and the readout that applies it (and
        adds the mean-colour shortcut's colour, when the model has it)."""
        if proxy_mode is None:
            shortcut = model.shortcut_image(images)  # the mean colour, or 0.0

            def readout(rows: jax.Array, kernel: jax.Array | None) -> jax.Array:
                return model.decoder.readout(rows, kernel) + shortcut

            return features, model.decoder.head.kernel[...], readout
        proxy = networks.module(nets, "proxy")
        return proxy.features(model.decoder.readout(features)), proxy.last_kernel, proxy.readout

    def loss(params: Any, batch: dict[str, jax.Array], context: StepContext):
        nets = context.constants
        images = images_to_model(batch["image"])
        num_visible = prefix_lengths(context.key, images.shape[0], num_tokens, train.prefix_probability)
        quantize = context.step >= quantizer_warmup_steps
        model: Autoencoder = nnx.merge(graphdef, params)
        features, quantized = model.features(images, num_visible, quantize=quantize, frozen_experts=frozen_experts)
        terms = {"quantizer_loss": jnp.where(quantize, weights.quantizer_weight * quantized.loss, 0.0)}
        metrics = dict(perplexity=quantized.perplexity, codebook_usage=quantized.usage,
                       codebook_loss=quantized.codebook_loss, commitment_loss=quantized.commitment_loss)
        if not makes_pixels:
            proxy = networks.module(nets, "proxy")
            logits = model.decoder.readout(features)
            codes = proxy.target_codes(images)
            if proxy_mode == "codes":
                terms["proxy_code_loss"] = weights.proxy_weight * L.proxy_code_loss(logits, codes)
            else:
                target = proxy.target_embeddings(codes)
                terms["proxy_l1_loss"] = weights.proxy_weight * L.soft_embedding_l1(logits, proxy.codebook, target)
            metrics["proxy_code_accuracy"] = jnp.mean(jnp.argmax(logits, -1) == codes)
            return sum(terms.values()), (dict(metrics, **terms), None)

        last_input, last_kernel, readout = pixel_readout(model, nets, images, features)
        pixel_terms, pixel_metrics, reconstruction = reconstruction_terms(
            weights, images, last_input, last_kernel, readout, context, networks, discriminator,
            adversarial_start_step(train))
        terms.update(pixel_terms)
        metrics.update(pixel_metrics)
        return sum(terms.values()), (dict(metrics, **terms), reconstruction)

    return Objective(loss, discriminator_update(discriminator, adversarial_start_step(train)),
                     networks.arrays if networks.arrays else None)


def reconstruction_terms(
    weights: ml_collections.ConfigDict,
    images: jax.Array,
    last_input: jax.Array,
    last_kernel: jax.Array,
    readout: Readout,
    context: StepContext,
    networks: FrozenNetworks,
    discriminator: Discriminator | None,
    adversarial_start: int,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array], jax.Array]:
    """The loss terms of any model that makes pixels (the tokenizer, the Dynamic VAE): the pixel
    loss, LPIPS (with an ``"lpips"`` network), and the hinge generator term (with a discriminator,
    from update ``adversarial_start`` (``config.adversarial_start_step``), scaled by VQGAN's adaptive
    weight at ``last_kernel``).

    ``images``: the targets in [-1, 1]; ``readout(last_input, kernel)`` makes the reconstruction.
    Returns ``(terms, metrics, reconstruction)``.
    """
    nets = context.constants
    reconstruction = readout(last_input, None)

    def pixel_terms(pixels: jax.Array) -> dict[str, jax.Array]:
        out = {f"{weights.pixel}_loss": weights.pixel_weight * L.pixel_loss(weights.pixel, pixels, images)}
        if "lpips" in networks:
            lpips = networks.module(nets, "lpips")
            out["perceptual_loss"] = weights.perceptual_weight * jnp.mean(lpips(pixels, images))
        return out

    terms, metrics = pixel_terms(reconstruction), {}
    if discriminator is not None:
        critic_params = jax.lax.stop_gradient(context.extra["discriminator"]["params"])

        def adversarial_term(reconstruction):
            critic = nnx.merge(discriminator.graphdef, critic_params)
            weight = jnp.float32(weights.adversarial_weight)
            if weights.adaptive_adversarial_weight:
                fixed_input = jax.lax.stop_gradient(last_input)
                weight = weight * L.adaptive_weight(
                    lambda w: sum(pixel_terms(readout(fixed_input, w)).values()),
                    lambda w: L.hinge_generator_loss(critic(readout(fixed_input, w))),
                    last_kernel,
                    weights.max_adaptive_weight,
                )
            return weight * L.hinge_generator_loss(critic(reconstruction)), weight

        def off(reconstruction):
            return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)

        adversarial_on = context.step >= adversarial_start
        terms["adversarial_loss"], metrics["adversarial_weight"] = jax.lax.cond(
            adversarial_on, adversarial_term, off, reconstruction)
    return terms, metrics, reconstruction


def discriminator_update(discriminator: Discriminator | None, start_step: int):
    """``Objective.update_extra`` for a discriminator trained on the step's reconstructions (the
    loss's ``aux``) from ``start_step``; None without one."""
    if discriminator is None:
        return None

    def update_extra(context: StepContext, batch: dict[str, jax.Array], reconstruction: jax.Array):
        active = context.step >= start_step
        state, metrics = discriminator.update(context.extra["discriminator"], images_to_model(batch["image"]),
                                              reconstruction, active)
        return {"discriminator": state}, metrics

    return update_extra


def tokenizer_train_step(
    built: BuiltState,
    config: ml_collections.ConfigDict,
    batch_size: int,
    *,
    num_tokens: int | None = None,
    quantizer_warmup_steps: int = 0,
    frozen_experts: int = 0,
    networks: FrozenNetworks | None = None,
    discriminator: Discriminator | None = None,
) -> TrainStep:
    """The tokenizer's jitted step for ``built`` (batches ``{"image": uint8 [B, H, W, 3],
    "label": int32 [B]}`` of global size ``batch_size``)."""
    num_tokens = config.model.num_tokens if num_tokens is None else num_tokens
    objective = tokenizer_objective(built.graphdef, config, num_tokens=num_tokens,
                                    quantizer_warmup_steps=quantizer_warmup_steps, frozen_experts=frozen_experts,
                                    networks=networks, discriminator=discriminator)
    return make_train_step(objective, built, image_batch_shardings(built.mesh, config, batch_size),
                           seed=config.train.seed, ema_decay=config.train.ema_decay)


def image_batch_shardings(mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict,
                          batch_size: int) -> dict[str, jax.sharding.NamedSharding]:
    size = config.model.image_size
    return batch_shardings(mesh, {"image": (batch_size, size, size, 3), "label": (batch_size,)})
