"""The order-free baseline encoder: TiTok's 1D tokenizer (Yu et al., NeurIPS 2024).

``L`` learned latent tokens join the class token and the patches inside one bidirectional ViT;
their outputs are the tokens. Every token sees the whole image and every other token, so the
sequence has no built-in order: the comparison NativeTok's claim is measured against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.layers.norm import LayerNorm
from nativetok_jax.layers.partitioning import constrain, param
from nativetok_jax.layers.transformer import BlockStack
from nativetok_jax.models.embeddings import POSITION_INIT, PatchEmbedding


class TiTokEncoder(nnx.Module):
    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        num_tokens: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        remat: bool = False,
        unroll: bool = False,
    ):
        self.embedding = PatchEmbedding(image_size, patch_size, width, rngs=rngs, dtype=dtype)
        self.latent_tokens = param(rngs, POSITION_INIT, (num_tokens, width), ("position", "embed"))
        self.input_norm = LayerNorm(width, rngs=rngs)
        self.blocks = BlockStack(width, depth, num_heads, mlp_ratio, rngs=rngs, dtype=dtype, remat=remat, unroll=unroll)
        self.num_tokens = num_tokens

    def __call__(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` in [-1, 1] -> latent-token outputs ``[B, L, width]``."""
        x = self.embedding(images)
        latents = jnp.broadcast_to(self.latent_tokens[...].astype(x.dtype), (x.shape[0],) + self.latent_tokens.shape)
        x = constrain(jnp.concatenate([x, latents], axis=1), ("batch", "length", "embed"))
        x = self.blocks(self.input_norm(x))
        return x[:, -self.num_tokens :]
