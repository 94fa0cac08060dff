"""The sharded train step: one ``jax.jit`` with explicit state and batch shardings, donated state.

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
from nativetok_jax.training.losses import loss_terms
from nativetok_jax.training.optimizer import ema_update
from nativetok_jax.training.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


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
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    train = config.train
    freeze = {"frozen_encoder": frozen_encoder, "frozen_experts": frozen_experts}

    def loss_fn(params: Any, images: jax.Array, num_visible: jax.Array, quantize: jax.Array):
        model: Autoencoder = nnx.merge(graphdef, params)
        reconstruction, quantized = model(images, num_visible, quantize=quantize, **freeze)
        terms = loss_terms(train.losses, images, reconstruction, quantized)
        metrics = dict(terms, perplexity=quantized.perplexity, codebook_usage=quantized.usage,
                       codebook_loss=quantized.codebook_loss, commitment_loss=quantized.commitment_loss)
        return sum(terms.values()), metrics

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        images = images_to_model(batch["image"])
        key = jax.random.fold_in(jax.random.key(train.seed), state["step"])
        num_visible = prefix_lengths(key, images.shape[0], num_tokens, train.prefix_probability)
        quantize = state["step"] >= quantizer_warmup_steps
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], images, num_visible, quantize
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {
            "step": state["step"] + 1,
            "params": params,
            "ema": ema_update(state["ema"], params, train.ema_decay) if state["ema"] else {},
            "opt_state": opt_state,
        }
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
        metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), update_norm=optax.tree.norm(updates),
                       params_finite=finite.astype(jnp.float32))
        return new_state, metrics

    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(state_shardings, {"image": batch_sharding, "label": label_sharding(batch_sharding)}),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )


def label_sharding(image_sharding: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(image_sharding.mesh, jax.sharding.PartitionSpec(image_sharding.spec[0]))
