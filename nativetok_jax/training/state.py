"""The train state: one pytree of plain dicts, placed on the mesh with explicit shardings.

``{"step": int32, "params": ..., "ema": ... or {}, "opt_state": ...}``. Its shardings follow
the parameters' (optimiser moments and EMA are sharded like the parameters they track).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

TrainState = dict[str, Any]


def init_state(params: Any, optimizer: optax.GradientTransformation, keep_ema: bool) -> TrainState:
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "ema": jax.tree.map(jnp.copy, params) if keep_ema else {},
        "opt_state": optimizer.init(params),
    }


def state_shardings(
    param_shardings: Any, optimizer: optax.GradientTransformation, params: Any, mesh: jax.sharding.Mesh, keep_ema: bool
) -> TrainState:
    """Shardings of every leaf of the train state; non-parameter leaves are replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract_opt_state = jax.eval_shape(optimizer.init, params)
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )
    return {
        "step": replicated,
        "params": param_shardings,
        "ema": param_shardings if keep_ema else {},
        "opt_state": opt_shardings,
    }
