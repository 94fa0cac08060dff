"""Multi-head attention through ``jax.nn.dot_product_attention``.

The fused call lets GPUs use the cuDNN kernel and TPUs XLA's. ``num_queries`` computes only the
last rows' outputs while keys and values still come from every row: the causal experts need
just their query row in their last layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.layers.partitioning import constrain, param

# LeCun-normal over the right fan-in: the model width for q/k/v, heads x head_dim for the output.
PROJECTION_INIT = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
OUTPUT_INIT = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)


class Attention(nnx.Module):
    def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        head_dim = width // num_heads
        in_axes = ("embed", "heads", "head_dim")
        self.query = param(rngs, PROJECTION_INIT, (width, num_heads, head_dim), in_axes)
        self.key = param(rngs, PROJECTION_INIT, (width, num_heads, head_dim), in_axes)
        self.value = param(rngs, PROJECTION_INIT, (width, num_heads, head_dim), in_axes)
        self.query_bias = param(rngs, nnx.initializers.zeros, (num_heads, head_dim), in_axes[1:])
        self.key_bias = param(rngs, nnx.initializers.zeros, (num_heads, head_dim), in_axes[1:])
        self.value_bias = param(rngs, nnx.initializers.zeros, (num_heads, head_dim), in_axes[1:])
        self.out = param(rngs, OUTPUT_INIT, (num_heads, head_dim, width), ("heads", "head_dim", "embed"))
        self.out_bias = param(rngs, nnx.initializers.zeros, (width,), ("embed",))
        self.dtype = dtype

    def _project(self, x: jax.Array, kernel: nnx.Param, bias: nnx.Param) -> jax.Array:
        y = jnp.einsum("btd,dhk->bthk", x, kernel[...].astype(self.dtype))
        y = y + bias[...].astype(self.dtype)
        return constrain(y, ("batch", "length", "heads", "head_dim"))

    def __call__(
        self,
        x: jax.Array,
        *,
        key_mask: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        num_queries: int | None = None,
    ) -> jax.Array:
        """Attends from ``x`` (or its last ``num_queries`` rows) to the rows ``key_mask`` allows.

        Args:
          x: ``[batch, length, width]``.
          key_mask: boolean ``[length]`` or ``[batch, length]``; False rows are never attended to.
          attention_mask: boolean ``[length, length]`` (query row, key row), the same for every
            example and head; False pairs are never attended. Combined with ``key_mask``.
          num_queries: if set, only the last ``num_queries`` rows are computed.
        """
        x = x.astype(self.dtype)
        queries = x if num_queries is None else x[:, -num_queries:]
        q = self._project(queries, self.query, self.query_bias)
        k = self._project(x, self.key, self.key_bias)
        v = self._project(x, self.value, self.value_bias)
        mask = None if key_mask is None else key_mask.reshape(-1, 1, 1, key_mask.shape[-1])  # [B|1, 1, 1, T]
        if attention_mask is not None:
            pairs = attention_mask[-queries.shape[1] :][None, None]  # [1, 1, Tq, T]: the computed rows'
            mask = pairs if mask is None else mask & pairs
        y = jax.nn.dot_product_attention(q, k, v, mask=mask)
        y = jnp.einsum("bthk,hkd->btd", y, self.out[...].astype(self.dtype))
        return y + self.out_bias[...].astype(self.dtype)
