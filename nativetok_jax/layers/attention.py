"""Multi-head attention through ``jax.nn.dot_product_attention``.

The fused call lets GPUs use the cuDNN kernel and TPUs XLA's. The query, key and value projections
are one matrix product (their kernels side by side; the parameters stay three arrays). ``num_queries``
computes only the last rows' outputs while keys and values still come from every row: the causal
experts need just their query row in their last layer; ``prefix`` takes the projections of leading
rows computed elsewhere (the experts' context rows, projected outside their scan).
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

    def _project(self, x: jax.Array, names: tuple[str, ...]) -> tuple[jax.Array, ...]:
        """The projections ``names`` (of ``query``, ``key``, ``value``) of ``x`` ``[B, T, width]``, as
        one matrix product with the kernels side by side (fewer and larger products than one each).

        Returns one ``[B, T, heads, head_dim]`` array per name.
        """
        kernel = jnp.stack([getattr(self, n)[...] for n in names], axis=1).astype(self.dtype)  # [D, n, H, K]
        bias = jnp.stack([getattr(self, f"{n}_bias")[...] for n in names]).astype(self.dtype)  # [n, H, K]
        y = jnp.einsum("btd,dnhk->btnhk", x, kernel) + bias
        return tuple(constrain(y[:, :, i], ("batch", "length", "heads", "head_dim")) for i in range(len(names)))

    def projections(self, x: jax.Array, num_queries: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(q, k, v)``, each ``[B, T, heads, head_dim]`` (``q`` of the last ``num_queries`` rows only
        when set), for ``x`` ``[B, T, width]`` (already normalised)."""
        x = x.astype(self.dtype)
        if num_queries is None:
            return self._project(x, ("query", "key", "value"))
        (q,) = self._project(x[:, -num_queries:], ("query",))
        return (q, *self._project(x, ("key", "value")))

    def __call__(
        self,
        x: jax.Array,
        *,
        key_mask: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        num_queries: int | None = None,
        prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        """Attends from ``x`` (or its last ``num_queries`` rows) to the rows ``key_mask`` allows.

        Args:
          x: ``[batch, length, width]``.
          key_mask: boolean ``[length]`` or ``[batch, length]``; False rows are never attended to.
          attention_mask: boolean ``[length, length]`` (query row, key row), the same for every
            example and head; False pairs are never attended. Combined with ``key_mask``.
          num_queries: if set, only the last ``num_queries`` rows are computed.
          prefix: ``projections`` of rows that come before ``x``'s, computed elsewhere (the causal
            experts project their slot-independent context rows outside their scan): the sequence
            is then those rows and ``x``'s, and ``length`` in the masks counts both.
        """
        q, k, v = self.projections(x, num_queries)
        if prefix is not None:
            if num_queries is None:
                q = jnp.concatenate([prefix[0].astype(q.dtype), q], axis=1)
            k = jnp.concatenate([prefix[1].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([prefix[2].astype(v.dtype), v], axis=1)
        mask = None if key_mask is None else key_mask.reshape(-1, 1, 1, key_mask.shape[-1])  # [B|1, 1, 1, T]
        if attention_mask is not None:
            pairs = attention_mask[-q.shape[1] :][None, None]  # [1, 1, Tq, T]: the computed rows'
            mask = pairs if mask is None else mask & pairs
        y = jax.nn.dot_product_attention(q, k, v, mask=mask)
        y = jnp.einsum("bthk,hkd->btd", y, self.out[...].astype(self.dtype))
        return y + self.out_bias[...].astype(self.dtype)
