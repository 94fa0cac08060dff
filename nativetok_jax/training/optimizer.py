"""The optimiser factory: AdamW with warm-up and cosine decay, global-norm clipping, weight decay
by rank, and freezing as a masked optimiser.

**Freezing** (``trainable``, a tree shaped like the parameters whose leaves are ``True``,
``False`` or a boolean row mask broadcastable to the parameter) follows big_vision's
``optax.multi_transform`` recipe: a frozen parameter goes to ``optax.set_to_zero()``, so it has
no Adam moments, gets no update (weight decay included: it stays bit-identical), and its
gradient is in neither the global-norm clipping nor the logged ``grad_norm``. A parameter frozen
in some rows only (the stacked experts of earlier HNT stages) keeps its moments, and its frozen
rows' gradients and updates are masked to exactly zero before clipping and after AdamW. The train
step also puts the frozen parameters (and only them) under ``stop_gradient``
(:func:`stop_frozen_gradients`), so XLA computes no weight gradient for them while gradients
still flow *through* them to the trainable parameters before them.

**Weight decay** applies to matrices: parameters with two or more axes once the stacking axes
(``layers``, ``experts``: one matrix per layer or expert) are left out. Embedding tables,
position tables, the codebook and biases (an attention bias is ``[heads, head_dim]``) are
excluded by name, as in LlamaGen, big_vision and MaxText.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

# Axes along which a parameter stacks several independent ones (scanned layers, experts).
STACKED_AXES = ("layers", "experts")
# Leaf names (substrings) never decayed although they may be matrices.
NOT_DECAYED = ("embedding", "position", "codebook", "bias")
Trainable = Any  # tree of True | False | bool np.ndarray (rows), shaped like the parameters


def learning_rate_schedule(train: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    warmup = min(train.warmup_steps, max(num_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1),
        end_value=train.learning_rate * train.final_learning_rate_ratio,
    )


def _key(entry: Any) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def is_decayed(name: str, shape: tuple[int, ...], axes: tuple[str | None, ...] | None = None) -> bool:
    """Whether a parameter named ``name`` (its leaf name) is weight-decayed: see the module doc."""
    if any(word in name for word in NOT_DECAYED):
        return False
    rank = len(shape) if axes is None else sum(a not in STACKED_AXES for a in axes)
    return rank >= 2


def weight_decay_mask(params: Any, axes: Any | None = None) -> Any:
    """``True`` for every decayed parameter; ``axes`` (logical axis names per parameter, from
    ``sharding.param_axes``) lets stacked vectors count as vectors."""
    flat_axes = {}
    if axes is not None:
        flat_axes = {tuple(_key(k) for k in path): a for path, a in
                     jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]}

    def decayed(path, value):
        keys = tuple(_key(k) for k in path)
        return is_decayed(keys[-1], np.shape(value), flat_axes.get(keys))

    return jax.tree_util.tree_map_with_path(decayed, params)


def _row_masks(trainable: Trainable) -> Any | None:
    """Row masks of the partly frozen parameters (``True`` elsewhere), or None if there are none."""
    leaves = jax.tree.leaves(trainable)
    if not any(isinstance(t, np.ndarray) for t in leaves):
        return None
    return jax.tree.map(lambda t: t if isinstance(t, np.ndarray) else np.bool_(True), trainable)


class MaskRowsState(NamedTuple):
    pass


def mask_rows(rows: Any) -> optax.GradientTransformation:
    """Sets the updates of frozen rows to exactly zero (``rows``: boolean arrays, broadcastable)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, rows), state

    return optax.GradientTransformation(lambda params: MaskRowsState(), update)


def make_optimizer(
    train: ml_collections.ConfigDict,
    num_steps: int,
    params: Any,
    trainable: Trainable | None = None,
    axes: Any | None = None,
) -> optax.GradientTransformation:
    """The optimiser of one training run or stage; ``trainable=None`` trains everything.

    ``train`` holds ``learning_rate, final_learning_rate_ratio, warmup_steps, beta1, beta2,
    weight_decay, grad_clip_norm``; ``params`` may be abstract (only names and shapes are read).
    """
    decayed = weight_decay_mask(params, axes)
    flat_decayed = {tuple(_key(k) for k in path): d for path, d in jax.tree_util.tree_flatten_with_path(decayed)[0]}
    parts = []
    if train.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(train.grad_clip_norm))
    parts.append(
        optax.adamw(
            learning_rate_schedule(train, num_steps),
            b1=train.beta1,
            b2=train.beta2,
            weight_decay=train.weight_decay,
            # A function of the (possibly masked) tree it is given: inside multi_transform the
            # frozen leaves are absent, so a fixed mask tree would not match.
            mask=lambda tree: jax.tree_util.tree_map_with_path(
                lambda path, _: flat_decayed[tuple(_key(k) for k in path)], tree),
        )
    )
    optimizer = optax.chain(*parts)
    if trainable is None:
        return optimizer
    labels = jax.tree.map(lambda t: "frozen" if t is False else "trainable", trainable)
    optimizer = optax.multi_transform({"trainable": optimizer, "frozen": optax.set_to_zero()}, labels)
    rows = _row_masks(trainable)
    if rows is not None:  # frozen rows: no gradient into clipping, no update out of AdamW
        optimizer = optax.chain(mask_rows(rows), optimizer, mask_rows(rows))
    return optimizer


def trainable_norm(grads: Any, trainable: Trainable | None) -> jax.Array:
    """Global norm of the gradients of the trainable parameters (frozen rows count as zero)."""
    if trainable is None:
        return optax.tree.norm(grads)
    kept = [jnp.where(t, g, 0.0) if isinstance(t, np.ndarray) else g
            for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(trainable)) if t is not False]
    return optax.tree.norm(kept)


def stop_frozen_gradients(params: Any, trainable: Trainable | None) -> Any:
    """``params`` with the frozen ones (whole, or their frozen rows) under ``stop_gradient``: the
    same values, no gradient into them, gradients still flowing through them."""
    if trainable is None:
        return params

    def stop(p, t):
        if t is False:
            return jax.lax.stop_gradient(p)
        if isinstance(t, np.ndarray):
            return jnp.where(t, p, jax.lax.stop_gradient(p))
        return p

    return jax.tree.map(stop, params, trainable)


def ema_update(ema: Any, params: Any, decay: float, trainable: Trainable | None = None) -> Any:
    """``ema + (1 - decay) * (params - ema)`` for trainable parameters; a frozen parameter's EMA
    stays as it is (HNT grows the EMA from the previous stage's, which must survive the stage)."""
    if trainable is None:
        return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)

    def update(e, p, t):
        if t is False:
            return e
        new = e + (1.0 - decay) * (p - e)
        return jnp.where(t, new, e) if isinstance(t, np.ndarray) else new

    return jax.tree.map(update, ema, params, trainable)


def optimizer_state_bytes(opt_state: Any) -> int:
    """Bytes of the optimiser state's arrays (for benchmarks and tests of freezing)."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(opt_state)
                   if hasattr(x, "shape")))


