"""The transformer feed-forward block: Dense -> GELU -> Dense."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.layers.dense import Dense
from nativetok_jax.layers.partitioning import constrain


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        self.fc1 = Dense(width, hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = Dense(hidden, width, axes=("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(jax.nn.gelu(self.fc1(x), approximate=False), ("batch", "length", "mlp"))
        return self.fc2(h)
