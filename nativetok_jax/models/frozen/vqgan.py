"""The MaskGIT VQGAN (Chang et al. 2022): a convolutional encoder, a nearest-code quantiser and a
convolutional decoder, the image tokenizer whose codes TiTok-style proxy-code decoders predict.

The architecture is that of google-research/maskgit ``maskgit/nets/vqgan_tokenizer.py``: a VQGAN
without attention blocks, GroupNorm (32 groups, epsilon 1e-6) and swish everywhere, 2x2 average
pooling between encoder levels and nearest-neighbour 2x upsampling followed by a 3x3 convolution
between decoder levels. Images are NHWC in [0, 1]; decoded images are clipped to [0, 1] as
maskgit and its PyTorch port do before showing or scoring them. With the defaults (the released
``tokenizer_imagenet256_checkpoint``: 128 filters, 2 residual blocks per level, channel
multipliers (1, 1, 2, 2, 4), 1024 codes of 256 dimensions) a 256 x 256 image gives 16 x 16 codes.

Module names follow the PyTorch port used by TiTok and open-muse (``encoder.down.0.block.0.norm1``,
``decoder.up.4.upsample_conv``, ...) with Flax leaf names (``kernel``, ``scale``, ``bias``);
:mod:`nativetok_jax.pretrained.maskgit_vqgan` converts both that port's weights and maskgit's
own Flax checkpoint into this layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.layers.conv import Conv
from nativetok_jax.layers.norm import GroupNorm
from nativetok_jax.layers.partitioning import param


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """Sizes of a MaskGIT VQGAN; the defaults are the released ImageNet 256 x 256 tokenizer."""

    filters: int = 128
    num_res_blocks: int = 2
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4)
    embedding_dim: int = 256
    codebook_size: int = 1024
    num_groups: int = 32
    image_channels: int = 3
    norm_epsilon: float = 1e-6  # flax.linen.GroupNorm's default, which maskgit trained with

    def __post_init__(self):
        object.__setattr__(self, "channel_multipliers", tuple(int(m) for m in self.channel_multipliers))
        if not self.channel_multipliers:
            raise ValueError("VQGANConfig: channel_multipliers is empty")
        for width in self.widths:
            if width % self.num_groups:
                raise ValueError(f"VQGANConfig: width {width} does not split into {self.num_groups} groups")

    @property
    def num_levels(self) -> int:
        return len(self.channel_multipliers)

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels of each resolution level, finest first."""
        return tuple(self.filters * m for m in self.channel_multipliers)

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each side (16 for the released model)."""
        return 2 ** (self.num_levels - 1)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "channel_multipliers": list(self.channel_multipliers)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> VQGANConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"VQGANConfig: unknown fields {unknown}")
        return cls(**values)


def average_pool_2x2(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResBlock(nnx.Module):
    """``norm -> swish -> 3x3 conv`` twice, plus a shortcut.

    Where the width changes, maskgit's shortcut is a 1x1 convolution of the residual branch's
    *output*, not of the block's input (the input is then dropped); the released weights were
    trained that way, so it is kept.
    """

    def __init__(self, in_width: int, out_width: int, config: VQGANConfig, *, rngs: nnx.Rngs,
                 dtype: jnp.dtype = jnp.float32):
        norm = dict(rngs=rngs, num_groups=config.num_groups, epsilon=config.norm_epsilon)
        self.norm1 = GroupNorm(in_width, **norm)
        self.conv1 = Conv(in_width, out_width, 3, rngs=rngs, use_bias=False, dtype=dtype)
        self.norm2 = GroupNorm(out_width, **norm)
        self.conv2 = Conv(out_width, out_width, 3, rngs=rngs, use_bias=False, dtype=dtype)
        self.nin_shortcut = (
            Conv(out_width, out_width, 1, rngs=rngs, use_bias=False, dtype=dtype)
            if in_width != out_width else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(nnx.swish(self.norm1(x)))
        h = self.conv2(nnx.swish(self.norm2(h)))
        residual = x if self.nin_shortcut is None else self.nin_shortcut(h)
        return h + residual


def res_blocks(in_width: int, out_width: int, config: VQGANConfig, rngs: nnx.Rngs,
                dtype: jnp.dtype) -> nnx.List:
    widths = [in_width] + [out_width] * config.num_res_blocks
    return nnx.List([ResBlock(widths[i], out_width, config, rngs=rngs, dtype=dtype)
                     for i in range(config.num_res_blocks)])


class DownLevel(nnx.Module):
    def __init__(self, in_width: int, out_width: int, config: VQGANConfig, *, rngs: nnx.Rngs,
                 dtype: jnp.dtype = jnp.float32):
        self.block = res_blocks(in_width, out_width, config, rngs, dtype)


class UpLevel(nnx.Module):
    def __init__(self, in_width: int, out_width: int, upsample: bool, config: VQGANConfig, *,
                 rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        self.block = res_blocks(in_width, out_width, config, rngs, dtype)
        self.upsample_conv = Conv(out_width, out_width, 3, rngs=rngs, dtype=dtype) if upsample else None


class Encoder(nnx.Module):
    """Images [B, H, W, C] in [0, 1] -> features [B, H/f, W/f, D] (f = ``downsample_factor``)."""

    def __init__(self, config: VQGANConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        widths = config.widths
        norm = dict(rngs=rngs, num_groups=config.num_groups, epsilon=config.norm_epsilon)
        self.conv_in = Conv(config.image_channels, config.filters, 3, rngs=rngs, use_bias=False, dtype=dtype)
        in_widths = (config.filters,) + widths[:-1]
        self.down = nnx.List([DownLevel(i, o, config, rngs=rngs, dtype=dtype) for i, o in zip(in_widths, widths)])
        self.mid = res_blocks(widths[-1], widths[-1], config, rngs, dtype)
        self.norm_out = GroupNorm(widths[-1], **norm)
        self.conv_out = Conv(widths[-1], config.embedding_dim, 1, rngs=rngs, dtype=dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.conv_in(images)
        for index, level in enumerate(self.down):
            for block in level.block:
                x = block(x)
            if index < len(self.down) - 1:
                x = average_pool_2x2(x)
        for block in self.mid:
            x = block(x)
        return self.conv_out(nnx.swish(self.norm_out(x)))


class Decoder(nnx.Module):
    """Code vectors [B, h, w, D] -> images [B, h*f, w*f, C], not clipped."""

    def __init__(self, config: VQGANConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        widths = config.widths
        norm = dict(rngs=rngs, num_groups=config.num_groups, epsilon=config.norm_epsilon)
        self.conv_in = Conv(config.embedding_dim, widths[-1], 3, rngs=rngs, dtype=dtype)
        self.mid = res_blocks(widths[-1], widths[-1], config, rngs, dtype)
        # up[i] works at level i's resolution; levels run coarsest first, so up[-1] comes first.
        in_widths = widths[1:] + widths[-1:]
        self.up = nnx.List([
            UpLevel(in_widths[i], widths[i], i > 0, config, rngs=rngs, dtype=dtype)
            for i in range(config.num_levels)
        ])
        self.norm_out = GroupNorm(widths[0], **norm)
        self.conv_out = Conv(widths[0], config.image_channels, 3, rngs=rngs, dtype=dtype)

    def __call__(self, codes: jax.Array) -> jax.Array:
        return self.readout(self.features(codes))

    def features(self, codes: jax.Array) -> jax.Array:
        """Everything before the output convolution: its input activations."""
        x = self.conv_in(codes)
        for block in self.mid:
            x = block(x)
        for level in reversed(self.up):
            for block in level.block:
                x = block(x)
            if level.upsample_conv is not None:
                x = level.upsample_conv(upsample_nearest_2x(x))
        return nnx.swish(self.norm_out(x))

    def readout(self, features: jax.Array, kernel: jax.Array | None = None) -> jax.Array:
        """The output convolution; ``kernel`` replaces its weight (a GAN's adaptive weight
        differentiates with respect to it)."""
        if kernel is None:
            return self.conv_out(features)
        conv = self.conv_out
        y = jax.lax.conv_general_dilated(
            features.astype(conv.dtype), kernel.astype(conv.dtype), conv.stride, conv.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + conv.bias[...].astype(conv.dtype)


class VectorQuantizer(nnx.Module):
    """Nearest code by squared Euclidean distance, in float32 at full matmul precision (TPUs and
    recent GPUs would otherwise round the distances to bfloat16 / TF32 and change some ids)."""

    def __init__(self, codebook_size: int, embedding_dim: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")  # maskgit's
        self.codebook = param(rngs, init, (codebook_size, embedding_dim), ("codebook", "token_dim"))

    def nearest(self, features: jax.Array) -> jax.Array:
        """features [..., D] -> int32 ids [...]."""
        codebook = self.codebook[...]
        flat = features.reshape(-1, codebook.shape[1]).astype(jnp.float32)
        cross = jnp.matmul(flat, codebook.T, precision=jax.lax.Precision.HIGHEST)
        distances = (jnp.sum(flat * flat, axis=1, keepdims=True) - 2.0 * cross
                     + jnp.sum(codebook * codebook, axis=1)[None, :])
        return jnp.argmin(distances, axis=1).astype(jnp.int32).reshape(features.shape[:-1])

    def lookup(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.codebook[...], ids, axis=0)


class VQGAN(nnx.Module):
    """``encode(images) -> ids``, ``decode_ids(ids) -> images``; images NHWC float in [0, 1].

    Freshly built the weights are random: load converted ones with
    :func:`nativetok_jax.pretrained.maskgit_vqgan.load_maskgit_vqgan`.
    """

    def __init__(self, config: VQGANConfig = VQGANConfig(), *, rngs: nnx.Rngs,
                 dtype: jnp.dtype = jnp.float32):
        self.config = config
        self.encoder = Encoder(config, rngs=rngs, dtype=dtype)
        self.decoder = Decoder(config, rngs=rngs, dtype=dtype)
        self.quantizer = VectorQuantizer(config.codebook_size, config.embedding_dim, rngs=rngs)

    @property
    def codebook(self) -> jax.Array:
        """[codebook_size, embedding_dim] float32."""
        return self.quantizer.codebook[...]

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def last_kernel(self) -> jax.Array:
        """The decoder's output convolution weight (HWIO)."""
        return self.decoder.conv_out.kernel[...]

    def decoder_features(self, embeddings: jax.Array) -> jax.Array:
        """Code vectors [B, h, w, D] -> the decoder's activations before its output convolution."""
        return self.decoder.features(embeddings)

    def decoder_readout(self, features: jax.Array, kernel: jax.Array | None = None) -> jax.Array:
        """The output convolution on :meth:`decoder_features` (unclipped float32 images)."""
        return self.decoder.readout(features, kernel).astype(jnp.float32)

    def encode_features(self, images: jax.Array) -> jax.Array:
        """The encoder's continuous output [B, h, w, D] (float32), before quantisation."""
        if images.ndim != 4 or images.shape[-1] != self.config.image_channels:
            raise ValueError(f"VQGAN.encode: images must be [B, H, W, {self.config.image_channels}], "
                             f"got {images.shape}")
        factor = self.config.downsample_factor
        if images.shape[1] % factor or images.shape[2] % factor:
            raise ValueError(f"VQGAN.encode: height and width must be multiples of {factor}, "
                             f"got {images.shape[1]} x {images.shape[2]}")
        return self.encoder(images.astype(jnp.float32)).astype(jnp.float32)

    def encode(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] in [0, 1] -> int32 ids [B, H/f, W/f]."""
        return self.quantizer.nearest(self.encode_features(images))

    def quantized(self, ids: jax.Array) -> jax.Array:
        """ids [B, h, w] -> code vectors [B, h, w, D]."""
        return self.quantizer.lookup(ids)

    def decode(self, embeddings: jax.Array, *, clip: bool = True) -> jax.Array:
        """Code vectors [B, h, w, D] -> float32 images [B, h*f, w*f, C], clipped to [0, 1] unless
        ``clip=False`` (e.g. for a loss that needs gradients outside that range)."""
        if embeddings.ndim != 4 or embeddings.shape[-1] != self.config.embedding_dim:
            raise ValueError(f"VQGAN.decode: embeddings must be [B, h, w, {self.config.embedding_dim}], "
                             f"got {embeddings.shape}")
        images = self.decoder(embeddings).astype(jnp.float32)
        return jnp.clip(images, 0.0, 1.0) if clip else images

    def decode_ids(self, ids: jax.Array, *, clip: bool = True) -> jax.Array:
        """int ids [B, h, w] -> images [B, h*f, w*f, C]."""
        if ids.ndim != 3:
            raise ValueError(f"VQGAN.decode_ids: ids must be [B, h, w], got {ids.shape}")
        return self.decode(self.quantized(ids), clip=clip)
