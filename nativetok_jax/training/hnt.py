"""Hierarchical Native Training (NativeTok paper, Sec. 3.3; docs/nativetok.md "Training").

The token count grows in stages (for example 32 -> 64 -> 128). A stage starts from the previous
stage's final parameters: arrays that grow with the token count (the stacked experts, the
decoder's token positions, TiTok's latent tokens) keep their old rows and get freshly
initialised new ones; every other array must match exactly, and a restore that does not fit
names every parameter that differs. What a stage freezes is a list of names in its config:

- ``mit``, ``token_head``, ``quantizer``, ``decoder``, ``encoder`` (TiTok): the whole part;
- ``old_experts``: the experts of the previous stage's positions (rows of the stacked arrays);
- ``experts``: every expert.

Frozen parameters are masked out of the optimiser (``optimizer.make_optimizer``: no moments, no
update, not clipped) and put under ``stop_gradient`` (their own gradients only: the MIT still
learns through frozen experts). Their EMA stays as it was.

A stage grows from the previous stage's final state: the raw parameters from its raw parameters
and, when both stages keep an EMA, the EMA from its EMA. So the weights users load by default
(the EMA, ``Tokenizer.from_checkpoint``) keep the first L ids of every image across stages, as
the raw weights do.

Each stage draws its own data stream and per-step randomness (:func:`stage_seed`): stages count
their steps from 0, and with one seed every later stage replayed the first stage's batches.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx, traverse_util

from nativetok_jax.errors import UserError
from nativetok_jax import checkpoints, sharding
from nativetok_jax.config import HNT_PARTS as PARTS  # noqa: F401 - the parts a stage may freeze
from nativetok_jax.config import ConfigError
from nativetok_jax.config import stage_config, stage_directory, stage_list  # noqa: F401 - the stage schedule

# Parameters whose leading axis is the token count.
GROWING = (("experts", "stack"), ("decoder", "token_position"), ("encoder", "latent_tokens"))


class RestoreError(UserError, ValueError):
    """Parameters from a checkpoint do not fit the model; the message lists what differs."""


def _is_growing(path: tuple[str, ...]) -> bool:
    return any(path[: len(prefix)] == prefix for prefix in GROWING)


def grow_params(previous: Any, fresh: Any) -> Any:
    """``fresh`` (the new stage's initialisation) with every array of ``previous`` copied in.

    Growing arrays keep ``previous`` in their first rows; all others must have equal shapes.
    Raises ``RestoreError`` listing every missing, unexpected or misshapen parameter.
    """
    old = traverse_util.flatten_dict(previous)
    new = traverse_util.flatten_dict(fresh)
    problems = growth_problems(old, new)
    if problems:
        raise RestoreError(f"checkpoint parameters do not fit the model: {sharding.summarize(problems)}")
    merged = {}
    for path, value in new.items():
        before = old[path]
        if before.shape == value.shape:
            merged[path] = jnp.asarray(before, value.dtype)
        else:  # a growing array: the old rows, then the fresh ones
            merged[path] = jnp.concatenate([jnp.asarray(before, value.dtype), value[before.shape[0]:]], axis=0)
    return traverse_util.unflatten_dict(merged)


def growth_problems(old: dict[tuple[str, ...], Any], new: dict[tuple[str, ...], Any]) -> list[str]:
    """Why parameters of shapes ``old`` cannot grow into ``new`` (flat ``{path: array-like}``, only
    ``.shape`` is read): missing, unexpected, or misshapen (growing arrays may add leading rows)."""
    problems = [f"missing {'/'.join(p)}" for p in new if p not in old]
    problems += [f"unexpected {'/'.join(p)}" for p in old if p not in new]
    for path, value in new.items():
        if path not in old:
            continue
        before, after = tuple(old[path].shape), tuple(value.shape)
        if before != after and not (_is_growing(path) and before[1:] == after[1:] and before[0] <= after[0]):
            problems.append(f"{'/'.join(path)} has shape {before}, the model needs {after}")
    return problems


def check_growth(configs: list[Any], build: Any) -> None:
    """Raises ``ConfigError`` (one line) when a stage's model cannot grow from the previous
    stage's (a stage ``overrides`` entry that changes a shape), before the first stage trains;
    ``configs``: every stage's config in order, ``build(model_config, rngs)`` the model builder.
    Only shapes are computed (``nnx.eval_shape``): nothing is allocated."""
    shapes = [traverse_util.flatten_dict(sharding.params_of(nnx.eval_shape(lambda c=c: build(c.model, nnx.Rngs(0)))))
              for c in configs]
    for index in range(1, len(configs)):
        problems = growth_problems(shapes[index - 1], shapes[index])
        if problems:
            raise ConfigError(f"config.hnt.stages[{index}]: its model cannot grow from stage {index - 1}'s: "
                              f"{sharding.summarize(problems)}")


def trainable_mask(params: Any, frozen: tuple[str, ...], num_old_experts: int) -> Any:
    """Per parameter: ``True`` (trained), ``False`` (frozen) or a boolean row mask ``[E, 1, ...]``
    (the stacked experts with the previous stage's frozen): ``optimizer.Trainable``."""

    def mask(path: tuple, value: Any):
        keys = tuple(getattr(k, "key", k) for k in path)
        if keys[0] in frozen or (keys[0] == "experts" and "experts" in frozen):
            return False
        if keys[0] == "experts" and "old_experts" in frozen and num_old_experts:
            rows = np.arange(value.shape[0]) >= num_old_experts
            return rows.reshape((-1,) + (1,) * (len(value.shape) - 1))
        return True

    return jax.tree_util.tree_map_with_path(mask, params)


def grow_state(state: dict[str, Any], built: Any, previous_dir: Any) -> dict[str, Any]:
    """``state`` (a fresh stage's, of ``built``: a ``BuiltState``) with its parameters grown from the
    previous stage's raw ones and its EMA (when kept) from the previous stage's EMA; new rows keep
    their fresh initialisation. The previous stage's arrays are restored straight into shardings
    by their logical axes (no host copy of the whole model)."""
    shardings = built.shardings
    placement = sharding.restore_placement(built.axes, built.mesh, built.rules)
    old_params, old_step = checkpoints.load_params(previous_dir, use_ema=False, placement=placement)
    logging.info("growing from %s (step %d)", previous_dir, old_step)
    state = dict(state, params=jax.device_put(grow_params(old_params, state["params"]), shardings["params"]))
    if state["ema"]:
        old_ema, _ = checkpoints.load_params(previous_dir, use_ema=True, placement=placement)  # raw if no EMA
        state["ema"] = jax.device_put(grow_params(old_ema, state["ema"]), shardings["ema"])
    return state


def stage_seed(seed: int, index: int) -> int:
    """The seed of stage ``index``'s data stream and per-step randomness: ``seed`` for the first
    stage, a value drawn from ``(seed, index)`` (numpy's ``SeedSequence``) for later ones, so no
    stage replays another's batches."""
    if index == 0:
        return seed
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] >> 1)


def frozen_expert_count(frozen: tuple[str, ...], num_old_experts: int, num_tokens: int) -> int:
    """How many leading experts run forward-only in this stage."""
    if "experts" in frozen:
        return num_tokens
    return num_old_experts if "old_experts" in frozen else 0
