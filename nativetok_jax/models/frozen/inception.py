"""The InceptionV3 that FID and the Inception Score are measured with.

This is the network of TensorFlow's ``inception-2015-12-05`` graph as the FID tools run it
(``fid_inception_v3`` of pytorch-fid, torch-fidelity's ``inception-v3-compat``), which differs
from torchvision's ImageNet InceptionV3 in four places that change the numbers:

* the 3x3 average pools inside the mixed blocks leave the zero padding out of the mean
  (``count_include_pad=False``), as TensorFlow's pooling does;
* the pool branch of the last block (``Mixed_7c``) takes a 3x3 *max* pool, a quirk of that graph;
* the classifier has 1008 outputs (the graph's label set), not 1000;
* there is no auxiliary classifier.

Every convolution has no bias and is followed by an inference-mode batch norm (epsilon 1e-3) and
a ReLU. Attribute names are those of the PyTorch ports (``Conv2d_1a_3x3``, ``Mixed_5b``,
``branch1x1``, ...), so the converted weights keep their published names. Freshly built, the
weights are random: load converted ones with :func:`nativetok_jax.pretrained.inception.load_inception`.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nativetok_jax.layers.conv import Conv
from nativetok_jax.layers.dense import Dense
from nativetok_jax.layers.partitioning import param

IMAGE_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BATCH_NORM_EPSILON = 1e-3
_CHANNELS = ("conv_out",)


class InceptionOutputs(NamedTuple):
    """Per image: ``features`` [B, 2048], the average-pooled last block ("pool3", what FID uses);
    ``logits`` [B, 1008], the classifier with its bias (PyTorch's ``fc``); ``logits_unbiased``
    [B, 1008], ``features @ fc.kernel`` without the bias, which is what the Inception Score is
    computed from (see :func:`nativetok_jax.evaluation.fid.inception_score`)."""

    features: jax.Array
    logits: jax.Array
    logits_unbiased: jax.Array


# How images enter the network: pytorch-fid's (half-pixel bilinear, x / 127.5 - 1) or the TF FID
# graph's that ADM's evaluator (and so its reference batches' statistics) used.
INPUT_CONVENTIONS = ("pytorch_fid", "tensorflow")


def _bilinear_matrix(in_size: int, out_size: int, half_pixel: bool = True) -> np.ndarray:
    """``[out, in]`` weights of PyTorch's bilinear resize with ``align_corners=False``, no antialias.

    Each output pixel centre maps back to ``(o + 0.5) * in / out - 0.5``, clamped at 0; it mixes
    the two nearest input pixels (the last one alone at the far edge), so downscaling samples
    rather than averages, exactly as ``F.interpolate`` does. ``half_pixel=False``: TensorFlow 1's
    ``ResizeBilinear`` (``align_corners=False, half_pixel_centers=False``), where output ``o`` maps
    to ``o * in / out``: the resize inside the TF FID graph that ADM's evaluator runs.
    """
    scale = in_size / out_size
    if half_pixel:
        source = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    else:  # in float32, as TensorFlow's kernel computes it (float64 positions differ by 1e-5 of a pixel)
        source = (np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)).astype(np.float64)
    lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = source - lower
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.arange(out_size), lower), 1.0 - frac)
    np.add.at(matrix, (np.arange(out_size), upper), frac)
    return matrix.astype(np.float32)


def resize_bilinear(images: jax.Array, height: int, width: int, half_pixel: bool = True) -> jax.Array:
    """NHWC ``images`` -> ``[B, height, width, C]`` float32, as PyTorch's
    ``F.interpolate(mode="bilinear", align_corners=False)`` (no antialias), which pytorch-fid uses;
    with ``half_pixel=False`` as TensorFlow 1's ``tf.image.resize_bilinear`` (ADM's evaluator).

    ``jax.image.resize`` antialiases when it shrinks, so it would not give the same features.
    """
    images = images.astype(jnp.float32)
    rows = jnp.asarray(_bilinear_matrix(images.shape[1], height, half_pixel))
    cols = jnp.asarray(_bilinear_matrix(images.shape[2], width, half_pixel))
    highest = jax.lax.Precision.HIGHEST
    out = jnp.einsum("oh,bhwc->bowc", rows, images, precision=highest)
    return jnp.einsum("pw,bowc->bopc", cols, out, precision=highest)


def _pad_spatial(padding: int) -> tuple[tuple[int, int], ...]:
    return ((0, 0), (padding, padding), (padding, padding), (0, 0))


def _max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    """3x3 max pool; padding counts as -inf, so it never wins (PyTorch's ``max_pool2d``)."""
    return jax.lax.reduce_window(
        x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
        _pad_spatial(padding),
    )


def _avg_pool_excluding_padding(x: jax.Array) -> jax.Array:
    """3x3, stride 1, padding 1 average pool whose border means cover only real pixels."""
    window, strides, pads = (1, 3, 3, 1), (1, 1, 1, 1), _pad_spatial(1)
    zero = jnp.array(0, x.dtype)
    sums = jax.lax.reduce_window(x, zero, jax.lax.add, window, strides, pads)
    counts = jax.lax.reduce_window(
        jnp.ones((1, *x.shape[1:3], 1), x.dtype), zero, jax.lax.add, window, strides, pads
    )
    return sums / counts


class FrozenBatchNorm(nnx.Module):
    """Batch norm with stored statistics only: ``(x - mean) / sqrt(var + eps) * scale + bias``.

    The FID network is never trained here, so there is no batch-statistics mode to get wrong;
    ``mean`` and ``var`` are ``BatchStat`` variables (not trainable), computed in float32.
    """

    def __init__(self, width: int, *, rngs: nnx.Rngs, epsilon: float = BATCH_NORM_EPSILON):
        self.scale = param(rngs, nnx.initializers.ones, (width,), _CHANNELS)
        self.bias = param(rngs, nnx.initializers.zeros, (width,), _CHANNELS)
        self.mean = nnx.BatchStat(jnp.zeros((width,), jnp.float32), eager_sharding=False,
                                  out_sharding=_CHANNELS)
        self.var = nnx.BatchStat(jnp.ones((width,), jnp.float32), eager_sharding=False,
                                 out_sharding=_CHANNELS)
        self.epsilon = epsilon

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        y = (x - self.mean[...]) * jax.lax.rsqrt(self.var[...] + self.epsilon)
        return (y * self.scale[...] + self.bias[...]).astype(dtype)


class ConvBN(nnx.Module):
    """Convolution without bias, frozen batch norm, ReLU (PyTorch ports: ``BasicConv2d``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | tuple[int, int],
        *,
        rngs: nnx.Rngs,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        dtype: jnp.dtype = jnp.float32,
    ):
        pad_h, pad_w = (padding, padding) if isinstance(padding, int) else padding
        self.conv = Conv(
            in_features, out_features, kernel_size, rngs=rngs, stride=stride,
            padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False, dtype=dtype,
        )
        self.bn = FrozenBatchNorm(out_features, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches (``Mixed_5b`` .. ``Mixed_5d``)."""

    def __init__(self, in_features: int, pool_features: int, *, rngs: nnx.Rngs, dtype: jnp.dtype):
        kw = dict(rngs=rngs, dtype=dtype)
        self.branch1x1 = ConvBN(in_features, 64, 1, **kw)
        self.branch5x5_1 = ConvBN(in_features, 48, 1, **kw)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2, **kw)
        self.branch3x3dbl_1 = ConvBN(in_features, 64, 1, **kw)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1, **kw)
        self.branch_pool = ConvBN(in_features, pool_features, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_excluding_padding(x)),
        ], axis=-1)


class InceptionB(nnx.Module):
    """35x35 -> 17x17 reduction (``Mixed_6a``)."""

    def __init__(self, in_features: int, *, rngs: nnx.Rngs, dtype: jnp.dtype):
        kw = dict(rngs=rngs, dtype=dtype)
        self.branch3x3 = ConvBN(in_features, 384, 3, stride=2, **kw)
        self.branch3x3dbl_1 = ConvBN(in_features, 64, 1, **kw)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            _max_pool(x, stride=2),
        ], axis=-1)


class InceptionC(nnx.Module):
    """17x17 block with factorised 7x7 convolutions (``Mixed_6b`` .. ``Mixed_6e``)."""

    def __init__(self, in_features: int, channels_7x7: int, *, rngs: nnx.Rngs, dtype: jnp.dtype):
        kw = dict(rngs=rngs, dtype=dtype)
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_features, 192, 1, **kw)
        self.branch7x7_1 = ConvBN(in_features, c7, 1, **kw)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_1 = ConvBN(in_features, c7, 1, **kw)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3), **kw)
        self.branch_pool = ConvBN(in_features, 192, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(_avg_pool_excluding_padding(x)),
        ], axis=-1)


class InceptionD(nnx.Module):
    """17x17 -> 8x8 reduction (``Mixed_7a``)."""

    def __init__(self, in_features: int, *, rngs: nnx.Rngs, dtype: jnp.dtype):
        kw = dict(rngs=rngs, dtype=dtype)
        self.branch3x3_1 = ConvBN(in_features, 192, 1, **kw)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2, **kw)
        self.branch7x7x3_1 = ConvBN(in_features, 192, 1, **kw)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3), **kw)
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        seven = self.branch7x7x3_2(self.branch7x7x3_1(x))
        seven = self.branch7x7x3_4(self.branch7x7x3_3(seven))
        return jnp.concatenate([
            self.branch3x3_2(self.branch3x3_1(x)),
            seven,
            _max_pool(x, stride=2),
        ], axis=-1)


class InceptionE(nnx.Module):
    """8x8 block with split 1x3/3x1 outputs (``Mixed_7b``; ``Mixed_7c`` with ``max_pool=True``)."""

    def __init__(self, in_features: int, *, max_pool: bool, rngs: nnx.Rngs, dtype: jnp.dtype):
        kw = dict(rngs=rngs, dtype=dtype)
        self.branch1x1 = ConvBN(in_features, 320, 1, **kw)
        self.branch3x3_1 = ConvBN(in_features, 384, 1, **kw)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch3x3dbl_1 = ConvBN(in_features, 448, 1, **kw)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1, **kw)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch_pool = ConvBN(in_features, 192, 1, **kw)
        self.max_pool = max_pool

    def __call__(self, x: jax.Array) -> jax.Array:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _max_pool(x, stride=1, padding=1) if self.max_pool else _avg_pool_excluding_padding(x)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(single),
            self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double),
            self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ], axis=-1)


class InceptionV3(nnx.Module):
    """``InceptionV3(rngs=...)(images)`` -> :class:`InceptionOutputs` for NHWC images in [0, 1].

    Images are resized to ``image_size`` x ``image_size`` (299, as the FID tools do; bilinear
    without antialias, see :func:`resize_bilinear`) and scaled to [-1, 1], as pytorch-fid does
    (``input_convention="pytorch_fid"``), or as the TensorFlow graph of ADM's evaluator does
    (``"tensorflow"``: TF1's resize of the 0..255 values, then ``(x - 128) / 128``); statistics
    are only comparable between features of one convention. ``image_size=None``
    skips the resize; the network then takes any size from 75 x 75 up. Convolutions run in
    ``dtype`` at full float32 matmul precision when it is float32 (TPU and GPU would otherwise
    round to bfloat16/TF32 and shift FID); batch norm, pooling to features and the classifier run
    in float32.
    """

    def __init__(self, *, rngs: nnx.Rngs, image_size: int | None = IMAGE_SIZE,
                 dtype: jnp.dtype = jnp.float32, input_convention: str = "pytorch_fid"):
        if input_convention not in INPUT_CONVENTIONS:
            raise ValueError(f"input_convention: one of {INPUT_CONVENTIONS}, got {input_convention!r}")
        self.input_convention = input_convention
        kw = dict(rngs=rngs, dtype=dtype)
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3, **kw)
        self.Mixed_5b = InceptionA(192, 32, **kw)
        self.Mixed_5c = InceptionA(256, 64, **kw)
        self.Mixed_5d = InceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, 128, **kw)
        self.Mixed_6c = InceptionC(768, 160, **kw)
        self.Mixed_6d = InceptionC(768, 160, **kw)
        self.Mixed_6e = InceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, max_pool=False, **kw)
        self.Mixed_7c = InceptionE(2048, max_pool=True, **kw)
        self.fc = Dense(FEATURE_DIM, NUM_CLASSES, axes=(None, None), rngs=rngs)
        self.image_size = image_size
        self.dtype = dtype

    def __call__(self, images: jax.Array) -> InceptionOutputs:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"InceptionV3 takes NHWC RGB images [B, H, W, 3], got shape {images.shape}")
        x = images.astype(jnp.float32)
        tensorflow = self.input_convention == "tensorflow"
        if self.image_size is not None and x.shape[1:3] != (self.image_size, self.image_size):
            x = resize_bilinear(x, self.image_size, self.image_size, half_pixel=not tensorflow)
        x = (255.0 * x - 128.0) / 128.0 if tensorflow else 2.0 * x - 1.0
        full_precision = jnp.dtype(self.dtype) == jnp.float32
        with jax.default_matmul_precision("highest") if full_precision else contextlib.nullcontext():
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = _max_pool(x, stride=2)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
            x = _max_pool(x, stride=2)
            for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                          self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                          self.Mixed_7c):
                x = block(x)
            features = x.astype(jnp.float32).mean(axis=(1, 2))
            logits_unbiased = jnp.dot(features, self.fc.kernel[...],
                                      precision=jax.lax.Precision.HIGHEST)
        return InceptionOutputs(features, logits_unbiased + self.fc.bias[...], logits_unbiased)
