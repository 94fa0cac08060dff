"""The discriminator's side of training: its model, optimiser and state, and its update.

The discriminator lives in the same train state as the tokenizer (``state["discriminator"]``:
parameters, optimiser state and the LeCam running means), so it is sharded, donated and
checkpointed with everything else. It starts learning at ``train.losses.adversarial_start_step``;
before that its update is not run at all (``lax.cond``) and its state stays bit-identical.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from nativetok_jax import sharding
from nativetok_jax.config import adversarial_start_step
from nativetok_jax.models.discriminator import PatchDiscriminator
from nativetok_jax.training.losses import hinge_discriminator_loss, lecam_regularizer
from nativetok_jax.training.optimizer import make_optimizer
from nativetok_jax.training.state import optimizer_state_shardings

DiscriminatorState = dict[str, Any]


def uses_discriminator(config: ml_collections.ConfigDict) -> bool:
    return config.train.losses.adversarial_weight > 0


@dataclasses.dataclass(frozen=True)
class Discriminator:
    """The discriminator's graph and optimiser (static), and how to build and update its state."""

    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    lecam_weight: float
    lecam_decay: float

    def update(
        self, state: DiscriminatorState, real: jax.Array, fake: jax.Array, active: jax.Array
    ) -> tuple[DiscriminatorState, dict[str, jax.Array]]:
        """One hinge-loss step on real images and (gradient-stopped) reconstructions when
        ``active``; otherwise nothing runs and the state and zero metrics come back."""
        fake = jax.lax.stop_gradient(fake)

        def inactive(state, real, fake):
            metrics = jax.eval_shape(self._step, state, real, fake)[1]
            return state, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics)

        return jax.lax.cond(active, self._step, inactive, state, real, fake)

    def _step(
        self, state: DiscriminatorState, real: jax.Array, fake: jax.Array
    ) -> tuple[DiscriminatorState, dict[str, jax.Array]]:
        def loss_fn(params):
            discriminator = nnx.merge(self.graphdef, params)
            real_logits, fake_logits = discriminator(real), discriminator(fake)
            loss = hinge_discriminator_loss(real_logits, fake_logits)
            if self.lecam_weight:
                lecam = state["lecam"]
                loss += self.lecam_weight * lecam_regularizer(real_logits, fake_logits, lecam["real"], lecam["fake"])
            return loss, (real_logits.mean(), fake_logits.mean())

        (loss, (real_mean, fake_mean)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        decay = self.lecam_decay
        new_state = {
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "lecam": {"real": decay * state["lecam"]["real"] + (1 - decay) * real_mean,
                      "fake": decay * state["lecam"]["fake"] + (1 - decay) * fake_mean},
        }
        metrics = {"discriminator_loss": loss, "logits_real": real_mean, "logits_fake": fake_mean,
                   "discriminator_grad_norm": optax.tree.norm(grads)}
        return new_state, metrics


def build_discriminator(
    config: ml_collections.ConfigDict, num_steps: int, mesh: jax.sharding.Mesh, rules: sharding.Rules
) -> tuple[Discriminator, DiscriminatorState, DiscriminatorState]:
    """The discriminator of a run (or stage) of ``num_steps`` updates, its initial state (placed on
    the mesh) and that state's shardings.

    Its optimiser counts only the updates it makes (none before
    ``config.adversarial_start_step``), so its warm-up and decay span ``num_steps`` minus that start:
    over ``num_steps`` a ``discriminator.final_learning_rate_ratio`` below 1 would never be reached.
    """
    d = config.discriminator
    graphdef, params, param_shardings = sharding.init_sharded(
        lambda rngs: PatchDiscriminator(rngs=rngs, width=d.width, depth=d.depth, norm=d.norm,
                                        dtype=jnp.dtype(config.model.dtype)),
        config.train.seed + 1, mesh, rules,
    )
    optimizer = make_optimizer(d, max(num_steps - adversarial_start_step(config.train), 1), params)
    losses = config.train.losses
    discriminator = Discriminator(graphdef, optimizer, float(losses.lecam_weight), float(losses.lecam_decay))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = {
        "params": param_shardings,
        "opt_state": optimizer_state_shardings(optimizer, params, param_shardings, mesh),
        "lecam": {"real": replicated, "fake": replicated},
    }
    state = sharding.initialize(
        lambda p: {"params": p, "opt_state": optimizer.init(p),
                   "lecam": {"real": jnp.zeros((), jnp.float32), "fake": jnp.zeros((), jnp.float32)}},
        shardings, mesh, params,
    )
    return discriminator, state, shardings
