"""The KL-regularised autoencoder of Latent Diffusion (Rombach et al. 2022), f = 8: the Stable
Diffusion VAE whose latents DiT diffuses, and the identity "autoencoder" of pixel-space diffusion.

Architecture (diffusers ``AutoencoderKL`` with ``sd-vae-ft-ema`` / ``sd-vae-ft-mse``'s config):
block widths (128, 256, 512, 512), two ResNet blocks per encoder level and three per decoder
level, GroupNorm (32 groups, epsilon 1e-6) and SiLU, a middle stage ``ResNet -> single-head
self-attention -> ResNet`` in both encoder and decoder, stride-2 3x3 convolutions after padding
the bottom and right edges by one to downsample, nearest 2x upsampling then a 3x3 convolution to
upsample. The encoder emits the mean and log-variance (clipped to [-30, 20]) of a diagonal Gaussian
over ``4`` latent channels, through the 1x1 ``quant_conv``; the decoder starts with the 1x1
``post_quant_conv``. A 256 x 256 image gives a 32 x 32 x 4 latent.

Images are NHWC in [0, 1] here (the network itself sees [-1, 1]); latents are *scaled*: the
network's latent times ``scale_factor`` (0.18215 for SD's VAE, which gives the latents about unit
variance), the space a diffusion model works in. Module names follow diffusers
(``encoder.down_blocks.0.resnets.1.conv2``, ``decoder.up_blocks.0.upsamplers.0.conv``,
``encoder.mid_block.attentions.0.to_q``) so that
:mod:`nativetok_jax.pretrained.sd_vae` converts its public weights by renaming.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.layers.conv import Conv
from nativetok_jax.layers.dense import Dense
from nativetok_jax.layers.norm import GroupNorm
from nativetok_jax.models.frozen.vqgan import upsample_nearest_2x

SD_SCALE_FACTOR = 0.18215
LOG_VARIANCE_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


@dataclasses.dataclass(frozen=True)
class KLAutoencoderConfig:
    """Sizes of a KL autoencoder; the defaults are Stable Diffusion's VAE (KL-f8, 4 channels)."""

    block_widths: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    image_channels: int = 3
    num_groups: int = 32
    norm_epsilon: float = 1e-6
    scale_factor: float = SD_SCALE_FACTOR

    def __post_init__(self):
        object.__setattr__(self, "block_widths", tuple(int(w) for w in self.block_widths))
        if not self.block_widths:
            raise ValueError("KLAutoencoderConfig: block_widths is empty")
        for width in self.block_widths:
            if width % self.num_groups:
                raise ValueError(f"KLAutoencoderConfig: width {width} does not split into {self.num_groups} groups")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_widths) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "block_widths": list(self.block_widths)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> KLAutoencoderConfig:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"KLAutoencoderConfig: unknown fields {unknown}")
        return cls(**values)


class ResnetBlock(nnx.Module):
    """``x + conv2(silu(norm2(conv1(silu(norm1(x))))))``, a 1x1 ``conv_shortcut`` on ``x`` where the width changes."""

    def __init__(self, in_width: int, out_width: int, config: KLAutoencoderConfig, *, rngs: nnx.Rngs,
                 dtype: jnp.dtype = jnp.float32):
        norm = dict(rngs=rngs, num_groups=config.num_groups, epsilon=config.norm_epsilon)
        self.norm1 = GroupNorm(in_width, **norm)
        self.conv1 = Conv(in_width, out_width, 3, rngs=rngs, padding=1, dtype=dtype)
        self.norm2 = GroupNorm(out_width, **norm)
        self.conv2 = Conv(out_width, out_width, 3, rngs=rngs, padding=1, dtype=dtype)
        self.conv_shortcut = Conv(in_width, out_width, 1, rngs=rngs, dtype=dtype) if in_width != out_width else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SpatialAttention(nnx.Module):
    """Single-head self-attention over all positions, with a GroupNorm in front and a residual."""

    def __init__(self, width: int, config: KLAutoencoderConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        self.group_norm = GroupNorm(width, rngs=rngs, num_groups=config.num_groups, epsilon=config.norm_epsilon)
        dense = dict(axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.to_q = Dense(width, width, **dense)
        self.to_k = Dense(width, width, **dense)
        self.to_v = Dense(width, width, **dense)
        self.to_out = Dense(width, width, **dense)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        rows = self.group_norm(x).reshape(b, h * w, 1, c)  # one head of width c
        attended = jax.nn.dot_product_attention(self.to_q(rows), self.to_k(rows), self.to_v(rows))
        return x + self.to_out(attended.reshape(b, h * w, c)).reshape(b, h, w, c)


class MidBlock(nnx.Module):
    def __init__(self, width: int, config: KLAutoencoderConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        self.resnets = nnx.List([ResnetBlock(width, width, config, rngs=rngs, dtype=dtype) for _ in range(2)])
        self.attentions = nnx.List([SpatialAttention(width, config, rngs=rngs, dtype=dtype)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Resample(nnx.Module):
    """diffusers' ``Downsample2D`` (pad bottom/right, 3x3 stride 2) or ``Upsample2D`` (nearest 2x, 3x3)."""

    def __init__(self, width: int, down: bool, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        padding = ((0, 1), (0, 1)) if down else 1
        self.conv = Conv(width, width, 3, rngs=rngs, stride=2 if down else 1, padding=padding, dtype=dtype)
        self.down = down

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x if self.down else upsample_nearest_2x(x))


class Level(nnx.Module):
    """ResNet blocks, then an optional down- or upsampler (``downsamplers``/``upsamplers``, one entry)."""

    def __init__(self, in_width: int, out_width: int, num_blocks: int, resample: str | None,
                 config: KLAutoencoderConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        widths = [in_width] + [out_width] * num_blocks
        self.resnets = nnx.List([ResnetBlock(widths[i], out_width, config, rngs=rngs, dtype=dtype)
                                 for i in range(num_blocks)])
        sampler = nnx.List([Resample(out_width, resample == "down", rngs=rngs, dtype=dtype)] if resample else [])
        self.downsamplers = sampler if resample == "down" else nnx.List([])
        self.upsamplers = sampler if resample == "up" else nnx.List([])

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.resnets:
            x = block(x)
        for sampler in (*self.downsamplers, *self.upsamplers):
            x = sampler(x)
        return x


class Encoder(nnx.Module):
    """Images in [-1, 1] ``[B, H, W, 3]`` -> moments ``[B, H/f, W/f, 2 * latent_channels]`` (before quant_conv)."""

    def __init__(self, config: KLAutoencoderConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        widths = config.block_widths
        self.conv_in = Conv(config.image_channels, widths[0], 3, rngs=rngs, padding=1, dtype=dtype)
        self.down_blocks = nnx.List([
            Level(widths[max(i - 1, 0)], widths[i], config.layers_per_block, "down" if i < len(widths) - 1 else None,
                  config, rngs=rngs, dtype=dtype) for i in range(len(widths))])
        self.mid_block = MidBlock(widths[-1], config, rngs=rngs, dtype=dtype)
        self.conv_norm_out = GroupNorm(widths[-1], rngs=rngs, num_groups=config.num_groups, epsilon=config.norm_epsilon)
        self.conv_out = Conv(widths[-1], 2 * config.latent_channels, 3, rngs=rngs, padding=1, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
    """Latents (unscaled) ``[B, h, w, latent_channels]`` -> images in about [-1, 1] ``[B, h*f, w*f, 3]``."""

    def __init__(self, config: KLAutoencoderConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        widths = config.block_widths[::-1]  # coarsest first, as the decoder runs
        self.conv_in = Conv(config.latent_channels, widths[0], 3, rngs=rngs, padding=1, dtype=dtype)
        self.mid_block = MidBlock(widths[0], config, rngs=rngs, dtype=dtype)
        self.up_blocks = nnx.List([
            Level(widths[max(i - 1, 0)], widths[i], config.layers_per_block + 1, "up" if i < len(widths) - 1 else None,
                  config, rngs=rngs, dtype=dtype) for i in range(len(widths))])
        self.conv_norm_out = GroupNorm(widths[-1], rngs=rngs, num_groups=config.num_groups, epsilon=config.norm_epsilon)
        self.conv_out = Conv(widths[-1], config.image_channels, 3, rngs=rngs, padding=1, dtype=dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class KLAutoencoder(nnx.Module):
    """``encode(images) -> (mean, log_variance)`` of the scaled latent; ``decode(latents) -> images``.

    Freshly built the weights are random: load converted ones with
    :func:`nativetok_jax.pretrained.sd_vae.load_sd_vae`.
    """

    def __init__(self, config: KLAutoencoderConfig = KLAutoencoderConfig(), *, rngs: nnx.Rngs,
                 dtype: jnp.dtype = jnp.float32):
        self.config = config
        self.encoder = Encoder(config, rngs=rngs, dtype=dtype)
        self.quant_conv = Conv(2 * config.latent_channels, 2 * config.latent_channels, 1, rngs=rngs, dtype=dtype)
        self.post_quant_conv = Conv(config.latent_channels, config.latent_channels, 1, rngs=rngs, dtype=dtype)
        self.decoder = Decoder(config, rngs=rngs, dtype=dtype)

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images ``[B, H, W, 3]`` in [0, 1] -> float32 ``(mean, log_variance)`` ``[B, H/8, W/8, 4]`` of the
        posterior over *scaled* latents (``scale_factor`` applied: log-variance shifted by ``2 log s``).

        Raises:
          ValueError: a shape that is not ``[B, H, W, 3]`` with sides divisible by the factor.
        """
        factor = self.downsample_factor
        if images.ndim != 4 or images.shape[-1] != self.config.image_channels:
            raise ValueError(f"KLAutoencoder.encode: images must be [B, H, W, {self.config.image_channels}], "
                             f"got {images.shape}")
        if images.shape[1] % factor or images.shape[2] % factor:
            raise ValueError(f"KLAutoencoder.encode: height and width must be multiples of {factor}, "
                             f"got {images.shape[1]} x {images.shape[2]}")
        moments = self.quant_conv(self.encoder(images.astype(jnp.float32) * 2.0 - 1.0)).astype(jnp.float32)
        mean, log_variance = jnp.split(moments, 2, axis=-1)
        log_variance = jnp.clip(log_variance, *LOG_VARIANCE_RANGE)
        scale = self.config.scale_factor
        return mean * scale, log_variance + 2.0 * jnp.log(scale)

    def decode(self, latents: jax.Array, *, clip: bool = True) -> jax.Array:
        """Scaled latents ``[B, h, w, 4]`` -> float32 images ``[B, 8h, 8w, 3]`` in [0, 1] (clipped unless
        ``clip=False``)."""
        if latents.ndim != 4 or latents.shape[-1] != self.latent_channels:
            raise ValueError(f"KLAutoencoder.decode: latents must be [B, h, w, {self.latent_channels}], "
                             f"got {latents.shape}")
        z = latents.astype(jnp.float32) / self.config.scale_factor
        images = (self.decoder(self.post_quant_conv(z)).astype(jnp.float32) + 1.0) / 2.0
        return jnp.clip(images, 0.0, 1.0) if clip else images


class PixelSpace(nnx.Module):
    """The identity "autoencoder" of pixel-space diffusion: images in [0, 1] <-> [-1, 1], 3 channels,
    a posterior of zero variance (log-variance ``-inf`` would make a sampled latent NaN-prone; the
    clamp's lower end, -30, gives a standard deviation of 3e-7)."""

    latent_channels = 3
    downsample_factor = 1

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean = images.astype(jnp.float32) * 2.0 - 1.0
        return mean, jnp.full_like(mean, LOG_VARIANCE_RANGE[0])

    def decode(self, latents: jax.Array, *, clip: bool = True) -> jax.Array:
        images = (latents.astype(jnp.float32) + 1.0) / 2.0
        return jnp.clip(images, 0.0, 1.0) if clip else images


def sample_latents(mean: jax.Array, log_variance: jax.Array, key: jax.Array) -> jax.Array:
    """One draw from the diagonal Gaussian posterior (DiT re-samples the latent every step)."""
    return mean + jnp.exp(0.5 * log_variance) * jax.random.normal(key, mean.shape, mean.dtype)
