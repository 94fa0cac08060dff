"""Hierarchical Native Training (NativeTok paper, Sec. 3.3; NATIVETOK.md "Training").

The token count grows in stages (for example 32 -> 64 -> 128). A stage starts from the previous
stage's final parameters: arrays that grow with the token count (the stacked experts, the
decoder's token positions, TiTok's latent tokens) keep their old rows and get freshly
initialised new ones; every other array must match exactly, and a restore that does not fit
names every parameter that differs. What a stage freezes is a list of names in its config:

- ``mit``, ``token_head``, ``quantizer``, ``decoder``, ``encoder`` (TiTok): the whole part;
- ``old_experts``: the experts of the previous stage's positions (rows of the stacked arrays);
- ``experts``: every expert.

Frozen parameters get a zero update mask (``optimizer.keep_frozen``), and frozen experts run
forward only: the model computes their tokens under ``stop_gradient`` (``frozen_experts``).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from nativetok_jax import sharding
from nativetok_jax.config import ConfigError

PARTS = ("mit", "experts", "old_experts", "token_head", "quantizer", "decoder", "encoder")
# Parameters whose leading axis is the token count.
GROWING = (("experts", "stack"), ("decoder", "token_position"), ("encoder", "latent_tokens"))


class RestoreError(ValueError):
    """Parameters from a checkpoint do not fit the model; the message lists what differs."""


def stage_list(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """The stages to run: ``config.hnt.stages``, or one stage with the model's own token count."""
    stages = list(config.hnt.stages) if config.hnt.stages else []
    if not stages:
        if config.train.quantizer_warmup_steps >= config.train.num_steps:
            raise ConfigError(f"config.train.quantizer_warmup_steps: {config.train.quantizer_warmup_steps} leaves none "
                             f"of the {config.train.num_steps} steps quantised")
        return [ml_collections.ConfigDict(dict(name="", num_tokens=config.model.num_tokens,
                                               num_steps=config.train.num_steps, frozen=(),
                                               quantizer_warmup_steps=config.train.quantizer_warmup_steps,
                                               overrides=()))]
    out = []
    for i, stage in enumerate(stages):
        stage = ml_collections.ConfigDict(dict(stage))
        for field in ("num_tokens", "num_steps"):
            if not isinstance(stage.get(field), int) or stage.get(field) < 1:
                raise ConfigError(f"config.hnt.stages[{i}].{field}: must be a positive integer, got {stage.get(field)!r}")
        frozen = tuple(stage.get("frozen", ()))
        unknown = [f for f in frozen if f not in PARTS]
        if unknown:
            raise ConfigError(f"config.hnt.stages[{i}].frozen: unknown parts {unknown}; known: {PARTS}")
        if i and stage.num_tokens < out[-1].num_tokens:
            raise ConfigError(f"config.hnt.stages[{i}].num_tokens: {stage.num_tokens} is fewer than the previous stage's")
        # Only the first stage warms up the quantiser by default: later ones inherit a fitted codebook.
        warmup = stage.get("quantizer_warmup_steps", config.train.quantizer_warmup_steps if i == 0 else 0)
        if warmup >= stage.num_steps:
            raise ConfigError(f"config.hnt.stages[{i}].quantizer_warmup_steps: {warmup} leaves none of the stage's "
                             f"{stage.num_steps} steps quantised")
        overrides = tuple((str(key), value) for key, value in (stage.get("overrides") or ()))
        for key, _ in overrides:
            if not _has_field(config, key) or key.split(".")[0] == "hnt":
                raise ConfigError(f"config.hnt.stages[{i}].overrides: {key!r} is not a config field")
        out.append(ml_collections.ConfigDict(dict(
            name=stage.get("name", "") or f"stage{i}_{stage.num_tokens}tokens",
            num_tokens=stage.num_tokens, num_steps=stage.num_steps, frozen=frozen,
            quantizer_warmup_steps=warmup, overrides=overrides)))
    return out


def _has_field(config: ml_collections.ConfigDict, dotted: str) -> bool:
    node = config
    for name in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            return False
        node = node[name]
    return True


def stage_config(config: ml_collections.ConfigDict, stage: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config one stage trains with: the run's, with the stage's token count, step count and
    ``overrides``: ``(dotted field name, value)`` pairs, e.g. ``("train.losses.proxy", "pixels")``
    (the TiTok recipe's decoder fine-tune is a stage that switches the objective)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.num_tokens = stage.num_tokens
    config.train.num_steps = stage.num_steps
    config.hnt.stages = ()
    for dotted, value in stage.get("overrides") or ():
        *parents, name = dotted.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[name] = value
    return config


def _is_growing(path: tuple[str, ...]) -> bool:
    return any(path[: len(prefix)] == prefix for prefix in GROWING)


def grow_params(previous: Any, fresh: Any) -> Any:
    """``fresh`` (the new stage's initialisation) with every array of ``previous`` copied in.

    Growing arrays keep ``previous`` in their first rows; all others must have equal shapes.
    Raises ``RestoreError`` listing every missing, unexpected or misshapen parameter.
    """
    old = traverse_util.flatten_dict(previous)
    new = traverse_util.flatten_dict(fresh)
    problems = [f"missing {'/'.join(p)}" for p in new if p not in old]
    problems += [f"unexpected {'/'.join(p)}" for p in old if p not in new]
    merged = {}
    for path, value in new.items():
        if path not in old:
            continue
        before = old[path]
        if before.shape == value.shape:
            merged[path] = jnp.asarray(before, value.dtype)
        elif _is_growing(path) and before.shape[1:] == value.shape[1:] and before.shape[0] <= value.shape[0]:
            merged[path] = jnp.concatenate([jnp.asarray(before, value.dtype), value[before.shape[0]:]], axis=0)
        else:
            problems.append(f"{'/'.join(path)} has shape {tuple(before.shape)}, the model needs {tuple(value.shape)}")
    if problems:
        raise RestoreError(f"checkpoint parameters do not fit the model: {sharding.summarize(problems)}")
    return traverse_util.unflatten_dict(merged)


def trainable_mask(params: Any, frozen: tuple[str, ...], num_old_experts: int) -> Any:
    """0/1 float arrays broadcastable to each parameter: 0 where the stage freezes it."""

    def mask(path: tuple, value: Any):
        keys = tuple(getattr(k, "key", k) for k in path)
        if keys[0] in frozen or (keys[0] == "experts" and "experts" in frozen):
            return jnp.zeros((), jnp.float32)
        if keys[0] == "experts" and "old_experts" in frozen and num_old_experts:
            rows = (np.arange(value.shape[0]) >= num_old_experts).astype(np.float32)
            return jnp.asarray(rows.reshape((-1,) + (1,) * (value.ndim - 1)))
        return jnp.ones((), jnp.float32)

    return jax.tree_util.tree_map_with_path(mask, params)


def frozen_expert_count(frozen: tuple[str, ...], num_old_experts: int, num_tokens: int) -> int:
    """How many leading experts run forward-only in this stage."""
    if "experts" in frozen:
        return num_tokens
    return num_old_experts if "old_experts" in frozen else 0


def stage_directory(workdir: str, stage: ml_collections.ConfigDict, multi_stage: bool) -> str:
    return os.path.join(workdir, stage.name) if multi_stage else workdir
