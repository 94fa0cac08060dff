"""A dense layer whose kernel and bias carry logical axis names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.layers.partitioning import LogicalAxes, param

KERNEL_INIT = nnx.initializers.lecun_normal()


class Dense(nnx.Module):
    """``y = x @ kernel + bias``, computed in ``dtype`` with float32 parameters."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: LogicalAxes,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        kernel_init=KERNEL_INIT,
    ):
        self.kernel = param(rngs, kernel_init, (in_features, out_features), axes)
        self.bias = param(rngs, nnx.initializers.zeros, (out_features,), axes[1:])
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        return x @ self.kernel[...].astype(self.dtype) + self.bias[...].astype(self.dtype)
