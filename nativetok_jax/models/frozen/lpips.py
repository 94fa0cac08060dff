"""LPIPS, the learned perceptual image distance of Zhang et al. 2018, "The Unreasonable
Effectiveness of Deep Features as a Perceptual Metric" (the VGG16 variant, version 0.1).

Both images are rescaled channel-wise, run through the convolutional part of VGG16, and compared
at five depths (after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3): each feature vector is
scaled to unit length over its channels, the squared differences are weighted per channel by a
learned 1x1 head (no bias), averaged over space, and the five averages are summed.

The layers match torchvision's ``vgg16().features`` (13 3x3 convolutions with padding 1, each
followed by a ReLU, and 2x2 max pools between the five blocks) and the ``lin0`` .. ``lin4`` heads
of the ``lpips`` package, so :mod:`nativetok_jax.pretrained.lpips` can convert the published
weights and reproduce the published distances. Weights are never downloaded here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.layers.conv import Conv

# Output channels of VGG16's 13 convolutions; "M" is a 2x2 max pool. The block ends (where
# LPIPS taps the features) are the convolutions just before each pool, and the last one.
VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)
TAP_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)

# The LPIPS v0.1 input scaling, which maps [-1, 1] images onto roughly ImageNet-normalised ones.
INPUT_SHIFT = (-0.030, -0.088, -0.188)
INPUT_SCALE = (0.458, 0.448, 0.450)

NORM_EPSILON = 1e-10


def _max_pool_2x2(x: jax.Array) -> jax.Array:
    """PyTorch's ``MaxPool2d(2, 2)``: odd trailing rows and columns are dropped."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _unit_channels(x: jax.Array) -> jax.Array:
    """``x / (||x||_channels + 1e-10)`` in float32; the gradient stays finite where ``x`` is all 0."""
    x = x.astype(jnp.float32)
    squared = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    positive = squared > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
    return x / (norm + NORM_EPSILON)


class LPIPS(nnx.Module):
    """``LPIPS(rngs=...)(x, y)`` -> float32 ``[B]`` distances between NHWC images in [-1, 1].

    Convolutions run in ``dtype`` (bfloat16 is fine for a training loss); the normalisation,
    heads and sum run in float32. Freshly built, the weights are random: load converted ones with
    :func:`nativetok_jax.pretrained.lpips.load_lpips`.
    """

    def __init__(self, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        convs = []
        in_channels = 3
        for entry in VGG16_LAYOUT:
            if entry == "M":
                continue
            convs.append(Conv(in_channels, entry, 3, rngs=rngs, padding=1, dtype=dtype))
            in_channels = entry
        self.convs = nnx.List(convs)
        self.heads = nnx.List(
            [Conv(c, 1, 1, rngs=rngs, padding="VALID", use_bias=False, dtype=jnp.float32)
             for c in TAP_CHANNELS]
        )
        self.dtype = dtype

    def features(self, x: jax.Array) -> list[jax.Array]:
        """The five tapped VGG16 activations of already-scaled NHWC images."""
        taps = []
        convs = iter(self.convs)
        h = x.astype(self.dtype)
        for index, entry in enumerate(VGG16_LAYOUT):
            if entry == "M":
                taps.append(h)
                h = _max_pool_2x2(h)
            else:
                h = jax.nn.relu(next(convs)(h))
            if index == len(VGG16_LAYOUT) - 1:
                taps.append(h)
        return taps

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS compares two NHWC RGB batches of one shape, got {x.shape} and {y.shape}")
        # Two passes rather than one over the concatenated batch, so a batch sharded across
        # devices stays where it is: x's and y's features are compared on the same device.
        distance = jnp.zeros((x.shape[0],), jnp.float32)
        for tap_x, tap_y, head in zip(self.features(self._scale(x)), self.features(self._scale(y)), self.heads):
            squared_difference = jnp.square(_unit_channels(tap_x) - _unit_channels(tap_y))
            distance = distance + head(squared_difference)[..., 0].mean(axis=(1, 2))
        return distance

    @staticmethod
    def _scale(images: jax.Array) -> jax.Array:
        shift = jnp.asarray(INPUT_SHIFT, jnp.float32)
        scale = jnp.asarray(INPUT_SCALE, jnp.float32)
        return (images.astype(jnp.float32) - shift) / scale
