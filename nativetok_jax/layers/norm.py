"""Layer normalisation, computed in float32 whatever the activation dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.layers.partitioning import param


class LayerNorm(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs, epsilon: float = 1e-6):
        self.scale = param(rngs, nnx.initializers.ones, (width,), ("norm",))
        self.bias = param(rngs, nnx.initializers.zeros, (width,), ("norm",))
        self.epsilon = epsilon

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * self.scale[...] + self.bias[...]).astype(dtype)
