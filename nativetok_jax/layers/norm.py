"""Layer, group and RMS normalisation, computed in float32 whatever the activation dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.layers.partitioning import param


class LayerNorm(nnx.Module):
    """``affine=False`` has no scale or bias (DiT's adaLN blocks modulate instead)."""

    def __init__(self, width: int, *, rngs: nnx.Rngs, epsilon: float = 1e-6, affine: bool = True):
        self.scale = param(rngs, nnx.initializers.ones, (width,), ("norm",)) if affine else None
        self.bias = param(rngs, nnx.initializers.zeros, (width,), ("norm",)) if affine else None
        self.epsilon = epsilon

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.scale is not None:
            y = y * self.scale[...] + self.bias[...]
        return y.astype(dtype)


class GroupNorm(nnx.Module):
    """Group normalisation over NHWC (or [..., C]) activations, computed in float32.

    Statistics are taken over the spatial axes and the channels of each group, as PyTorch's
    ``nn.GroupNorm`` and ``flax.linen.GroupNorm`` do, so converted weights give the same output.
    """

    def __init__(self, width: int, *, rngs: nnx.Rngs, num_groups: int = 32, epsilon: float = 1e-6):
        if width % num_groups:
            raise ValueError(f"GroupNorm: {width} channels do not split into {num_groups} groups")
        self.scale = param(rngs, nnx.initializers.ones, (width,), ("norm",))
        self.bias = param(rngs, nnx.initializers.zeros, (width,), ("norm",))
        self.num_groups = num_groups
        self.epsilon = epsilon

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        shape = x.shape
        x = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, shape[-1] // self.num_groups)
        mean = x.mean((1, 3), keepdims=True)
        var = jnp.square(x - mean).mean((1, 3), keepdims=True)
        y = ((x - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(shape)
        return (y * self.scale[...] + self.bias[...]).astype(dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square normalisation (no centring, no bias), computed in float32."""

    def __init__(self, width: int, *, rngs: nnx.Rngs, epsilon: float = 1e-5):
        self.scale = param(rngs, nnx.initializers.ones, (width,), ("norm",))
        self.epsilon = epsilon

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.epsilon)
        return (y * self.scale[...]).astype(dtype)
