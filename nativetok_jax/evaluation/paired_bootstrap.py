"""The paired bootstrap: a confidence interval for the mean difference of two systems on the same items.

Two generators scored on the *same* held-out crops give paired measurements: a crop that is hard
for one is usually hard for the other, so the crop-to-crop spread largely cancels in the
difference. Resampling the crops (with replacement) and recomputing the mean difference each
time keeps that pairing, and the percentile interval of the resampled means is the interval
(Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13 (percentile intervals);
Koehn, "Statistical Significance Tests for Machine Translation Evaluation", EMNLP 2004, for the
paired use on a shared test set).

What the interval covers: the uncertainty from *which* crops were held out, for the two trained
models as they are. It does not cover training randomness (tokenizer and generator seeds):
report that as the spread over seeds.

Pairing needs the same crops on both sides. The generator trainer draws its held-out crops from
the generator's seed (``train.seed + 1``; random crops for the bundled photographs, centre crops
otherwise), so compare arms trained with the same generator seed. With several seeds, pass
``[n, seeds, ...]`` to average the seeds into each crop's figure when every seed holds the same
crops, or stack the seeds' pairs along axis 0 (items are then (seed, crop) pairs) when not.
"""

from __future__ import annotations

import numpy as np

# Resampled index matrices are drawn in blocks of at most this many entries, so memory stays
# bounded (about 32 MiB of int64) for any number of pairs and resamples.
_BLOCK_ENTRIES = 1 << 22


def paired_bootstrap_interval(
    a: np.ndarray,
    b: np.ndarray,
    *,
    num_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float | int]:
    """Percentile bootstrap interval of ``mean(a - b)`` over paired items (e.g. held-out crops).

    Each item's value is the mean over its trailing axes: ``a`` ``[n, L]`` of per-token NLLs gives
    each crop's mean per-token NLL; ``[n]`` is used as it is. Item ``i`` of ``a`` and of ``b`` must
    be the same crop; their trailing shapes may differ (each is averaged on its own).

    Args:
      a: float ``[n]`` or ``[n, ...]``, the first system's measurements (e.g. nats per token).
      b: float ``[n]`` or ``[n, ...]``, the second system's, paired with ``a`` along axis 0.
      num_resamples: bootstrap resamples (each draws ``n`` items with replacement).
      confidence: the interval's nominal coverage, in (0, 1).
      seed: seeds numpy's PCG64 generator; the same inputs and seed give the same interval.

    Returns:
      ``mean_difference`` (``mean(a) - mean(b)`` over items, in the inputs' unit), ``low`` and
      ``high`` (the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the
      resampled mean differences), ``standard_error`` (their standard deviation) and
      ``num_pairs`` (``n``). Negative differences mean ``a`` is lower (better, for an NLL).

    Raises:
      ValueError: if ``a`` or ``b`` is a scalar, their first axes differ, there are fewer than two
        pairs, a value is not finite, or ``num_resamples`` / ``confidence`` is out of range.
    """
    a_items, b_items = _item_means(a, "a"), _item_means(b, "b")
    if len(a_items) != len(b_items):
        raise ValueError(f"a and b must pair item for item along axis 0, got {len(a_items)} and {len(b_items)} items")
    if len(a_items) < 2:
        raise ValueError(f"the paired bootstrap needs at least 2 pairs, got {len(a_items)}")
    if not (isinstance(num_resamples, (int, np.integer)) and num_resamples >= 1):
        raise ValueError(f"num_resamples must be a positive integer, got {num_resamples!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    differences = a_items - b_items
    n = len(differences)
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ENTRIES // n)
    means = np.concatenate([
        differences[rng.integers(0, n, size=(min(block, num_resamples - start), n))].mean(axis=1)
        for start in range(0, num_resamples, block)
    ])
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return dict(mean_difference=float(differences.mean()), low=float(low), high=float(high),
                standard_error=float(means.std(ddof=1)) if num_resamples > 1 else 0.0, num_pairs=int(n))


def _item_means(values: np.ndarray, name: str) -> np.ndarray:
    """float64 ``[n]``: each item's mean over the trailing axes."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 0:
        raise ValueError(f"{name} must be [n] or [n, ...] (one row per paired item), got a scalar")
    if values.size and not np.isfinite(values).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(values)).sum())} non-finite values")
    return values.reshape(len(values), -1).mean(axis=1) if values.ndim > 1 else values
