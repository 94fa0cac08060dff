"""The train state and its one builder, :func:`build_state`, used by every trainer, the training
benchmark and the tests.

The state is one pytree of plain dicts, placed on the mesh with explicit shardings::

    {"step": int32 [], "params": ..., "ema": ... or {}, "opt_state": ..., <extra parts>}

Extra parts (the tokenizer's discriminator: ``state["discriminator"]``) are added with
:meth:`BuiltState.add_part`; they are sharded, donated and checkpointed with the rest. Optimiser
moments and the EMA are sharded like the parameters they track; other leaves are replicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from nativetok_jax import sharding
from nativetok_jax.layers.partitioning import Rules
from nativetok_jax.training.optimizer import Trainable, make_optimizer

TrainState = dict[str, Any]
CORE_PARTS = ("step", "params", "ema", "opt_state")


@dataclasses.dataclass
class BuiltState:
    """A freshly initialised, sharded train state and what was built with it.

    Attributes:
      graphdef: the model's graph (``nnx.merge(graphdef, params)`` rebuilds it).
      state, shardings: the train state and a ``NamedSharding`` per leaf.
      optimizer: the masked optimiser of ``optimizer.make_optimizer``.
      trainable: ``None`` (everything trains) or the freezing tree the optimiser masks.
      axes: the logical axis names of every parameter.
      mesh, rules: where it lives, and the logical-axis rules every step runs under.
    """

    graphdef: nnx.GraphDef
    state: TrainState
    shardings: TrainState
    optimizer: optax.GradientTransformation
    trainable: Trainable | None
    axes: Any
    mesh: jax.sharding.Mesh
    rules: Rules

    def add_part(self, name: str, state: Any, shardings: Any) -> None:
        """Adds an extra part (e.g. ``"discriminator"``) to the state, with its shardings."""
        if name in CORE_PARTS or name in self.state:
            raise ValueError(f"the train state already has a part named {name!r}")
        self.state[name], self.shardings[name] = state, shardings

    def abstract(self) -> TrainState:
        """``ShapeDtypeStruct``s with shardings: what a checkpoint restores into."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.state, self.shardings)


def build_state(
    build: Callable[[nnx.Rngs], nnx.Module],
    *,
    train: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    rules: Rules,
    num_steps: int | None = None,
    freeze: Callable[[Any], Trainable] | None = None,
) -> BuiltState:
    """Initialises ``build(rngs)``'s parameters straight into their shardings, with the optimiser
    state and (when ``train.ema_decay > 0``) an EMA copy.

    Args:
      build: the model, from ``nnx.Rngs(train.seed)``.
      train: the optimiser and schedule fields (``optimizer.make_optimizer``), ``seed`` and
        ``ema_decay``.
      num_steps: the schedule's length (default ``train.num_steps``).
      freeze: ``params -> trainable`` (``optimizer.Trainable``): what this run freezes.
    """
    graphdef, params, param_shardings = sharding.init_sharded(build, train.seed, mesh, rules)
    axes = sharding.param_axes(nnx.eval_shape(lambda: build(nnx.Rngs(train.seed))))
    trainable = freeze(params) if freeze is not None else None
    optimizer = make_optimizer(train, train.num_steps if num_steps is None else num_steps, params, trainable, axes)
    keep_ema = train.ema_decay > 0
    shardings = state_shardings(param_shardings, optimizer, params, mesh, keep_ema)
    state = sharding.initialize(lambda p: init_state(p, optimizer, keep_ema), shardings, mesh, params, donate=True)
    return BuiltState(graphdef, state, shardings, optimizer, trainable, axes, mesh, rules)


def init_state(params: Any, optimizer: optax.GradientTransformation, keep_ema: bool) -> TrainState:
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "ema": jax.tree.map(jnp.copy, params) if keep_ema else {},
        "opt_state": optimizer.init(params),
    }


def optimizer_state_shardings(optimizer: optax.GradientTransformation, params: Any, param_shardings: Any,
                              mesh: jax.sharding.Mesh) -> Any:
    """Moments sharded like their parameters; counters and other leaves replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return map_params_state(optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, params), param_shardings,
                            transform_non_params=lambda _: replicated)


def map_params_state(optimizer: optax.GradientTransformation, f: Any, opt_state: Any, *rest: Any,
                     transform_non_params: Any = None) -> Any:
    """``optax.tree_map_params`` that also walks masked states (``multi_transform``'s frozen
    parameters are ``MaskedNode`` there: left as they are)."""
    masked = optax.transforms.MaskedNode

    def apply(value, *others):
        return value if isinstance(value, masked) else f(value, *others)

    return optax.tree_map_params(optimizer, apply, opt_state, *rest, transform_non_params=transform_non_params,
                                 is_leaf=lambda x: isinstance(x, masked))


def state_shardings(
    param_shardings: Any, optimizer: optax.GradientTransformation, params: Any, mesh: jax.sharding.Mesh, keep_ema: bool
) -> TrainState:
    """Shardings of every leaf of the train state; non-parameter leaves are replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return {
        "step": replicated,
        "params": param_shardings,
        "ema": param_shardings if keep_ema else {},
        "opt_state": optimizer_state_shardings(optimizer, params, param_shardings, mesh),
    }
