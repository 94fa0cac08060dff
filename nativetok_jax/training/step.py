"""The sharded train step: one ``jax.jit`` with explicit state and batch shardings, donated state.

The objective follows the config (``train.losses``): a pixel loss, or for the proxy-code head
cross-entropy / soft-embedding L1 against a frozen VQGAN's codes, or pixels through that VQGAN's
decoder; then LPIPS, and a hinge GAN whose generator term is balanced by VQGAN's adaptive weight
(gradients at the last pixel-producing layer). The discriminator is updated in the same step.
Randomness (which examples decode from a token prefix only) comes from the seed and the step
number, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from nativetok_jax.models import Autoencoder
from nativetok_jax.models.pixels import images_to_model
from nativetok_jax.training import losses as L
from nativetok_jax.training.adversarial import Discriminator
from nativetok_jax.training.networks import FrozenNetworks
from nativetok_jax.training.optimizer import ema_update
from nativetok_jax.training.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
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


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    *,
    num_tokens: int,
    quantizer_warmup_steps: int = 0,
    frozen_encoder: bool,
    frozen_experts: int,
    state_shardings: TrainState,
    batch_sharding: jax.sharding.NamedSharding,
    networks: FrozenNetworks | None = None,
    discriminator: Discriminator | None = None,
) -> TrainStep:
    """``step(state, batch) -> (state, metrics)``; ``state`` is donated."""
    train, weights = config.train, config.train.losses
    freeze = {"frozen_encoder": frozen_encoder, "frozen_experts": frozen_experts}
    networks = networks or FrozenNetworks({}, {})
    proxy_mode = weights.proxy if config.model.decoder.head == "proxy_codes" else None
    makes_pixels = proxy_mode in (None, "pixels")

    def pixel_readout(model: Autoencoder, nets: dict[str, Any], features: jax.Array) -> tuple[jax.Array, jax.Array, Readout]:
        """The last pixel-producing layer's input and weight, and the readout that applies it."""
        if proxy_mode is None:
            return features, model.decoder.head.kernel[...], model.decoder.readout
        proxy = networks.module(nets, "proxy")
        return proxy.features(model.decoder.readout(features)), proxy.last_kernel, proxy.readout

    def loss_fn(params, images, num_visible, quantize, nets, discriminator_params, adversarial_on):
        model: Autoencoder = nnx.merge(graphdef, params)
        features, quantized = model.features(images, num_visible, quantize=quantize, **freeze)
        terms = {"quantizer_loss": weights.quantizer_weight * quantized.loss}
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

        last_input, last_kernel, readout = pixel_readout(model, nets, features)
        reconstruction = readout(last_input, None)

        def reconstruction_terms(pixels: jax.Array) -> dict[str, jax.Array]:
            out = {f"{weights.pixel}_loss": weights.pixel_weight * L.pixel_loss(weights.pixel, pixels, images)}
            if "lpips" in networks:
                lpips = networks.module(nets, "lpips")
                out["perceptual_loss"] = weights.perceptual_weight * jnp.mean(lpips(pixels, images))
            return out

        terms.update(reconstruction_terms(reconstruction))
        if discriminator is not None:
            critic = nnx.merge(discriminator.graphdef, jax.lax.stop_gradient(discriminator_params))
            weight = jnp.float32(weights.adversarial_weight)
            if weights.adaptive_adversarial_weight:
                fixed_input = jax.lax.stop_gradient(last_input)
                weight = weight * L.adaptive_weight(
                    lambda w: sum(reconstruction_terms(readout(fixed_input, w)).values()),
                    lambda w: L.hinge_generator_loss(critic(readout(fixed_input, w))),
                    last_kernel,
                    weights.max_adaptive_weight,
                )
            weight = jnp.where(adversarial_on, weight, 0.0)
            terms["adversarial_loss"] = weight * L.hinge_generator_loss(critic(reconstruction))
            metrics["adversarial_weight"] = weight
        return sum(terms.values()), (dict(metrics, **terms), reconstruction)

    def step(state: TrainState, batch: Batch, nets: dict[str, Any]) -> tuple[TrainState, Metrics]:
        images = images_to_model(batch["image"])
        key = jax.random.fold_in(jax.random.key(train.seed), state["step"])
        num_visible = prefix_lengths(key, images.shape[0], num_tokens, train.prefix_probability)
        quantize = state["step"] >= quantizer_warmup_steps
        adversarial_on = state["step"] >= weights.adversarial_start_step
        critic_state = state.get("discriminator")
        (loss, (metrics, reconstruction)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], images, num_visible, quantize, nets,
            critic_state["params"] if critic_state else None, adversarial_on,
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {
            "step": state["step"] + 1,
            "params": params,
            "ema": ema_update(state["ema"], params, train.ema_decay) if state["ema"] else {},
            "opt_state": opt_state,
        }
        if discriminator is not None:
            new_state["discriminator"], critic_metrics = discriminator.update(
                critic_state, images, reconstruction, adversarial_on
            )
            metrics.update(critic_metrics)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
        metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), update_norm=optax.tree.norm(updates),
                       params_finite=finite.astype(jnp.float32))
        return new_state, metrics

    mesh = batch_sharding.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    placed = networks.placed(mesh)
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, {"image": batch_sharding, "label": label_sharding(batch_sharding)},
                      placed.shardings(mesh)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )

    return TrainStep(jitted, placed.arrays)


class TrainStep:
    """``step(state, batch)``: the jitted step with the pretrained networks' arrays bound."""

    def __init__(self, jitted: Callable[..., Any], network_arrays: dict[str, Any]):
        self._jitted = jitted
        self._arrays = network_arrays

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        return self._jitted(state, batch, self._arrays)

    def compile(self, state: TrainState, batch: Batch) -> CompiledStep:
        """Compiles ahead of time (benchmarks read the executable's memory and cost analyses)."""
        return CompiledStep(self._jitted.lower(state, batch, self._arrays).compile(), self._arrays)


class CompiledStep:
    def __init__(self, executable: Any, network_arrays: dict[str, Any]):
        self.executable = executable
        self._arrays = network_arrays

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        return self.executable(state, batch, self._arrays)


def label_sharding(image_sharding: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(image_sharding.mesh, jax.sharding.PartitionSpec(image_sharding.spec[0]))
