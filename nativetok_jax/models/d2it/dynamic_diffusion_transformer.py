"""D²iT's Dynamic Diffusion Transformer: the grain transformer and the content transformer as one
module, so one train state, one optimiser, one EMA and one checkpoint hold both.

D²iT (arXiv 2504.09454, Sec. 3.2; docs/d2it.md "Stage 2") generates in two steps:
the Dynamic Grain Transformer draws the grain map from the class, then the Dynamic Content
Transformer draws the mixed-grain latent given the class and the map. The paper trains them as
separate networks and does not say whether together or in turn. We train both at once [C]: they
read the same data (the grain latent store's latents and grain maps), neither's input depends
on the other's output while training (the content transformer learns on the *data's* grain
maps, as it is given ground-truth maps in the paper's ablation), and one step that sums their
losses costs one data pass, one checkpoint and one resume for both. The losses are logged
apart. AdamW's per-parameter moments make the sum equivalent to two optimisers on disjoint
parameters at one learning rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections
from flax import nnx

from nativetok_jax.models.d2it.content_transformer import d2it_from_config
from nativetok_jax.models.d2it.grain_transformer import GrainTransformer, grain_transformer_from_config


class DynamicDiffusionTransformer(nnx.Module):
    """``.content``: the Dynamic Content Transformer (``content(x [B, h, w, C], t [B], labels [B],
    grains [B, h/2, w/2]) -> float32 [B, h, w, 2C]``, :mod:`nativetok_jax.models.d2it.content_transformer`);
    ``.grain``: the Dynamic Grain Transformer (a MaskGIT over grain maps,
    :mod:`nativetok_jax.models.d2it.grain_transformer`). Parameters are ``{"content": ..., "grain": ...}``."""

    def __init__(self, content: nnx.Module, grain: GrainTransformer):
        self.content = content
        self.grain = grain

    def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array, grains: jax.Array) -> jax.Array:
        """The content transformer's output (the diffusion network)."""
        return self.content(x, t, labels, grains)


def dynamic_diffusion_transformer_from_config(config: ml_collections.ConfigDict, grain_shape: Sequence[int],
                                              rngs: nnx.Rngs) -> DynamicDiffusionTransformer:
    """Both transformers of a ``task="d2it"`` config: ``config.model`` (the content transformer,
    :func:`nativetok_jax.models.d2it.content_transformer.d2it_from_config`) and ``config.grain_transformer`` for grain
    maps of ``grain_shape`` ``(gh, gw)``, conditioned on ``config.model.num_classes`` classes (the
    grain transformer is unconditional when that is 1).

    Raises ``ConfigError`` naming a field that cannot work."""
    content = d2it_from_config(config.model, rngs)
    grain = grain_transformer_from_config(config.grain_transformer, config.model.num_classes, grain_shape, rngs)
    return DynamicDiffusionTransformer(content, grain)
