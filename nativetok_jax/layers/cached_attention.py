"""Causal self-attention with rotary positions and a fixed-size key/value cache.

Teacher forcing (``__call__``) attends causally over the whole sequence through
``jax.nn.dot_product_attention`` (cuDNN / TPU kernels). Decoding (``decode``) computes only the
new rows: they attend to the cache's slots before their position and, causally, to each other;
the cache is only read, and its owner writes the new keys and values with
``lax.dynamic_update_slice`` (:meth:`KVCache.insert`). The cache never changes shape, so a
sampling loop compiles once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.layers.partitioning import constrain, param
from nativetok_jax.layers.rotary import apply_rotary

PROJECTION_INIT = nnx.initializers.normal(stddev=0.02)
HEAD_AXES = ("batch", "length", "heads", "head_dim")


class KVCache(NamedTuple):
    """Keys and values ``[..., batch, max_length, heads, head_dim]``; a stack has a leading ``layers`` axis."""

    key: jax.Array
    value: jax.Array

    @classmethod
    def zeros(cls, shape: tuple[int, ...], dtype: jnp.dtype) -> KVCache:
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def max_length(self) -> int:
        return self.key.shape[-3]

    def insert(self, rows: KVCache, start: jax.Array | int) -> KVCache:
        """Writes ``rows`` (same leading axes, fewer slots) into the slots from ``start`` on."""

        def write(cache: jax.Array, new: jax.Array) -> jax.Array:
            index = [0] * cache.ndim
            index[-3] = start
            return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), tuple(index))

        return KVCache(write(self.key, rows.key), write(self.value, rows.value))


class CachedSelfAttention(nnx.Module):
    """Multi-head causal self-attention with RoPE on queries and keys and no biases (as LLaMA)."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        rope_base: float = 10000.0,
    ):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        head_dim = width // num_heads
        in_axes = ("embed", "heads", "head_dim")
        self.query = param(rngs, PROJECTION_INIT, (width, num_heads, head_dim), in_axes)
        self.key = param(rngs, PROJECTION_INIT, (width, num_heads, head_dim), in_axes)
        self.value = param(rngs, PROJECTION_INIT, (width, num_heads, head_dim), in_axes)
        self.out = param(rngs, PROJECTION_INIT, (num_heads, head_dim, width), ("heads", "head_dim", "embed"))
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.rope_base = rope_base

    def _project(self, x: jax.Array, kernel: nnx.Param) -> jax.Array:
        return constrain(jnp.einsum("btd,dhk->bthk", x, kernel[...].astype(self.dtype)), HEAD_AXES)

    def _rows(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, KVCache]:
        """Rotated queries and the (rotated keys, values) of the rows ``x`` at ``positions``."""
        x = x.astype(self.dtype)
        q = apply_rotary(self._project(x, self.query), positions, self.rope_base)
        k = apply_rotary(self._project(x, self.key), positions, self.rope_base)
        return q, KVCache(k, self._project(x, self.value))

    def _output(self, y: jax.Array) -> jax.Array:
        return jnp.einsum("bthk,hkd->btd", y, self.out[...].astype(self.dtype))

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """Causal attention over ``x`` ``[batch, length, width]`` whose rows sit at ``positions``."""
        q, rows = self._rows(x, positions)
        return self._output(jax.nn.dot_product_attention(q, rows.key, rows.value, is_causal=True))

    def decode(self, x: jax.Array, start: jax.Array | int, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Attends from the new rows ``x`` ``[batch, T, width]`` (positions ``start .. start+T-1``).

        Returns the output rows and the new rows' keys and values ``[batch, T, heads, head_dim]``
        for the caller to write into its cache: the cache is only read here, so a stacked cache
        is updated once per step, in place, instead of being copied layer by layer.
        """
        positions = start + jnp.arange(x.shape[1])
        q, rows = self._rows(x, positions)
        # Softmax over [cached slots before ``start`` ; the new rows, causally], in float32.
        cached_keys = cache.key.astype(self.dtype)
        scale = jnp.float32(self.head_dim**-0.5)
        cached_logits = jnp.einsum("bthk,bshk->bhts", q, cached_keys, preferred_element_type=jnp.float32)
        new_logits = jnp.einsum("bthk,bshk->bhts", q, rows.key, preferred_element_type=jnp.float32)
        visible = jnp.concatenate(
            [
                jnp.broadcast_to(jnp.arange(cache.max_length) < start, (x.shape[1], cache.max_length)),
                jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool)),
            ],
            axis=1,
        )
        logits = jnp.where(visible, jnp.concatenate([cached_logits, new_logits], axis=-1) * scale, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        y = jnp.einsum("bhts,bshk->bthk", probs[..., : cache.max_length], cache.value.astype(self.dtype))
        y = y + jnp.einsum("bhts,bshk->bthk", probs[..., cache.max_length :], rows.value)
        return self._output(y), KVCache(rows.key.astype(cache.key.dtype), rows.value.astype(cache.value.dtype))
