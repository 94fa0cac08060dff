"""The order-free baseline encoder: TiTok's 1D tokenizer (Yu et al., NeurIPS 2024).

``L`` learned latent tokens join the class token and the patches inside one bidirectional ViT;
their outputs are the tokens. Every token sees the whole image and every other token, so the
sequence has no built-in order: the comparison NativeTok's claim is measured against.

``latent_causal_mask=True`` is the NativeTok paper's "plain causal mask in an ordinary encoder"
ablation (Sec. 4, docs/nativetok.md "Generators and the claim they test"): latent token ``i`` attends to the class token,
every patch and the latent tokens ``<= i``; the class token and the patches attend to each other
only, never to a latent token. (Were the patches to see the latents, latent ``j > i`` would reach
token ``i`` through a patch row one layer later, and the order would not be causal.) The
parameters are exactly the order-free encoder's: the mask is the only difference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nativetok_jax.layers.norm import LayerNorm
from nativetok_jax.layers.partitioning import constrain, param
from nativetok_jax.layers.transformer import BlockStack
from nativetok_jax.models.nativetok.embeddings import POSITION_INIT, PatchEmbedding

# TiTok's ViT sizes (width, depth, heads) and its released tokenizers (bytedance/1d-tokenizer,
# configs/infer/TiTok/titok_{l32,b64,s128}.yaml): encoder and decoder of one size, the token count.
TITOK_VIT_SIZES = {"S": (512, 8, 8), "B": (768, 12, 12), "L": (1024, 24, 16)}
TITOK_RELEASES = {"L-32": ("L", 32), "B-64": ("B", 64), "S-128": ("S", 128)}


def latent_causal_attention_mask(num_context: int, num_tokens: int) -> np.ndarray:
    """Boolean ``[C + L, C + L]`` (query row, key row) mask for ``C`` context rows (class token and
    patches) followed by ``L`` latent tokens: context rows see the context only; latent ``i`` sees
    the context and latents ``0..i``."""
    size = num_context + num_tokens
    mask = np.zeros((size, size), bool)
    mask[:, :num_context] = True
    mask[num_context:, num_context:] = np.tril(np.ones((num_tokens, num_tokens), bool))
    return mask


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
        latent_causal_mask: bool = False,
        norm_epsilon: float = 1e-6,
        attention_logits: str = "float32",
    ):
        self.embedding = PatchEmbedding(image_size, patch_size, width, rngs=rngs, dtype=dtype)
        # TiTok's released encoders add a learned position to each latent token; that sum is one
        # parameter here (the converter adds them).
        self.latent_tokens = param(rngs, POSITION_INIT, (num_tokens, width), ("position", "embed"))
        self.input_norm = LayerNorm(width, rngs=rngs, epsilon=norm_epsilon)
        self.blocks = BlockStack(width, depth, num_heads, mlp_ratio, rngs=rngs, dtype=dtype, remat=remat, unroll=unroll,
                                 norm_epsilon=norm_epsilon, attention_logits=attention_logits)
        self.num_tokens = num_tokens
        self.latent_causal_mask = latent_causal_mask

    def __call__(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` in [-1, 1] -> latent-token outputs ``[B, L, width]``."""
        x = self.embedding(images)
        mask = None
        if self.latent_causal_mask:  # a compile-time constant: XLA folds it into the attention
            mask = jnp.asarray(latent_causal_attention_mask(x.shape[1], self.num_tokens))
        latents = jnp.broadcast_to(self.latent_tokens[...].astype(x.dtype), (x.shape[0],) + self.latent_tokens.shape)
        x = constrain(jnp.concatenate([x, latents], axis=1), ("batch", "length", "embed"))
        x = self.blocks(self.input_norm(x), attention_mask=mask)
        return x[:, -self.num_tokens :]
