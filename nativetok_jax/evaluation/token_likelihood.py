"""Token likelihood: a trained generator's NLL of every held-out token, per crop.

The generator trainer reports one held-out NLL averaged over a whole store; comparing two
tokenizers with a confidence interval (:mod:`nativetok_jax.evaluation.paired_bootstrap`) or
splitting the NLL into unigram and context (:mod:`nativetok_jax.evaluation.token_statistics`)
needs the per-token numbers behind that average:

- :func:`next_token_nll`: the AR generator (``models/generators/gpt.py``) with teacher forcing, ``[m, L]``;
  its mean is exactly the trainer's ``nll_per_token`` (``HeldOutLikelihood``), its column means
  the trainer's ``nll_by_position``.
- :func:`masked_token_nll`: the MaskGIT generator (``models/generators/masked_generator.py``) at given mask
  rates, ``[m, R]``: the mean NLL of the hidden tokens of each crop when a fraction ``r`` of its
  positions is hidden. :func:`decoding_mask_rates` gives the rates MaskGIT's cosine decoding
  schedule (``generation/masked.py``) puts its inputs at; :func:`rate_masks` the masks, fixed by
  the key and the crop's index, so every arm scored with one key sees the same masks.
- :func:`trained_generator_nll`: either, for a trained generator loaded from its workdir.

Each runs one jitted program per model structure and batch shape and works under a
mesh with axis rules (``jax.set_mesh(mesh)`` and ``axis_rules(rules)``), gathering every
process's rows, as the trainer's held-out evaluation does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from nativetok_jax import sharding
from nativetok_jax.generation.masked import mask_schedule
from nativetok_jax.layers.partitioning import axis_rules
from nativetok_jax.models.generators.gpt import GPT
from nativetok_jax.models.generators.masked_generator import MaskedTokenTransformer

if TYPE_CHECKING:
    from nativetok_jax.generation.pretrained import TrainedGenerator

Model = GPT | MaskedTokenTransformer | tuple[nnx.GraphDef, Any]

# A rate times the length can land a hair above an integer (0.1 * 30 = 3.0000000000000004);
# without the slack, ceil would hide one token more than the rate asks for.
_ROUNDING_SLACK = 1e-9


def next_token_nll(model: Model, ids: np.ndarray, labels: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """Teacher-forced NLL of every token under an AR generator: float32 ``[m, L]``, nats.

    Entry ``[j, i]`` is ``-log q(ids[j, i] | labels[j], ids[j, :i])``, the GPT's row ``i``
    (``models/generators/gpt.py``: ``[class ; t_1 .. t_{L-1}]`` predicts ``t_1 .. t_L``). The mean is the
    generator trainer's held-out ``nll_per_token``, the column means its ``nll_by_position``.

    Args:
      model: a :class:`GPT`, or its ``(graphdef, params)`` (params: ``nnx.State`` or a pure dict,
        e.g. a train state's ``"ema"``).
      ids: int ``[m, L]`` held-out token ids, ``L`` the model's ``num_tokens``.
      labels: int ``[m]`` class labels (``model.null_class`` scores the unconditional model).
      batch_size: crops per forward pass (the last batch is padded to it, so one program serves).

    Raises:
      ValueError: if the model is not a GPT, or ids / labels have the wrong shape or range.
    """
    graphdef, params, network = _split(model, GPT, "next_token_nll")
    ids, labels = _check_inputs(network, ids, labels)
    return _scored(graphdef, params, ids, ids, labels, batch_size)


def trained_generator_nll(
    generator: TrainedGenerator, ids: np.ndarray, labels: np.ndarray, *, mask_rates: Sequence[float] | None = None,
    key: jax.Array | None = None, batch_size: int = 64,
) -> np.ndarray:
    """A trained generator's held-out NLLs, on its own mesh and sharding rules.

    ``generator`` is a :class:`~nativetok_jax.generation.pretrained.TrainedGenerator` (e.g.
    ``TrainedGenerator.from_checkpoint(generator_workdir)`` after ``train_generator``). An AR
    generator gives :func:`next_token_nll`'s float32 ``[m, L]``; a MaskGIT one
    :func:`masked_token_nll`'s ``[m, R]``, at ``mask_rates`` (default: the rates of its own
    sampler, :func:`decoding_mask_rates` of ``config.generator.sample.num_steps``) with masks from
    ``key`` (default ``jax.random.key(0)``; keep one key for every arm compared).

    Raises:
      ValueError: as :func:`next_token_nll` / :func:`masked_token_nll`.
    """
    model = (generator.graphdef, generator.params)
    with jax.set_mesh(generator.tokenizer.mesh), axis_rules(sharding.rules_of(generator.config)):
        if generator.kind == "ar":
            return next_token_nll(model, ids, labels, batch_size=batch_size)
        if mask_rates is None:
            num_steps = generator.config.generator.sample.num_steps
            mask_rates = decoding_mask_rates(num_steps, generator.tokenizer.num_tokens)
        return masked_token_nll(model, ids, labels, mask_rates=mask_rates,
                                key=jax.random.key(0) if key is None else key, batch_size=batch_size)


def masked_token_nll(
    model: Model, ids: np.ndarray, labels: np.ndarray, *, mask_rates: Sequence[float], key: jax.Array,
    batch_size: int = 64,
) -> np.ndarray:
    """Mean NLL of the hidden tokens of each crop at each mask rate: float32 ``[m, R]``, nats.

    For crop ``j`` and rate ``r = mask_rates[k]``, ``ceil(r * L)`` positions (at least one),
    chosen by :func:`rate_masks` from ``key``, are replaced by the ``[MASK]`` id; entry ``[j, k]``
    is the mean of ``-log q(ids[j, i] | visible ids, labels[j])`` over the hidden positions ``i``.
    This is MaskGIT's training loss (``masked_cross_entropy``) with the mask rate fixed instead of
    drawn, so the same rates and key give the same masks for every generator of length ``L``
    (paired comparisons between arms). ``.mean(-1)`` is each crop's figure with every rate
    weighted equally (one per decoding step when the rates are :func:`decoding_mask_rates`).

    Args:
      model: a :class:`MaskedTokenTransformer`, or its ``(graphdef, params)``.
      ids: int ``[m, L]`` held-out token ids, ``L`` the model's ``num_tokens``.
      labels: int ``[m]`` class labels (``model.null_class``: unconditional).
      mask_rates: ``R`` fractions of positions hidden, each in ``(0, 1]``.
      key: a JAX PRNG key, the masks' seed.
      batch_size: sequences per forward pass (``m * R`` sequences are scored).

    Raises:
      ValueError: if the model is not a MaskGIT transformer, a rate is outside ``(0, 1]``, or
        ids / labels have the wrong shape or range.
    """
    graphdef, params, network = _split(model, MaskedTokenTransformer, "masked_token_nll")
    ids, labels = _check_inputs(network, ids, labels)
    masks = rate_masks(key, len(ids), ids.shape[1], mask_rates)  # [m, R, L]
    num_rates = masks.shape[1]
    inputs = np.where(masks, network.mask_id, ids[:, None, :]).reshape(-1, ids.shape[1])
    targets = np.repeat(ids, num_rates, axis=0)
    nll = _scored(graphdef, params, inputs, targets, np.repeat(labels, num_rates), batch_size)
    nll = nll.reshape(masks.shape)
    return ((nll * masks).sum(-1) / masks.sum(-1)).astype(np.float32)


def rate_masks(key: jax.Array, num_examples: int, num_tokens: int, mask_rates: Sequence[float]) -> np.ndarray:
    """Which positions are hidden: bool ``[num_examples, R, num_tokens]``, True where masked.

    Row ``[j, k]`` hides ``max(1, ceil(mask_rates[k] * num_tokens))`` positions, uniformly at
    random (the lowest ranks of uniform scores, as ``cosine_mask`` does), from
    ``fold_in(key, j)``: a crop's masks depend on the key and its index only, not on how many
    crops or which batch.

    Raises:
      ValueError: if there are no rates or one lies outside ``(0, 1]``.
    """
    rates = np.asarray(mask_rates, dtype=np.float64)
    if rates.ndim != 1 or not len(rates) or not ((rates > 0) & (rates <= 1)).all():
        raise ValueError(f"mask_rates must be one or more fractions in (0, 1], got {list(np.atleast_1d(rates))}")
    counts = np.clip(np.ceil(rates * num_tokens - _ROUNDING_SLACK), 1, num_tokens).astype(np.int64)
    keys = jax.vmap(lambda index: jax.random.fold_in(key, index))(jnp.arange(num_examples))
    scores = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (len(rates), num_tokens)))(keys))
    ranks = np.argsort(np.argsort(scores, axis=-1, kind="stable"), axis=-1, kind="stable")
    return ranks < counts[None, :, None]


def decoding_mask_rates(num_steps: int, num_tokens: int) -> tuple[float, ...]:
    """The fraction of positions hidden in the input of each of MaskGIT's ``num_steps`` decoding steps.

    Step ``t`` (0-based) reads ``mask_schedule(t - 1, num_steps, num_tokens)`` hidden tokens
    (``generation/masked.py``: the cosine schedule, every step committing at least one), so the
    first rate is 1 (all hidden) and the last the fraction left for the final step. Passed to
    :func:`masked_token_nll`, they score the generator on the states its sampler visits.

    Raises:
      ValueError: if ``num_steps`` or ``num_tokens`` is below 1.
    """
    return tuple(mask_schedule(step - 1, num_steps, num_tokens) / num_tokens for step in range(num_steps))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_nll(graphdef: nnx.GraphDef, params: Any, inputs: jax.Array, targets: jax.Array,
               labels: jax.Array) -> jax.Array:
    """``-log softmax(model(inputs, labels))[targets]``: float32 ``[B, L]``."""
    logits = nnx.merge(graphdef, params)(inputs, labels).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def _scored(graphdef: nnx.GraphDef, params: Any, inputs: np.ndarray, targets: np.ndarray, labels: np.ndarray,
            batch_size: int) -> np.ndarray:
    """:func:`_token_nll` over every row, in padded batches of ``batch_size``: float32 ``[N, L]``."""
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = min(batch_size, len(inputs))
    rows = []
    for start in range(0, len(inputs), batch_size):
        stop = min(start + batch_size, len(inputs))
        pad = batch_size - (stop - start)
        batch = [np.concatenate([x[start:stop], np.zeros((pad,) + x.shape[1:], x.dtype)])
                 for x in (inputs, targets, labels)]
        # Under a mesh the batch spans every process's devices: each process needs all of it.
        nll = multihost_utils.process_allgather(_token_nll(graphdef, params, *batch), tiled=True)
        rows.append(np.asarray(nll, np.float32)[: stop - start])
    return np.concatenate(rows)


def _split(model: Model, expected: type, caller: str) -> tuple[nnx.GraphDef, Any, Any]:
    """``(graphdef, params, module)`` of a module or a ``(graphdef, params)`` pair, checked."""
    graphdef, params = model if isinstance(model, tuple) else nnx.split(model)
    network = model if not isinstance(model, tuple) else nnx.merge(graphdef, params)
    if not isinstance(network, expected):
        raise ValueError(f"{caller} scores a {expected.__name__}, got a {type(network).__name__}")
    return graphdef, params, network


def _check_inputs(network: GPT | MaskedTokenTransformer, ids: np.ndarray,
                  labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 ``ids [m, L]`` and ``labels [m]``, checked against the model's length, vocabulary and classes."""
    ids, labels = np.asarray(ids), np.asarray(labels)
    if ids.ndim != 2 or not len(ids) or ids.shape[1] != network.num_tokens:
        raise ValueError(f"ids must be [num_crops >= 1, {network.num_tokens}], got shape {list(ids.shape)}")
    if labels.shape != ids.shape[:1]:
        raise ValueError(f"labels must be [{len(ids)}] (one per crop), got shape {list(labels.shape)}")
    if ids.min() < 0 or ids.max() >= network.vocab_size:
        raise ValueError(f"ids must lie in [0, {network.vocab_size}), got ids in [{ids.min()}, {ids.max()}]")
    if labels.min() < 0 or labels.max() > network.num_classes:
        raise ValueError(f"labels must lie in [0, {network.num_classes}] ({network.num_classes}: the null class), "
                         f"got labels in [{labels.min()}, {labels.max()}]")
    return ids.astype(np.int32), labels.astype(np.int32)

