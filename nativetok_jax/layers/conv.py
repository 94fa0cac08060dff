"""A 2-D convolution over NHWC images whose kernel and bias carry logical axis names.

Kernels are stored HWIO (height, width, input channels, output channels), the layout of
``jax.lax.conv_general_dilated`` with ``("NHWC", "HWIO", "NHWC")``; converters from PyTorch's
OIHW transpose once, at conversion time.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.layers.partitioning import LogicalAxes, param

Padding = str | int | Sequence[tuple[int, int]]

KERNEL_INIT = nnx.initializers.lecun_normal()


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class Conv(nnx.Module):
    """``y = conv(x, kernel) + bias`` on NHWC inputs, computed in ``dtype``, float32 parameters.

    ``padding`` is ``"SAME"``, ``"VALID"``, an int (symmetric, as PyTorch's ``padding=``) or
    explicit ``((top, bottom), (left, right))`` pairs.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        *,
        rngs: nnx.Rngs,
        stride: int | Sequence[int] = 1,
        padding: Padding = "SAME",
        use_bias: bool = True,
        dtype: jnp.dtype = jnp.float32,
        kernel_init=KERNEL_INIT,
        axes: LogicalAxes = (None, None, None, "conv_out"),
    ):
        kh, kw = _pair(kernel_size)
        self.kernel = param(rngs, kernel_init, (kh, kw, in_features, out_features), axes)
        self.bias = (
            param(rngs, nnx.initializers.zeros, (out_features,), axes[-1:]) if use_bias else None
        )
        self.stride = _pair(stride)
        if isinstance(padding, int):
            padding = ((padding, padding), (padding, padding))
        self.padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=self.stride,
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y
