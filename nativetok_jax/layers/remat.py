"""Rematerialisation of a transformer stack's layer, by named policy (as big_vision and MaxText
name theirs).

A config's stack has ``remat`` (False: keep every activation the backward pass needs) and
``remat_policy``, one of :data:`POLICIES` (``jax.checkpoint_policies``), used when ``remat`` is
True:

- ``nothing_saveable``: recompute the whole layer in the backward pass (least memory, one more
  forward of FLOPs);
- ``dots_saveable``: keep every matrix product's output, recompute the elementwise work between
  them (layer norms, GELU, softmax): little more FLOPs, most of the memory saving where the
  elementwise intermediates are what the scan stacks;
- ``dots_with_no_batch_dims_saveable``: keep only products without ``dot_general`` batch
  dimensions: every product with a weight (projections and MLP, ``[B, T, D] x [D, F]``; ``B`` and
  ``T`` are free dimensions there, not batch ones) but not the attention's two products
  (``q k^T`` and ``p v``, batched over examples and heads), whose ``[B, heads, T, T]`` scores are
  recomputed instead of stored: the weight products' FLOPs are not recomputed, at a fraction of
  ``dots_saveable``'s memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from nativetok_jax.schema import REMAT_POLICIES as POLICIES
Remat = bool | str  # False, True (nothing_saveable) or a policy name


def remat_of(config: Any) -> Remat:
    """A stack config's setting: False, or its ``remat_policy`` (``nothing_saveable`` when the
    config has none)."""
    return config.get("remat_policy", "nothing_saveable") if config.remat else False


def rematerialized(layer: Callable[..., Any], remat: Remat) -> Callable[..., Any]:
    """``layer`` under ``jax.checkpoint`` with the policy ``remat`` names (True:
    ``nothing_saveable``), or as it is for False.

    Raises:
      ValueError: an unknown policy name.
    """
    if not remat:
        return layer
    name = "nothing_saveable" if remat is True else remat
    if name not in POLICIES:
        raise ValueError(f"remat policy {name!r}: must be one of {POLICIES}")
    return jax.checkpoint(layer, prevent_cse=False, policy=getattr(jax.checkpoint_policies, name))
