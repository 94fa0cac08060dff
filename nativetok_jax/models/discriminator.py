"""The patch discriminator of the adversarial loss (VQGAN's PatchGAN; Esser et al. 2021, Isola et al. 2017).

A stack of 4x4 convolutions: one stride-2 convolution with a leaky ReLU, ``depth - 1`` more
stride-2 convolutions with normalisation and a leaky ReLU (channels doubling up to 8x the base
width), one stride-1 convolution of the same kind, and a stride-1 convolution to one logit per
overlapping image patch. Normalisation is VQGAN's batch normalisation in training mode (the
statistics of the batch it sees, all devices together; the discriminator is never run in
inference mode, so no running averages are kept), or group normalisation as an option.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.layers.conv import Conv
from nativetok_jax.layers.norm import GroupNorm
from nativetok_jax.layers.partitioning import param

NORMS = ("batch", "group")
# VQGAN initialises convolutions with N(0, 0.02) and normalisation scales with N(1, 0.02).
CONV_INIT = nnx.initializers.normal(0.02)


def _scale_init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class BatchStatisticsNorm(nnx.Module):
    """Batch normalisation with the current batch's statistics (over batch and space)."""

    def __init__(self, width: int, *, rngs: nnx.Rngs, epsilon: float = 1e-5):
        self.scale = param(rngs, _scale_init, (width,), ("norm",))
        self.bias = param(rngs, nnx.initializers.zeros, (width,), ("norm",))
        self.epsilon = epsilon

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mean = x.mean((0, 1, 2))
        var = jnp.square(x - mean).mean((0, 1, 2))
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * self.scale[...] + self.bias[...]).astype(dtype)


class PatchDiscriminator(nnx.Module):
    """Images ``[B, H, W, 3]`` in [-1, 1] -> patch logits ``[B, h, w]`` (real > 0 > fake under hinge)."""

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        width: int = 64,
        depth: int = 3,
        norm: str = "batch",
        dtype: jnp.dtype = jnp.float32,
    ):
        if norm not in NORMS:
            raise ValueError(f"discriminator norm must be one of {NORMS}, got {norm!r}")
        conv = dict(kernel_size=4, padding=1, rngs=rngs, dtype=dtype, kernel_init=CONV_INIT)
        channels = [width * min(2**i, 8) for i in range(depth + 1)]
        self.stem = Conv(3, width, stride=2, **conv)
        self.convs = nnx.List()
        self.norms = nnx.List()
        for i in range(1, depth + 1):
            stride = 2 if i < depth else 1
            self.convs.append(Conv(channels[i - 1], channels[i], stride=stride, use_bias=False, **conv))
            self.norms.append(
                BatchStatisticsNorm(channels[i], rngs=rngs) if norm == "batch"
                else GroupNorm(channels[i], rngs=rngs, num_groups=min(32, channels[i]))
            )
        self.to_logits = Conv(channels[depth], 1, stride=1, **conv)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = jax.nn.leaky_relu(self.stem(images), 0.2)
        for conv, norm in zip(self.convs, self.norms):
            x = jax.nn.leaky_relu(norm(conv(x)), 0.2)
        return self.to_logits(x)[..., 0].astype(jnp.float32)
