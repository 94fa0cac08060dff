"""TiTok-style ViT decoder (docs/nativetok.md "The tokenizer" 4).

The sequence is ``[class ; one mask token per output patch ; L projected tokens]`` with learned
positions and full attention; the patch rows are read out by one of two heads (``head_hidden > 0``
puts a ``Linear -> tanh`` of that width in front of either: TiTok's released decoders' ``ffn``):

- ``pixel``: a linear map to ``p*p*3`` values per patch, un-patchified to an image in [-1, 1];
- ``proxy_codes``: logits over an external VQGAN codebook per grid cell (TiTok's stage-1 target),
  turned into pixels by that VQGAN's decoder.

Tokens at positions ``>= num_visible`` are replaced by a learned ``hidden_token`` embedding, so
decoding from the first ``k`` tokens (a coarse-to-fine preview of causal tokens) is a regular
forward pass, for any ``1 <= k <= L`` and even a different ``k`` per example.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.layers.dense import Dense
from nativetok_jax.layers.norm import LayerNorm
from nativetok_jax.layers.partitioning import constrain, param
from nativetok_jax.layers.patches import unpatchify
from nativetok_jax.layers.transformer import BlockStack
from nativetok_jax.models.nativetok.embeddings import POSITION_INIT


class TokenDecoder(nnx.Module):
    def __init__(
        self,
        *,
        num_tokens: int,
        token_dim: int,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        head: str,
        proxy_codebook_size: int,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        remat: bool = False,
        unroll: bool = False,
        head_hidden: int = 0,
        norm_epsilon: float = 1e-6,
        attention_logits: str = "float32",
    ):
        self.grid = image_size // patch_size
        self.patch_size = patch_size
        self.head_kind = head
        self.token_embedding = Dense(token_dim, width, axes=("token_dim", "embed"), rngs=rngs, dtype=dtype)
        self.token_position = param(rngs, POSITION_INIT, (num_tokens, width), ("position", "embed"))
        self.hidden_token = param(rngs, POSITION_INIT, (width,), ("embed",))
        self.class_token = param(rngs, POSITION_INIT, (width,), ("embed",))
        self.patch_token = param(rngs, POSITION_INIT, (width,), ("embed",))
        self.grid_position = param(rngs, POSITION_INIT, (self.grid**2 + 1, width), ("position", "embed"))
        self.input_norm = LayerNorm(width, rngs=rngs, epsilon=norm_epsilon)
        self.blocks = BlockStack(width, depth, num_heads, mlp_ratio, rngs=rngs, dtype=dtype, remat=remat, unroll=unroll,
                                 norm_epsilon=norm_epsilon, attention_logits=attention_logits)
        self.output_norm = LayerNorm(width, rngs=rngs, epsilon=norm_epsilon)
        out = patch_size * patch_size * 3 if head == "pixel" else proxy_codebook_size
        self.head_hidden = (Dense(width, head_hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
                            if head_hidden else None)
        self.head = Dense(head_hidden or width, out, axes=("mlp" if head_hidden else "embed", "vocab"), rngs=rngs,
                          dtype=dtype)
        self.dtype = dtype

    def __call__(self, tokens: jax.Array, num_visible: int | jax.Array | None = None) -> jax.Array:
        """Decodes quantised tokens ``[B, L, token_dim]``.

        Args:
          tokens: the quantised (unit-norm) tokens.
          num_visible: keep only the first ``num_visible`` tokens (an int, or ``[B]`` ints);
            ``None`` keeps all.

        Returns:
          pixel head: ``[B, H, W, 3]`` in [-1, 1] (unclipped); proxy head: logits
          ``[B, H/p, W/p, proxy_codebook_size]``.
        """
        return self.readout(self.features(tokens, num_visible))

    def features(self, tokens: jax.Array, num_visible: int | jax.Array | None = None) -> jax.Array:
        """The normalised patch rows ``[B, (H/p)^2, width]`` that the head reads out."""
        batch, num_tokens = tokens.shape[:2]
        x = self.token_embedding(tokens)
        if num_visible is not None:
            visible = jnp.arange(num_tokens)[None, :] < jnp.reshape(jnp.asarray(num_visible), (-1, 1))
            x = jnp.where(visible[..., None], x, self.hidden_token[...].astype(x.dtype))
        x = x + self.token_position[...].astype(x.dtype)
        grid = jnp.concatenate(
            [self.class_token[...][None], jnp.broadcast_to(self.patch_token[...], (self.grid**2, x.shape[-1]))]
        )
        grid = jnp.broadcast_to((grid + self.grid_position[...]).astype(x.dtype), (batch,) + grid.shape)
        x = constrain(jnp.concatenate([grid, x], axis=1), ("batch", "length", "embed"))
        x = self.output_norm(self.blocks(self.input_norm(x)))
        return x[:, 1 : 1 + self.grid**2]

    def readout(self, features: jax.Array, head_kernel: jax.Array | None = None) -> jax.Array:
        """The head on :meth:`features`; ``head_kernel`` replaces the head's weight (the adaptive
        GAN weight differentiates the losses with respect to it)."""
        kernel = self.head.kernel[...] if head_kernel is None else head_kernel
        if self.head_hidden is not None:
            features = jnp.tanh(self.head_hidden(features.astype(self.dtype)))
        out = features.astype(self.dtype) @ kernel.astype(self.dtype) + self.head.bias[...].astype(self.dtype)
        out = out.astype(jnp.float32)
        if self.head_kind == "pixel":
            return unpatchify(out, self.patch_size, self.grid)
        return out.reshape(features.shape[0], self.grid, self.grid, -1)
