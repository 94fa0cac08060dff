"""The gated feed-forward block of LLaMA-style transformers: ``W2 (silu(x W1) * (x W3))``.

No biases, as in LLaMA and LlamaGen. The gate makes the block three matrices instead of two, so
LLaMA shrinks the hidden width to two thirds of ``4 * width`` to keep the parameter count of a
plain 4x MLP (:func:`llama_hidden_size`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.layers.partitioning import constrain, param

KERNEL_INIT = nnx.initializers.normal(stddev=0.02)


def llama_hidden_size(width: int, multiple_of: int = 256) -> int:
    """``int(4 * width * 2 / 3)`` rounded up to a multiple of ``multiple_of`` (2048 for 768, 2816 for 1024)."""
    hidden = int(2 * (4 * width) / 3)
    return multiple_of * -(-hidden // multiple_of)


class SwiGLU(nnx.Module):
    def __init__(
        self,
        width: int,
        hidden: int,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        kernel_init=KERNEL_INIT,
    ):
        self.gate = param(rngs, kernel_init, (width, hidden), ("embed", "mlp"))
        self.up = param(rngs, kernel_init, (width, hidden), ("embed", "mlp"))
        self.down = param(rngs, kernel_init, (hidden, width), ("mlp", "embed"))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        # Rows flattened to one axis: XLA's CPU backend runs the backward pass of a matmul with two
        # contracting axes (batch and length) several times slower than a plain 2-D one.
        shape = x.shape
        x = x.astype(self.dtype).reshape(-1, shape[-1])
        gate = x @ self.gate[...].astype(self.dtype)
        up = x @ self.up[...].astype(self.dtype)
        h = (jax.nn.silu(gate) * up).reshape(*shape[:-1], -1)
        h = constrain(h, ("batch", "length", "mlp")).reshape(-1, gate.shape[-1])
        return (h @ self.down[...].astype(self.dtype)).reshape(*shape[:-1], -1)
