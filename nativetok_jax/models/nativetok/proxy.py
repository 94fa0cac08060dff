"""The proxy-code path: a frozen MaskGIT VQGAN behind the decoder's proxy-code head.

TiTok's recipe, which NativeTok follows at 256 px: the tokenizer's decoder predicts, per grid
cell, logits over the VQGAN's 1024 codes; the VQGAN's own encoder provides the target codes
(stage 1) and its decoder turns predicted codes into pixels (evaluation, and the decoder
fine-tune of stage 2). Decoding is ``argmax`` (the most likely code per cell) or ``soft`` (the
codebook rows weighted by the softmax, which is differentiable and what the fine-tune trains).
Everything here works in the model's pixel range, [-1, 1]; the VQGAN's is [0, 1].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

if TYPE_CHECKING:
    from nativetok_jax.models.frozen.vqgan import VQGAN

DECODINGS = ("argmax", "soft")


class ProxyPixelDecoder(nnx.Module):
    """Proxy-code logits ``[B, h, w, K]`` -> images ``[B, H, W, 3]`` in [-1, 1] (unclipped)."""

    def __init__(self, vqgan: VQGAN, decoding: str = "argmax"):
        if decoding not in DECODINGS:
            raise ValueError(f"proxy decoding must be one of {DECODINGS}, got {decoding!r}")
        self.vqgan = vqgan
        self.decoding = decoding

    @property
    def codebook(self) -> jax.Array:
        return self.vqgan.codebook

    def embeddings(self, logits: jax.Array) -> jax.Array:
        """The VQGAN latents ``[B, h, w, D]`` that the logits stand for."""
        if self.decoding == "argmax":
            return self.vqgan.quantized(jnp.argmax(logits, axis=-1))
        probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        return probabilities @ self.codebook.astype(jnp.float32)

    def features(self, logits: jax.Array) -> jax.Array:
        """The VQGAN decoder's activations before its last convolution."""
        return self.vqgan.decoder_features(self.embeddings(logits))

    def readout(self, features: jax.Array, last_kernel: jax.Array | None = None) -> jax.Array:
        """The VQGAN decoder's last convolution (``last_kernel`` replaces its weight), in [-1, 1]."""
        return 2.0 * self.vqgan.decoder_readout(features, last_kernel) - 1.0

    @property
    def last_kernel(self) -> jax.Array:
        return self.vqgan.last_kernel

    def __call__(self, logits: jax.Array) -> jax.Array:
        return self.readout(self.features(logits))

    def target_codes(self, images: jax.Array) -> jax.Array:
        """The VQGAN's codes ``[B, h, w]`` of images in [-1, 1]: the proxy head's targets."""
        return jax.lax.stop_gradient(self.vqgan.encode((images + 1.0) / 2.0))

    def target_embeddings(self, codes: jax.Array) -> jax.Array:
        return jax.lax.stop_gradient(self.vqgan.quantized(codes))
