"""Parameter counts of the tokenizers and generators, and an order-free encoder matched to
NativeTok's.

A comparison of tokenizers is fair only at a stated size. NativeTok's encoder is the Meta Image
Transformer *plus* one light transformer per token (docs/nativetok.md "The tokenizer"); the TiTok-style
baseline's is one ViT. At equal ViT sizes the order-free encoder is the smaller one (at the demo
scale by about 5x, the 32 experts dominating), so the token-order experiment reports every arm's
counts and can widen or deepen the baseline's ViT until its encoder matches (``match_encoder``).

Counts are of ``nnx.Param`` leaves of the abstract model (``nnx.eval_shape``: nothing is
allocated), so they are exactly the trained models' sizes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from nativetok_jax.models.nativetok.autoencoder import build_model
from nativetok_jax.models.generators.build import build_generator

MATCHING = ("", "depth", "width")  # "": the configured sizes


def _count(module: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def tokenizer_parameters(model: ml_collections.ConfigDict) -> dict[str, int]:
    """``{"encoder", "tokenizer"}`` parameter counts of the tokenizer ``model`` describes.

    ``encoder``: what makes the continuous tokens (NativeTok: the MIT with its dimension switcher
    and the causal experts; TiTok: the ViT with its latent tokens), the token head excluded;
    ``tokenizer``: everything (token head, codebook and decoder included).
    """
    abstract = nnx.eval_shape(lambda: build_model(model, nnx.Rngs(0)))
    parts = ("mit", "experts") if model.kind == "nativetok" else ("encoder",)
    return dict(encoder=sum(_count(getattr(abstract, part)) for part in parts), tokenizer=_count(abstract))


def generator_parameters(generator: ml_collections.ConfigDict, *, vocab_size: int, num_tokens: int,
                         num_classes: int) -> int:
    """Parameter count of the generator ``generator`` (a config's ``generator`` section) over a
    ``vocab_size`` codebook, ``num_tokens`` positions and ``num_classes`` classes (plus the null
    class)."""
    abstract = nnx.eval_shape(lambda: build_generator(generator, vocab_size=vocab_size, num_tokens=num_tokens,
                                                      num_classes=num_classes, rngs=nnx.Rngs(0)))
    return _count(abstract)


def _closest(sizes: list[int], count: Callable[[int], int], target: int) -> int:
    """The size in ascending ``sizes`` whose count (increasing with size) is closest to
    ``target`` (bisection: a handful of abstract builds, not one per size)."""
    low, high = 0, len(sizes) - 1
    while low < high:
        middle = (low + high) // 2
        if count(sizes[middle]) < target:
            low = middle + 1
        else:
            high = middle
    candidates = [sizes[i] for i in (low - 1, low) if 0 <= i < len(sizes)]
    return min(candidates, key=lambda size: abs(count(size) - target))


def match_encoder(order_free: ml_collections.ConfigDict, native: ml_collections.ConfigDict,
                  how: str) -> ml_collections.ConfigDict:
    """A copy of the TiTok-style ``order_free`` model config whose encoder has about as many
    parameters as the NativeTok ``native`` one's (MIT + experts), by growing its ViT's ``depth``
    (same width) or ``width`` (same depth and heads; multiples of ``num_heads``), whichever ``how``
    names; the closest size not below the configured one. ``how=""`` returns the copy unchanged.

    Raises:
      ValueError: ``how`` is not one of ``MATCHING``, or ``order_free`` is not a ``titok`` model.
    """
    if how not in MATCHING:
        raise ValueError(f"match_parameters: must be one of {MATCHING}, got {how!r}")
    if order_free.kind != "titok":
        raise ValueError(f"match_parameters: only an order-free (titok) encoder is resized, got {order_free.kind!r}")
    matched = ml_collections.ConfigDict(order_free.to_dict())
    if not how:
        return matched
    target = tokenizer_parameters(native)["encoder"]
    e = matched.encoder

    @functools.cache  # the bisection and the final choice ask for some sizes twice
    def count(size: int) -> int:
        trial = ml_collections.ConfigDict(matched.to_dict())
        trial.encoder[how] = size
        return tokenizer_parameters(trial)["encoder"]

    start = e[how]
    step = 1 if how == "depth" else e.num_heads
    # Far enough: the count grows at least linearly in either size.
    stop = start * max(2, math.ceil(target / max(count(start), 1)) + 1)
    e[how] = _closest(list(range(start, stop + 1, step)), count, target)
    return matched
