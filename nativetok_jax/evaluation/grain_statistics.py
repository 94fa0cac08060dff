"""Statistics of grain maps: the fine fraction per class, data against samples (D²iT, Sec. 3.2).

D²iT's grain transformer must reproduce how much of an image is detailed, class by class (a class
of textures has more fine regions than one of skies). The fine fraction of a set of grain maps is
the number of fine regions (grain 1) over all regions; comparing the samples' fractions with the
data's, per class, is the first check that the grain transformer learned its distribution.
"""

from __future__ import annotations

import numpy as np


def fine_fraction_by_class(grains: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The fine fraction of the maps of each class: float64 ``[max(num_classes, 1)]``.

    Args:
      grains: int or bool ``[N, ...]`` grain maps (e.g. ``[N, gh, gw]``), 0 coarse, 1 fine.
      labels: int ``[N]`` class ids in ``[0, num_classes)``.
      num_classes: the data's class count; 0 or 1 (no labels) pools every map into entry 0,
        whatever ``labels`` holds.

    Returns:
      Entry ``c`` = fine regions / regions over the maps labelled ``c``; NaN for a class with no
      maps (so an empty class is never reported as all-coarse).

    Raises ``ValueError`` (one line) for grain values other than 0/1, labels not ``[N]``, or labels
    outside ``[0, num_classes)``.
    """
    grains = np.asarray(grains)
    labels = np.asarray(labels)
    if grains.ndim < 1 or labels.shape != grains.shape[:1]:
        raise ValueError(f"labels must be [N] with N = len(grains), got shapes {labels.shape} and {grains.shape}")
    values = np.unique(grains)
    bad = values[(values != 0) & (values != 1)]
    if bad.size:
        raise ValueError(f"grains must hold only 0 (coarse) and 1 (fine), found {bad[:5].tolist()}")
    if num_classes <= 1:
        labels = np.zeros(len(grains), np.int64)
    elif labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    num_rows = max(num_classes, 1)
    fine_per_map = grains.reshape(len(grains), -1).sum(axis=1, dtype=np.float64)
    fine = np.bincount(labels, weights=fine_per_map, minlength=num_rows)
    regions = np.bincount(labels, minlength=num_rows) * (grains[0].size if len(grains) else 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(regions > 0, fine / np.maximum(regions, 1), np.nan)
