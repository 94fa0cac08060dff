"""Token statistics: how much of a generator's likelihood comes from context, position by position.

A tokenizer can make generation "easier" in two ways that the generator's held-out NLL alone
cannot tell apart: by using fewer or more predictable codes at each position (visible without any
context, in the per-position code frequencies), or by making each code predictable *from the
codes before it* (which only a model that reads the context can exploit). NativeTok's claim
(docs/nativetok.md, "Generators and the claim they test") is the second one. This module splits a held-out NLL into

- the **unigram NLL** of each position: the held-out codes scored by the training set's code
  frequencies at that position (add-one smoothed), the no-context baseline;
- the **context gain**: unigram NLL minus the generator's NLL, per position and on average;
- the **captured information** of each position: the same difference read as an estimate of the
  mutual information ``I(x_i; x_<i)`` the generator exploits (see :func:`context_decomposition`
  for exactly what it bounds);
- the **plug-in entropy** of each position's codes, the ceiling any context gain at that
  position can approach;
- the same split for a MaskGIT generator (:func:`masked_context_decomposition`), whose context
  is the visible codes at a given mask rate rather than the codes before.

All functions are numpy and take ids ``[num_examples, num_tokens]`` (position ``i`` is column
``i``); NLLs and entropies are in nats. With a trained AR generator (its workdir ``gen``):

    train_ids, _ = TokenSource(f"{gen}/tokens/train").arrays()
    ids, labels = TokenSource(f"{gen}/tokens/eval").arrays()
    nll = trained_generator_nll(TrainedGenerator.from_checkpoint(gen), ids, labels)  # [m, L]
    figures = context_decomposition(train_ids, ids, nll, codebook_size)
    # two arms on the same held-out crops: nll_a - nll_b with a 95 % interval
    contrast = paired_bootstrap_interval(nll_a, nll_b)

(``trained_generator_nll``: :mod:`nativetok_jax.evaluation.token_likelihood`;
``paired_bootstrap_interval``: :mod:`nativetok_jax.evaluation.paired_bootstrap`.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from nativetok_jax import storage
from nativetok_jax.data.token_store import TokenSource


def position_code_counts(ids: np.ndarray, codebook_size: int) -> np.ndarray:
    """How often each code occurs at each position: int64 ``[num_tokens, codebook_size]``.

    Raises:
      ValueError: if ``ids`` is not ``[n, L]`` with ``n >= 1`` or holds an id outside
        ``[0, codebook_size)``.
    """
    ids = _check_ids(ids, codebook_size, "ids")
    length = ids.shape[1]
    # One bincount over (position, code) pairs flattened to position * K + code.
    flat = (np.arange(length, dtype=np.int64) * codebook_size + ids).ravel()
    return np.bincount(flat, minlength=length * codebook_size).reshape(length, codebook_size)


def unigram_token_nll(train_ids: np.ndarray, held_out_ids: np.ndarray, codebook_size: int) -> np.ndarray:
    """Each held-out token's NLL under its position's add-one smoothed training frequencies.

    ``p_i(k) = (count_i(k) + 1) / (n + K)`` with ``count_i(k)`` the training examples whose code at
    position ``i`` is ``k``: Laplace's rule of succession, so a code never seen at a position
    costs ``log(n + K)`` nats rather than infinity. This is the per-position unigram baseline the
    token-order experiment reports as ``nll_unigram`` (its mean over tokens).

    Args:
      train_ids: int ``[n, L]``, the training set's codes.
      held_out_ids: int ``[m, L]``, the held-out codes scored.
      codebook_size: ``K``; every id must lie in ``[0, K)``.

    Returns:
      float64 ``[m, L]`` NLLs in nats (average it per crop for :func:`paired_bootstrap_interval`).

    Raises:
      ValueError: if either array is not 2-D and non-empty, their lengths ``L`` differ, or an id
        is out of range.
    """
    counts = position_code_counts(train_ids, codebook_size) + 1.0
    held_out_ids = _check_ids(held_out_ids, codebook_size, "held_out_ids")
    if held_out_ids.shape[1] != counts.shape[0]:
        raise ValueError(f"held_out_ids has {held_out_ids.shape[1]} positions, train_ids {counts.shape[0]}")
    log_probs = np.log(counts) - np.log(counts.sum(axis=1, keepdims=True))  # [L, K]
    return -log_probs[np.arange(counts.shape[0]), held_out_ids]


def plug_in_entropy(ids: np.ndarray, codebook_size: int) -> np.ndarray:
    """The plug-in (maximum-likelihood) entropy of each position's codes: float64 ``[L]``, nats.

    ``H_i = -sum_k f_i(k) log f_i(k)`` with ``f_i`` the codes' observed frequencies at position
    ``i``. It is biased low by about ``(K_i - 1) / (2 n)`` nats (Miller, 1955), ``K_i`` being the
    number of codes seen at the position: small when ``n`` far exceeds the codes in use.

    Raises:
      ValueError: as :func:`position_code_counts`.
    """
    counts = position_code_counts(ids, codebook_size).astype(np.float64)
    frequencies = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(frequencies > 0, frequencies * np.log(frequencies), 0.0)
    return -terms.sum(axis=1)


def context_decomposition(
    train_ids: np.ndarray, held_out_ids: np.ndarray, model_nll: np.ndarray, codebook_size: int
) -> dict[str, Any]:
    """Splits a generator's held-out NLL into the no-context baseline and what context adds.

    For each position ``i`` (means over the ``m`` held-out examples):

    - ``unigram_nll_by_position[i]``: :func:`unigram_token_nll`'s mean;
    - ``model_nll_by_position[i]``: ``model_nll``'s mean;
    - ``context_gain_by_position[i]``: their difference, unigram minus model (nats);
    - ``captured_information_by_position[i]``: the same number, as an estimate of the mutual
      information between the code at ``i`` and what the generator reads before it, in nats.
      Precisely: in expectation over held-out data, unigram NLL minus model NLL equals
      ``I(x_i; x_<i, y) + KL(p_i || u_i) - E[KL(p(x_i | x_<i, y) || q(x_i | x_<i, y))]``, where
      ``y`` is the class label the generator is given (constant for unlabelled data, where the
      term is ``I(x_i; x_<i)``), ``p`` the true distribution, ``u_i`` the smoothed unigram and
      ``q`` the generator. The last term, the generator's own modelling error, is the part of
      the information it fails to capture: the information it *captured*,
      ``I - E[KL(p || q)]``, is exactly the gain minus ``KL(p_i || u_i)``, and since the
      modelling error is ``>= 0`` the gain lower-bounds the true ``I(x_i; x_<i, y)`` up to the
      unigram's estimation error ``KL(p_i || u_i) >= 0`` (which makes the gain read high), plus
      the held-out sampling noise of both means. That error grows with ``K / n`` (codes per
      training example); ``unigram_excess_by_position`` estimates it. At the first position only the
      class is context, so its gain (about 0 for unlabelled data) reads those errors directly.
      For a MaskGIT generator see :func:`masked_context_decomposition`.
    - ``entropy_by_position[i]``: :func:`plug_in_entropy` of the training codes, the ceiling of
      the information any context can give about position ``i``;
    - ``unigram_excess_by_position[i]``: unigram NLL minus that entropy, an estimate of
      ``KL(p_i || u_i)`` (high by the plug-in entropy's downward bias): when it is comparable
      to the gain, the gain says little about the information captured.

    The figures without ``_by_position`` are the means over positions (so over all tokens:
    ``model_nll`` is the generator's held-out NLL per token). Every value is a Python float or a
    list of floats, ready for JSON.

    Args:
      train_ids: int ``[n, L]``, the codes the unigram and the entropy are estimated from.
      held_out_ids: int ``[m, L]``, the held-out codes the generator was scored on.
      model_nll: float ``[m, L]``, the generator's NLL of each held-out code (nats), e.g. from
        :func:`nativetok_jax.evaluation.token_likelihood.next_token_nll`.
      codebook_size: ``K``.

    Raises:
      ValueError: if the shapes disagree, an id is out of range or an NLL is not finite.
    """
    unigram = unigram_token_nll(train_ids, held_out_ids, codebook_size)
    model_nll = np.asarray(model_nll, dtype=np.float64)
    if model_nll.shape != unigram.shape:
        raise ValueError(f"model_nll must be [m, L] = {list(unigram.shape)} like held_out_ids, "
                         f"got {list(model_nll.shape)}")
    if not np.isfinite(model_nll).all():
        raise ValueError(f"model_nll holds {int((~np.isfinite(model_nll)).sum())} non-finite values")
    unigram_by_position, model_by_position = unigram.mean(axis=0), model_nll.mean(axis=0)
    gain = unigram_by_position - model_by_position
    entropy = plug_in_entropy(train_ids, codebook_size)
    by_position = dict(
        unigram_nll=unigram_by_position,
        model_nll=model_by_position,
        context_gain=gain,
        captured_information=gain,
        entropy=entropy,
        unigram_excess=unigram_by_position - entropy,
    )
    report: dict[str, Any] = {name: float(values.mean()) for name, values in by_position.items()}
    report.update({f"{name}_by_position": values.tolist() for name, values in by_position.items()})
    return report


def masked_context_decomposition(
    train_ids: np.ndarray, held_out_ids: np.ndarray, masks: np.ndarray, masked_nll: np.ndarray,
    codebook_size: int, mask_rates: Sequence[float] | None = None,
) -> dict[str, Any]:
    """:func:`context_decomposition` for a MaskGIT generator: unigram and model NLL of the hidden tokens, per mask rate.

    At mask rate ``r`` the generator predicts each hidden code from the visible ones (and the
    class). For each crop and rate, the unigram NLL is averaged over the same hidden positions
    the model's masked-token NLL was, so the two are paired token for token; the gain, unigram
    minus model, is then the information the visible codes (and the class) give about the
    hidden ones that the generator captured, bounded as :func:`context_decomposition` explains
    (with ``x_<i`` read as "the visible codes"). At rate 1 nothing is visible: the gain is the
    class's information alone (about 0 for unlabelled data), a check on the unigram's error.

    Args:
      train_ids: int ``[n, L]``, the codes the unigram is estimated from.
      held_out_ids: int ``[m, L]``, the held-out codes.
      masks: bool ``[m, R, L]``, True where hidden
        (:func:`nativetok_jax.evaluation.token_likelihood.rate_masks`).
      masked_nll: float ``[m, R]``, the generator's mean NLL of each crop's hidden codes at each
        rate (:func:`nativetok_jax.evaluation.token_likelihood.masked_token_nll` with the same key).
      codebook_size: ``K``.
      mask_rates: the ``R`` rates, recorded in the result (default: each row's hidden fraction).

    Returns:
      ``mask_rates`` and, per rate (lists, over crops' means) and on average over rates (floats):
      ``unigram_nll_by_rate`` / ``unigram_nll``, ``model_nll_by_rate`` / ``model_nll``,
      ``context_gain_by_rate`` / ``context_gain``.

    Raises:
      ValueError: if the shapes disagree, a row hides nothing, an id is out of range or an NLL is
        not finite.
    """
    unigram = unigram_token_nll(train_ids, held_out_ids, codebook_size)  # [m, L]
    masks = np.asarray(masks, dtype=bool)
    masked_nll = np.asarray(masked_nll, dtype=np.float64)
    m, length = unigram.shape
    if masks.ndim != 3 or masks.shape[0] != m or masks.shape[2] != length:
        raise ValueError(f"masks must be [m, R, L] = [{m}, R, {length}] like held_out_ids, got {list(masks.shape)}")
    if masked_nll.shape != masks.shape[:2]:
        raise ValueError(f"masked_nll must be [m, R] = {list(masks.shape[:2])}, got {list(masked_nll.shape)}")
    if not np.isfinite(masked_nll).all():
        raise ValueError(f"masked_nll holds {int((~np.isfinite(masked_nll)).sum())} non-finite values")
    hidden = masks.sum(axis=-1)
    if (hidden == 0).any():
        raise ValueError("every (crop, rate) row of masks must hide at least one position")
    unigram_hidden = (unigram[:, None, :] * masks).sum(axis=-1) / hidden  # [m, R]
    rates = hidden.mean(axis=0) / length if mask_rates is None else np.asarray(mask_rates, dtype=np.float64)
    if rates.shape != (masks.shape[1],):
        raise ValueError(f"mask_rates must list the {masks.shape[1]} rates of masks, got {len(rates)}")
    by_rate = dict(unigram_nll=unigram_hidden.mean(axis=0), model_nll=masked_nll.mean(axis=0),
                   context_gain=(unigram_hidden - masked_nll).mean(axis=0))
    report: dict[str, Any] = dict(mask_rates=rates.tolist())
    report.update({name: float(values.mean()) for name, values in by_rate.items()})
    report.update({f"{name}_by_rate": values.tolist() for name, values in by_rate.items()})
    return report


def unigram_nll(tokens_dir: str | os.PathLike) -> float:
    """The per-position unigram NLL (nats per token) of a generator's token directory.

    ``tokens_dir`` holds the ``train`` and ``eval`` token stores the generator trainer extracts
    (``<generator workdir>/tokens``); the figure is :func:`unigram_token_nll`'s mean over the
    held-out tokens.

    Raises:
      nativetok_jax.data.token_store.TokenStoreError: if either store is missing or incomplete.
    """
    train, held_out = (TokenSource(storage.path(tokens_dir) / split) for split in ("train", "eval"))
    return float(unigram_token_nll(train.arrays()[0], held_out.arrays()[0], train.codebook_size).mean())


def _check_ids(ids: np.ndarray, codebook_size: int, name: str) -> np.ndarray:
    """``ids`` as int64 ``[n, L]``, checked."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"{name} must be [num_examples >= 1, num_tokens >= 1], got shape {list(ids.shape)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must hold integer codes, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= codebook_size:
        raise ValueError(f"{name} must lie in [0, {codebook_size}), got ids in [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int64)
