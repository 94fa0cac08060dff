"""AdamW with warm-up and cosine decay, gradient clipping, and exact freezing.

Freezing is one mask, built from the config (``training/freezing.py``) and applied to the final
updates: a frozen element's update is multiplied by exactly zero, so it stays bit-identical even
under weight decay. Weight decay applies to matrices (kernels and attention projections) only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import ml_collections
import optax

DECAYED = ("kernel", "query", "key", "value", "out")


def learning_rate_schedule(train: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    warmup = min(train.warmup_steps, max(num_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1),
        end_value=train.learning_rate * train.final_learning_rate_ratio,
    )


def weight_decay_mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) in DECAYED, params)


class KeepFrozenState(NamedTuple):
    pass


def keep_frozen(trainable: Any) -> optax.GradientTransformation:
    """Multiplies every update by ``trainable`` (a tree of 0/1 arrays broadcastable to the params)."""

    def init(params):
        del params
        return KeepFrozenState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, trainable), state

    return optax.GradientTransformation(init, update)


def make_optimizer(
    train: ml_collections.ConfigDict, num_steps: int, params: Any, trainable: Any | None = None
) -> optax.GradientTransformation:
    """The optimiser of one training stage; ``trainable=None`` trains everything."""
    parts = []
    if train.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(train.grad_clip_norm))
    parts.append(
        optax.adamw(
            learning_rate_schedule(train, num_steps),
            b1=train.beta1,
            b2=train.beta2,
            weight_decay=train.weight_decay,
            mask=weight_decay_mask(params),
        )
    )
    if trainable is not None:
        parts.append(keep_frozen(trainable))
    return optax.chain(*parts)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """``ema + (1 - decay) * (params - ema)``: exact for parameters that did not move."""
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)
