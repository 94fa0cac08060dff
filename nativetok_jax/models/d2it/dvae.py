"""D²iT's Dynamic VAE (arXiv 2504.09454, Sec. 3.1; docs/d2it.md "Stage 1"): a KL autoencoder whose
latent holds smooth regions at a coarse grain and detailed ones at a fine grain.

- **Dual-grain encoder** [A: DQ-VAE ``DualGrainEncoder``]: a VQGAN-style pyramid (maskgit's
  residual blocks and 2x2 average pooling, :mod:`nativetok_jax.models.frozen.vqgan`, plus VQGAN's
  single-head spatial attention at the feature sides ``attention_resolutions``). The fine branch
  is taken after the last-but-one level (factor ``f/2``), the coarse one after the last (factor
  ``f = 2^(levels-1)``); each has its own mid stack (res block, attention, res block) and head
  (GroupNorm, swish, 3x3 convolution) emitting a mean and a log-variance of ``latent_channels``.
- **Routing** by a grain map from :mod:`nativetok_jax.models.d2it.grain_router` (region side S = ``f``): in a
  coarse region the coarse code's mean and log-variance are copied onto its 2x2 fine cells
  (neighbour copying [P]); posterior samples draw their noise on each grain's own grid and copy it
  too, so a coarse region's four cells always hold one code.
- **Decoder** [A: DQ-VAE ``DecoderPositional``, "learned"]: learned row + column position
  embeddings added to the fine-grid latent, then maskgit's VQGAN decoder (no attention) on the
  fine grid, whose ``readout`` accepts a replacement output kernel for the GAN's adaptive weight.
- **Block-mean shortcut** [C, after DC-AE's residual autoencoding, arXiv 2410.10733 Sec. 3.2],
  ``shortcut="block_mean"``, off by default (the paper's DVAE has none): each grain's mean gets
  its blocks' mean colours added in its first three channels, and the decoder's output gets the
  first three latent channels upsampled (nearest) back to pixels. Parameter-free, so the networks
  learn a residual over the block-mean codec of the same routing instead of the whole image; a
  CPU-sized run needs this to pass that codec within its budget (docs/models_that_learn.md).
- **KL** against N(0, I) per code, each fine cell weighted ``1 / copies`` so a coarse code counts
  once (:func:`kl_divergence`).

Images are NHWC floats in [-1, 1] (:mod:`nativetok_jax.models.pixels`); latents ``[B, h, w, C]``
on the fine grid (h = H / (f/2)). ``DVAEConfig`` holds every size; ``configs/dvae.py`` records
which are the paper's [P], an ancestor's [A] or ours [C].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from nativetok_jax.layers.attention import Attention
from nativetok_jax.layers.conv import Conv
from nativetok_jax.layers.norm import GroupNorm
from nativetok_jax.layers.partitioning import param
from nativetok_jax.models.d2it import grain_router
from nativetok_jax.models.frozen.vqgan import Decoder, ResBlock, VQGANConfig, average_pool_2x2, res_blocks
from nativetok_jax.schema import DTYPES, positive_int, require

# Log-variance range of the posterior, as LDM's DiagonalGaussianDistribution clamps it.
LOGVAR_RANGE = (-30.0, 20.0)
DVAE_SHORTCUTS = ("none", "block_mean")
POSITION_INIT = nnx.initializers.truncated_normal(stddev=0.02)  # DQ-VAE's trunc_normal_


@dataclasses.dataclass(frozen=True)
class DVAEConfig:
    """Sizes of a Dynamic VAE and its router; the defaults are docs/d2it.md's choices at 256 px."""

    image_size: int = 256
    filters: int = 128
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4)  # 5 levels: coarse f16, fine f8
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16)  # encoder feature-map sides with attention after each block
    num_groups: int = 32
    latent_channels: int = 4
    dtype: str = "float32"
    shortcut: str = "none"  # "none" or "block_mean" (see the module docstring)
    # Router: see nativetok_jax.models.d2it.grain_router.
    routing: str = "entropy"
    fine_ratio: float = 0.5
    thresholds: str = ""  # thresholds file (entropy routing)
    num_bins: int = 0  # 0: region_size^2 bins
    sigma: float = 0.01
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self):
        for name in ("channel_multipliers", "attention_resolutions"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if len(self.channel_multipliers) < 2:
            raise ValueError(f"DVAEConfig: need at least two levels (a fine and a coarse grain), "
                             f"got channel_multipliers={self.channel_multipliers}")
        if self.image_size % self.coarse_factor:
            raise ValueError(f"DVAEConfig: image_size {self.image_size} is not a multiple of the coarse "
                             f"factor {self.coarse_factor}")
        if self.shortcut not in DVAE_SHORTCUTS:
            raise ValueError(f"DVAEConfig: shortcut must be one of {DVAE_SHORTCUTS}, got {self.shortcut!r}")
        if self.shortcut == "block_mean" and self.latent_channels < 3:
            raise ValueError(f"DVAEConfig: the block-mean shortcut needs latent_channels >= 3 (a colour), "
                             f"got {self.latent_channels}")
        self.pyramid  # noqa: B018  (VQGANConfig checks the widths against num_groups)

    @classmethod
    def from_model_config(cls, model: Mapping[str, Any]) -> DVAEConfig:
        """From ``config.model`` of :func:`nativetok_jax.config.dvae_config`."""
        values = {f.name: model[f.name] for f in dataclasses.fields(cls) if f.name in model}
        values.update({f.name: model["grain"][f.name] for f in dataclasses.fields(cls) if f.name in model.get("grain", {})})
        return cls(**values)

    @property
    def coarse_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def fine_factor(self) -> int:
        return self.coarse_factor // 2

    @property
    def factors(self) -> tuple[int, int]:
        """Grain factors, coarsest first (grain 0 coarse, 1 fine)."""
        return (self.coarse_factor, self.fine_factor)

    @property
    def latent_size(self) -> int:
        """Side of the fine latent grid."""
        return self.image_size // self.fine_factor

    @property
    def entropy_settings(self) -> grain_router.EntropySettings:
        return grain_router.EntropySettings(self.coarse_factor, self.num_bins, self.sigma, self.low, self.high)

    @property
    def pyramid(self) -> VQGANConfig:
        """The encoder's levels as a VQGAN config (its blocks are maskgit's)."""
        return VQGANConfig(filters=self.filters, num_res_blocks=self.num_res_blocks,
                           channel_multipliers=self.channel_multipliers, embedding_dim=self.latent_channels,
                           num_groups=self.num_groups)

    @property
    def decoder_pyramid(self) -> VQGANConfig:
        """The decoder's levels: all but the coarsest, so it starts on the fine grid."""
        return dataclasses.replace(self.pyramid, channel_multipliers=self.channel_multipliers[:-1])

    def router(self) -> grain_router.GrainRouter:
        """The router this config names; entropy routing reads (and checks) the thresholds file."""
        thresholds: tuple[float, ...] = ()
        if self.routing == "entropy":
            if not self.thresholds:
                raise grain_router.GrainError("entropy routing needs a thresholds file (model.grain.thresholds)")
            thresholds = grain_router.GrainThresholds.load(self.thresholds, self.entropy_settings).thresholds(self.fine_ratio)
        return grain_router.GrainRouter(self.factors, self.entropy_settings, self.routing, thresholds, (self.fine_ratio,))


class AttentionBlock(nnx.Module):
    """VQGAN's spatial self-attention: ``x + attention(GroupNorm(x))`` over all H*W positions, one head."""

    def __init__(self, width: int, config: VQGANConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        self.norm = GroupNorm(width, rngs=rngs, num_groups=config.num_groups, epsilon=config.norm_epsilon)
        self.attention = Attention(width, 1, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.attention(self.norm(x).reshape(b, h * w, c)).reshape(b, h, w, c)
        return x + y.astype(x.dtype)


class EncoderLevel(nnx.Module):
    """One resolution of the pyramid: residual blocks, each followed by attention where asked."""

    def __init__(self, in_width: int, out_width: int, attend: bool, config: VQGANConfig, *, rngs: nnx.Rngs,
                 dtype: jnp.dtype):
        self.block = res_blocks(in_width, out_width, config, rngs, dtype)
        self.attn = nnx.List([AttentionBlock(out_width, config, rngs=rngs, dtype=dtype)
                              for _ in range(config.num_res_blocks)]) if attend else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for index, block in enumerate(self.block):
            x = block(x)
            if self.attn is not None:
                x = self.attn[index](x)
        return x


class GrainBranch(nnx.Module):
    """A grain's mid stack (res block, attention, res block) and head: features -> ``2 C`` moments."""

    def __init__(self, width: int, config: VQGANConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype):
        self.block_1 = ResBlock(width, width, config, rngs=rngs, dtype=dtype)
        self.attn_1 = AttentionBlock(width, config, rngs=rngs, dtype=dtype)
        self.block_2 = ResBlock(width, width, config, rngs=rngs, dtype=dtype)
        self.norm_out = GroupNorm(width, rngs=rngs, num_groups=config.num_groups, epsilon=config.norm_epsilon)
        self.conv_out = Conv(width, 2 * config.embedding_dim, 3, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.block_2(self.attn_1(self.block_1(x)))
        return self.conv_out(nnx.swish(self.norm_out(x)))


class DualGrainEncoder(nnx.Module):
    """Images ``[B, H, W, 3]`` in [-1, 1] -> (coarse moments ``[B, H/f, W/f, 2C]``, fine moments
    ``[B, 2H/f, 2W/f, 2C]``), means first then log-variances along the last axis."""

    def __init__(self, config: DVAEConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        pyramid = config.pyramid
        widths = pyramid.widths
        self.conv_in = Conv(pyramid.image_channels, pyramid.filters, 3, rngs=rngs, use_bias=False, dtype=dtype)
        in_widths = (pyramid.filters,) + widths[:-1]
        sides = [config.image_size // 2**i for i in range(len(widths))]
        self.down = nnx.List([
            EncoderLevel(i, o, side in config.attention_resolutions, pyramid, rngs=rngs, dtype=dtype)
            for i, o, side in zip(in_widths, widths, sides)
        ])
        self.coarse = GrainBranch(widths[-1], pyramid, rngs=rngs, dtype=dtype)
        self.fine = GrainBranch(widths[-2], pyramid, rngs=rngs, dtype=dtype)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = self.conv_in(images)
        last = len(self.down) - 1
        fine = x
        for index, level in enumerate(self.down):
            x = level(x)
            if index == last - 1:
                fine = x  # taken one level before the coarsest, before pooling [A]
            if index < last:
                x = average_pool_2x2(x)
        return self.coarse(x), self.fine(fine)


class Posterior(NamedTuple):
    """A routed diagonal Gaussian on the fine grid: ``mean``, ``logvar`` float32 ``[B, h, w, C]``."""

    mean: jax.Array
    logvar: jax.Array


class DVAEOutput(NamedTuple):
    reconstruction: jax.Array  # float32 [B, H, W, 3], unclipped, model range [-1, 1]
    posterior: Posterior
    latents: jax.Array  # the decoded latents (a posterior sample, or its mean)


def block_mean_codes(images: jax.Array, factor: int, channels: int) -> jax.Array:
    """Images ``[B, H, W, 3]`` -> float32 ``[B, H/f, W/f, channels]``: each ``f x f`` block's mean
    colour in the first three channels, zeros in the rest (the encoder's block-mean shortcut)."""
    b, h, w, c = images.shape
    means = images.astype(jnp.float32).reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
    return jnp.pad(means, ((0, 0), (0, 0), (0, 0), (0, channels - c)))


def colour_of_codes(latents: jax.Array, factor: int) -> jax.Array:
    """Latents ``[B, h, w, C]`` -> float32 ``[B, h f, w f, 3]``: the first three channels repeated
    over each code's ``f x f`` pixels (the decoder's block-mean shortcut)."""
    colours = latents[..., :3].astype(jnp.float32)
    return jnp.repeat(jnp.repeat(colours, factor, axis=1), factor, axis=2)


def _split_moments(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)


def sample_latents(posterior: Posterior, grains: jax.Array, key: jax.Array) -> jax.Array:
    """A posterior sample whose noise is drawn on each grain's grid and neighbour-copied, so a
    coarse region's cells hold one code (for the two grains of a Dynamic VAE)."""
    b, h, w, c = posterior.mean.shape
    coarse_key, fine_key = jax.random.split(key)
    noise = grain_router.neighbour_copy([jax.random.normal(coarse_key, (b, h // 2, w // 2, c)),
                                  jax.random.normal(fine_key, (b, h, w, c))], grains)
    return posterior.mean + jnp.exp(0.5 * posterior.logvar) * noise


def kl_divergence(posterior: Posterior, grains: jax.Array, factors: tuple[int, ...] = (2, 1)) -> jax.Array:
    """KL(q || N(0, I)) in nats per image ``[B]``: summed over channels and codes, each fine cell
    weighted ``1 / copies`` (:func:`grain_router.code_weights`), so a coarse code counts once.

    Per code: ``0.5 * sum_c (mean^2 + exp(logvar) - 1 - logvar)`` (LDM's closed form).
    """
    per_cell = 0.5 * jnp.sum(jnp.square(posterior.mean) + jnp.exp(posterior.logvar) - 1.0 - posterior.logvar, axis=-1)
    return jnp.sum(per_cell * grain_router.code_weights(grains, factors), axis=(1, 2))


class DynamicVAE(nnx.Module):
    """The Dynamic VAE's networks (the router has no parameters and lives in :mod:`grain`).

    ``posterior(images, grains)`` -> routed mean and log-variance; ``decode(latents, grains)`` ->
    images; ``__call__`` does both (sampling when given a key).
    """

    def __init__(self, config: DVAEConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype | None = None):
        dtype = jnp.dtype(config.dtype) if dtype is None else dtype
        self.config = config
        self.encoder = DualGrainEncoder(config, rngs=rngs, dtype=dtype)
        size, channels = config.latent_size, config.latent_channels
        self.position_rows = param(rngs, POSITION_INIT, (size, channels), ("position", "latent"))
        self.position_cols = param(rngs, POSITION_INIT, (size, channels), ("position", "latent"))
        self.decoder = Decoder(config.decoder_pyramid, rngs=rngs, dtype=dtype)

    @property
    def factors(self) -> tuple[int, int]:
        return self.config.factors

    def branch_moments(self, images: jax.Array) -> tuple[Posterior, Posterior]:
        """Each grain's own posterior, unrouted: (coarse ``[B, H/f, W/f, C]``, fine ``[B, 2H/f, 2W/f, C]``)."""
        coarse, fine = self.encoder(images)
        coarse, fine = Posterior(*_split_moments(coarse)), Posterior(*_split_moments(fine))
        if self.config.shortcut == "block_mean":
            channels = self.config.latent_channels
            coarse = coarse._replace(mean=coarse.mean + block_mean_codes(images, self.config.coarse_factor, channels))
            fine = fine._replace(mean=fine.mean + block_mean_codes(images, self.config.fine_factor, channels))
        return coarse, fine

    def posterior(self, images: jax.Array, grains: jax.Array) -> Posterior:
        """Images ``[B, H, W, 3]`` in [-1, 1] and grain map ``[B, H/f, W/f]`` -> the routed
        posterior on the fine grid (coarse codes neighbour-copied)."""
        coarse, fine = self.branch_moments(images)
        return Posterior(grain_router.neighbour_copy([coarse.mean, fine.mean], grains),
                         grain_router.neighbour_copy([coarse.logvar, fine.logvar], grains))

    def decoder_parts(self, latents: jax.Array, grains: jax.Array) -> tuple[jax.Array, jax.Array | float]:
        """Latents ``[B, h, w, C]`` -> (the decoder's activations before its output convolution,
        what the block-mean shortcut adds to that convolution's images: float32 ``[B, H, W, 3]``,
        or 0.0 without it). An image is ``decoder_readout(features) + shortcut``.

        Each coarse code's copies are first replaced by their mean, so latents that are not exact
        copies (a diffusion model's output) decode as the nearest ones that are."""
        latents = grain_router.average_copies(latents.astype(jnp.float32), grains, self.factors)
        positions = self.position_rows[...][:, None, :] + self.position_cols[...][None, :, :]
        features = self.decoder.features(latents + positions)
        if self.config.shortcut != "block_mean":
            return features, 0.0
        return features, colour_of_codes(latents, self.config.fine_factor)

    def decoder_readout(self, features: jax.Array, kernel: jax.Array | None = None) -> jax.Array:
        """The output convolution (optionally with a replacement kernel): float32 images, before
        the shortcut (:meth:`decoder_parts`)."""
        return self.decoder.readout(features, kernel).astype(jnp.float32)

    @property
    def last_kernel(self) -> jax.Array:
        return self.decoder.conv_out.kernel[...]

    def decode(self, latents: jax.Array, grains: jax.Array) -> jax.Array:
        """Latents ``[B, h, w, C]`` on the fine grid -> float32 images ``[B, H, W, 3]``, unclipped."""
        features, shortcut = self.decoder_parts(latents, grains)
        return self.decoder_readout(features) + shortcut

    def __call__(self, images: jax.Array, grains: jax.Array, key: jax.Array | None = None) -> DVAEOutput:
        """Encode, route, sample (with ``key``; else the mean) and decode."""
        posterior = self.posterior(images, grains)
        latents = posterior.mean if key is None else sample_latents(posterior, grains, key)
        return DVAEOutput(self.decode(latents, grains), posterior, latents)


def latent_scale_of(latents: jax.Array, grains: jax.Array, factors: tuple[int, ...] = (2, 1)) -> float:
    """``1 / std`` of routed latents, every code counted once (coarse copies weighted 1/4): the
    global scale that gives diffusion unit-variance inputs (SD-VAE's 0.18215 is the same idea)."""
    weights = grain_router.code_weights(grains, factors)[..., None] * jnp.ones_like(latents[..., :1])
    total = jnp.sum(weights) * latents.shape[-1]
    mean = jnp.sum(weights * latents) / total
    variance = jnp.sum(weights * jnp.square(latents - mean)) / total
    return float(1.0 / jnp.sqrt(variance))


def build_dvae(model_config: Mapping[str, Any], rngs: nnx.Rngs) -> DynamicVAE:
    """The Dynamic VAE ``config.model`` describes (see :func:`nativetok_jax.config.dvae_config`)."""
    return DynamicVAE(DVAEConfig.from_model_config(model_config), rngs=rngs)


# ----------------------------------------------------------------- config.model of a DVAE: defaults and checks

DVAE_ROUTINGS = ("entropy", "fine", "coarse", "random")
GRAIN_FIELDS = ("routing", "fine_ratio", "thresholds", "num_bins", "sigma", "low", "high")  # config.model.grain


def dvae_model_config() -> ml_collections.ConfigDict:
    """``config.model`` of a Dynamic VAE, with :class:`DVAEConfig`'s defaults (the one place they
    are written): ``kind`` "dvae", the pyramid's sizes, and ``grain``, the router's fields."""
    defaults = DVAEConfig()
    model = ml_collections.ConfigDict(dict(kind="dvae"))
    for field in dataclasses.fields(DVAEConfig):
        if field.name not in GRAIN_FIELDS:
            model[field.name] = getattr(defaults, field.name)
    model.grain = ml_collections.ConfigDict({name: getattr(defaults, name) for name in GRAIN_FIELDS})
    return model


def validate_dvae_model(model: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` naming the first field of a DVAE's ``config.model`` that cannot work."""
    require(model.get("kind") == "dvae", "model.kind", f"must be 'dvae', got {model.get('kind')!r}")
    require(model.get("dtype") in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {model.get('dtype')!r}")
    for name in ("image_size", "filters", "num_res_blocks", "num_groups", "latent_channels"):
        positive_int(model.get(name), f"model.{name}")
    multipliers = tuple(model.get("channel_multipliers") or ())
    require(len(multipliers) >= 2 and all(isinstance(v, int) and v >= 1 for v in multipliers),
             "model.channel_multipliers", f"need at least two positive integers (a fine and a coarse level), got {multipliers!r}")
    coarse = 2 ** (len(multipliers) - 1)
    require(model.image_size % coarse == 0, "model.image_size",
             f"{model.image_size} is not a multiple of the coarse factor {coarse}")
    bad = [model.filters * v for v in multipliers if (model.filters * v) % model.num_groups]
    require(not bad, "model.num_groups", f"{model.num_groups} groups do not divide the widths {bad}")
    require(model.get("shortcut") in DVAE_SHORTCUTS, "model.shortcut", f"must be one of {DVAE_SHORTCUTS}, got {model.get('shortcut')!r}")
    require(model.shortcut != "block_mean" or model.latent_channels >= 3, "model.shortcut",
            f"'block_mean' needs model.latent_channels >= 3 (a colour), got {model.latent_channels}")
    g = model.grain
    require(g.get("routing") in DVAE_ROUTINGS, "model.grain.routing", f"must be one of {DVAE_ROUTINGS}, got {g.get('routing')!r}")
    ratio = g.get("fine_ratio")
    require(isinstance(ratio, (int, float)) and 0 < ratio < 1, "model.grain.fine_ratio", f"must lie in (0, 1), got {ratio!r}")
    require(isinstance(g.get("num_bins"), int) and (g.num_bins == 0 or g.num_bins >= 2), "model.grain.num_bins",
             f"must be 0 (region_size^2) or an integer >= 2, got {g.get('num_bins')!r}")
    require(isinstance(g.get("sigma"), (int, float)) and g.sigma > 0, "model.grain.sigma", f"must be > 0, got {g.get('sigma')!r}")
    require(g.low < g.high, "model.grain.low", f"need low < high, got {g.low!r} and {g.high!r}")
    if g.routing == "entropy":
        require(bool(g.get("thresholds")), "model.grain.thresholds", "entropy routing needs a thresholds file: make it with "
                 "`python -m nativetok_jax.grain_thresholds --config C --out T.json`")
