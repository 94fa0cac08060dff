"""Meta Image Transformer (NativeTok paper, Sec. 3.1; docs/nativetok.md "The tokenizer" 1).

A bidirectional ViT over 16x16 patches and a class token, then the "dimension switcher" that maps
its width to the expert width. Its output, ``X_latent`` of shape ``[B, 1 + N, d_e]``, is the
shared context every causal expert reads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.layers.dense import Dense
from nativetok_jax.layers.norm import LayerNorm
from nativetok_jax.layers.partitioning import constrain
from nativetok_jax.layers.transformer import BlockStack
from nativetok_jax.models.nativetok.embeddings import PatchEmbedding


class MetaImageTransformer(nnx.Module):
    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        out_width: int,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        remat: bool = False,
        unroll: bool = False,
        attention_logits: str = "float32",
    ):
        self.embedding = PatchEmbedding(image_size, patch_size, width, rngs=rngs, dtype=dtype)
        self.blocks = BlockStack(width, depth, num_heads, mlp_ratio, rngs=rngs, dtype=dtype, remat=remat, unroll=unroll,
                                 attention_logits=attention_logits)
        self.norm = LayerNorm(width, rngs=rngs)
        self.dimension_switcher = Dense(width, out_width, axes=("embed", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` in [-1, 1] -> ``X_latent`` ``[B, 1 + N, out_width]``."""
        x = constrain(self.embedding(images), ("batch", "length", "embed"))
        x = self.blocks(x)
        return constrain(self.dimension_switcher(self.norm(x)), ("batch", "length", "embed"))
