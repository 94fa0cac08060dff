"""The sharded train step of every trainer: one ``jax.jit`` with explicit state and batch
shardings, donated state, run under the mesh *and* the logical-axis rules.

A trainer supplies an :class:`Objective`: its loss ``(params, batch, context) -> (loss,
(metrics, aux))`` and, when its state has extra parts (the tokenizer's discriminator), how they
are updated from ``aux``. The step does the rest, the same for every model: gradients of the
trainable parameters only (frozen ones are under ``stop_gradient``), the masked optimiser, the
EMA, and the metrics every run logs (``loss``, ``grad_norm`` over the trainable parameters,
``update_norm``, ``params_finite``). Randomness comes from ``fold_in(key(seed), step)``, so a
resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nativetok_jax import sharding
from nativetok_jax.layers.partitioning import axis_rules
from nativetok_jax.training.optimizer import ema_update, stop_frozen_gradients, trainable_norm
from nativetok_jax.training.state import CORE_PARTS, BuiltState, TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class StepContext(NamedTuple):
    """What a loss may read besides the parameters and the batch."""

    step: jax.Array  # int32 []: updates done before this one
    key: jax.Array  # fold_in(key(seed), step)
    extra: dict[str, Any]  # the state's extra parts as they were before this step
    constants: Any  # Objective.constants, as traced (replicated) arguments


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a trainer adds to the shared step.

    Attributes:
      loss: ``(params, batch, context) -> (loss, (metrics, aux))``; ``aux`` is anything the
        extra update needs (the tokenizer passes its reconstructions to the discriminator).
      update_extra: ``(context, batch, aux) -> (extra parts, metrics)``, or None when the state
        has no extra parts.
      constants: arrays every step reads but never updates (frozen pretrained networks): a jit
        argument, replicated, not constants baked into the program.
    """

    loss: Callable[[Any, Batch, StepContext], tuple[jax.Array, tuple[Metrics, Any]]]
    update_extra: Callable[[StepContext, Batch, Any], tuple[dict[str, Any], Metrics]] | None = None
    constants: Any = None


def make_train_step(
    objective: Objective,
    built: BuiltState,
    batch_shardings: dict[str, jax.sharding.NamedSharding],
    *,
    seed: int,
    ema_decay: float,
) -> TrainStep:
    """``step(state, batch) -> (state, metrics)`` for ``built``'s state; ``state`` is donated."""
    optimizer, trainable = built.optimizer, built.trainable

    def step(state: TrainState, batch: Batch, constants: Any) -> tuple[TrainState, Metrics]:
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        context = StepContext(state["step"], key, {k: v for k, v in state.items() if k not in CORE_PARTS}, constants)

        def loss_fn(params):
            return objective.loss(stop_frozen_gradients(params, trainable), batch, context)

        (loss, (metrics, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {
            "step": state["step"] + 1,
            "params": params,
            "ema": ema_update(state["ema"], params, ema_decay, trainable) if state["ema"] else {},
            "opt_state": opt_state,
        }
        metrics = dict(metrics)
        if objective.update_extra is not None:
            extra, extra_metrics = objective.update_extra(context, batch, aux)
            new_state.update(extra)
            metrics.update(extra_metrics)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
        metrics.update(loss=loss, grad_norm=trainable_norm(grads, trainable), update_norm=optax.tree.norm(updates),
                       params_finite=finite.astype(jnp.float32))
        return new_state, metrics

    mesh = built.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # Abstract constants (ShapeDtypeStructs: an ahead-of-time compile for other devices) get the
    # sharding; arrays are placed.
    constants = jax.tree.map(
        lambda c: jax.ShapeDtypeStruct(c.shape, c.dtype, sharding=replicated) if isinstance(c, jax.ShapeDtypeStruct)
        else jax.device_put(c, replicated), objective.constants)
    jitted = jax.jit(
        step,
        in_shardings=(built.shardings, batch_shardings, jax.tree.map(lambda _: replicated, constants)),
        out_shardings=(built.shardings, replicated),
        donate_argnums=0,
    )
    return TrainStep(jitted, constants, mesh, built.rules)


class TrainStep:
    """``step(state, batch)``: the jitted step with its constants bound, run under the mesh and
    the logical-axis rules (so every activation constraint of the model is in force)."""

    def __init__(self, jitted: Callable[..., Any], constants: Any, mesh: jax.sharding.Mesh, rules: Any):
        self._jitted, self._constants, self.mesh, self.rules = jitted, constants, mesh, rules

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        with jax.set_mesh(self.mesh), axis_rules(self.rules):
            return self._jitted(state, batch, self._constants)

    def lower(self, state: TrainState, batch: Batch) -> Any:
        with jax.set_mesh(self.mesh), axis_rules(self.rules):
            return self._jitted.lower(state, batch, self._constants)

    def trace(self, state: TrainState, batch: Batch) -> Any:
        """``jax.jit(...).trace``: the step's jaxpr (``.jaxpr``) without lowering or compiling."""
        with jax.set_mesh(self.mesh), axis_rules(self.rules):
            return self._jitted.trace(state, batch, self._constants)

    def compile(self, state: TrainState, batch: Batch) -> TrainStep:
        """Compiled ahead of time (benchmarks read ``executable``'s memory and cost analyses)."""
        compiled = TrainStep(self.lower(state, batch).compile(), self._constants, self.mesh, self.rules)
        compiled.executable = compiled._jitted
        return compiled


def batch_shardings(mesh: jax.sharding.Mesh, shapes: dict[str, tuple[int, ...]]) -> dict[str, jax.sharding.NamedSharding]:
    """Each global batch array split along its leading (batch) axis over ``data`` and ``fsdp``."""
    return {name: sharding.batch_sharding(mesh, shape) for name, shape in shapes.items()}
