"""Drawing grain maps from D²iT's Dynamic Grain Transformer (arXiv 2504.09454, Sec. 3.2).

MaskGIT's parallel decoding (:func:`nativetok_jax.generation.masked.sample`) over the
:class:`~nativetok_jax.models.d2it.grain_transformer.GrainTransformer`'s ``gh * gw`` raster-order
tokens, reshaped to ``[B, gh, gw]`` maps for the content transformer.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx

from nativetok_jax.generation.masked import sample as masked_sample
from nativetok_jax.models.d2it.grain_transformer import GrainTransformer, check_labels


def sample_grain_maps(
    model: GrainTransformer | tuple[nnx.GraphDef, Any],
    labels: jax.Array,
    key: jax.Array,
    *,
    num_steps: int = 8,
    temperature: float = 1.0,
    guidance_scale: float = 1.0,
    choice_temperature: float = math.inf,
) -> jax.Array:
    """Grain maps ``int32 [B, gh, gw]`` (0 coarse, 1 fine) for ``labels`` int ``[B]``, by MaskGIT decoding.

    Args:
      model: the grain transformer, or its ``(graphdef, params)``.
      labels: class ids; ``model.null_class`` asks for an unconditional map. An unconditional
        model reads every label as the null class.
      key: the seed; the same key and labels give the same maps.
      num_steps, temperature, choice_temperature, guidance_scale: as
        :func:`nativetok_jax.generation.masked.sample` (guidance is off for an unconditional model);
        ``choice_temperature`` defaults to inf, a random keep order (see the grain transformer).

    Jittable with the settings static (``labels``, ``key`` and the params may be traced): label
    ranges are checked only when concrete. Raises ``ValueError`` for labels not ``[B]`` or outside
    ``[0, null_class]``, and for settings ``masked.sample`` refuses.
    """
    merged = nnx.merge(*model) if isinstance(model, tuple) else model
    check_labels(merged, labels)
    ids = masked_sample(
        model, merged.class_labels(labels), key=key, num_tokens=merged.num_tokens, num_steps=num_steps,
        temperature=temperature, choice_temperature=choice_temperature,
        guidance_scale=guidance_scale if merged.conditional else 1.0,
    )
    return ids.reshape(ids.shape[0], *merged.grain_shape)
