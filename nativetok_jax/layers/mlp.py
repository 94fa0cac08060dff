"""The transformer feed-forward block: Dense -> GELU -> Dense."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.layers.dense import KERNEL_INIT, Dense
from nativetok_jax.layers.partitioning import constrain


class Mlp(nnx.Module):
    """``approximate_gelu`` uses the tanh approximation (DiT's MLPs); ``kernel_init`` both kernels'."""

    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
                 approximate_gelu: bool = False, kernel_init=KERNEL_INIT):
        self.fc1 = Dense(width, hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dtype, kernel_init=kernel_init)
        self.fc2 = Dense(hidden, width, axes=("mlp", "embed"), rngs=rngs, dtype=dtype, kernel_init=kernel_init)
        self.approximate_gelu = approximate_gelu

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(jax.nn.gelu(self.fc1(x), approximate=self.approximate_gelu), ("batch", "length", "mlp"))
        return self.fc2(h)
