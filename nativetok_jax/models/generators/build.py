"""The second-stage generators, built from ``config.generator`` and the tokenizer they model."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from nativetok_jax.layers.remat import remat_of
from nativetok_jax.models.generators.gpt import GPT
from nativetok_jax.models.generators.masked_generator import MaskedTokenTransformer

Generator = GPT | MaskedTokenTransformer


def build_generator(
    generator: ml_collections.ConfigDict, *, vocab_size: int, num_tokens: int, num_classes: int,
    rngs: nnx.Rngs, dtype: str = "float32",
) -> Generator:
    """A GPT (``kind="ar"``; LlamaGen's SwiGLU width, 4 x width x 2/3 rounded to 256) or a MaskGIT
    transformer (``"maskgit"``; ``mlp_ratio`` x width) over ``vocab_size`` ids."""
    common = dict(vocab_size=vocab_size, num_tokens=num_tokens, num_classes=num_classes, width=generator.width,
                  depth=generator.depth, num_heads=generator.num_heads, dtype=jnp.dtype(dtype),
                  remat=remat_of(generator), rngs=rngs)
    if generator.kind == "ar":
        return GPT(**common)
    return MaskedTokenTransformer(mlp_ratio=generator.mlp_ratio, **common)
