"""The grain router of D²iT's Dynamic VAE: region entropy, the grain map and neighbour copying.

D²iT (arXiv 2504.09454, Sec. 3.1; docs/d2it.md "Stage 1") cuts an image into S x S pixel regions
(S = the coarsest grain's downsampling factor) and gives each region a grain from its information
density, measured as the Shannon entropy of a Gaussian kernel density estimate of its gray values:

- gray = 0.2989 R + 0.5870 G + 0.1140 B, with R, G, B in [0, 1] (uint8 / 255);
- density on ``num_bins`` evenly spaced bins on [low, high] (both ends included), each pixel
  adding ``exp(-0.5 ((gray - bin) / sigma)^2)`` to every bin, normalised to sum 1;
- entropy ``-sum p ln p`` (natural log; empty bins add nothing).

The default is S*S bins on [0, 1] and sigma 0.01 [C]: DQ-VAE's 32 bins on [-1, 1] score a flat
region between two bins like a hard black/white edge (both ln 2), a wrong ranking.

A region gets grain ``g`` = the number of thresholds its entropy *strictly* exceeds (thresholds
ascending), so with one threshold 1 = fine iff entropy > threshold [A: DQ-VAE's
``DualGrainFixedEntropyRouter``]. Grains are numbered coarsest first and ``factors[g]`` is grain
``g``'s downsampling factor, e.g. ``(16, 8)`` for D²iT at 256 px; more than two grains are
expressed by longer lists, e.g. ``(32, 16, 8)`` with two thresholds.

**Neighbour copying** [P] lays every grain's codes out on the finest grid: a code of grain ``g``
is copied onto its ``(factors[g] / factors[-1])^2`` fine cells, so every image becomes one
fixed-shape latent plus a grain map. :func:`code_weights` gives each fine cell ``1 / copies``
(coarse copies 1/4, fine 1 for two grains), so a loss summed with those weights counts every code
once [A: DQ-VAE's codebook mask].

Nothing here has learned parameters; everything is jittable and batched.
"""

from __future__ import annotations

import dataclasses
import json
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nativetok_jax.errors import UserError

# ITU-R BT.601 luma weights, as D²iT, DQ-VAE and MATLAB's rgb2gray use them (they sum to 0.9999).
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
ROUTINGS = ("entropy", "fine", "coarse", "random")


class GrainError(UserError, ValueError):
    """Images, thresholds or ratios the router cannot use; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class EntropySettings:
    """How region entropy is measured; a thresholds file is valid only for the same settings.

    Attributes:
      region_size: S, the side of a square region in pixels (the coarsest grain's factor).
      num_bins: density bins; 0 means S*S [C].
      sigma: the Gaussian kernel's standard deviation, in gray units (0.01 [P]).
      low, high: the first and last bin centre, in gray units ([0, 1] [C]).
    """

    region_size: int
    num_bins: int = 0
    sigma: float = 0.01
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self):
        if not isinstance(self.region_size, (int, np.integer)) or self.region_size < 1:
            raise GrainError(f"region_size must be a positive integer, got {self.region_size!r}")
        if self.num_bins == 0:
            object.__setattr__(self, "num_bins", int(self.region_size) ** 2)
        if not isinstance(self.num_bins, (int, np.integer)) or self.num_bins < 2:
            raise GrainError(f"num_bins must be an integer >= 2 (or 0 for region_size^2), got {self.num_bins!r}")
        if not self.sigma > 0:
            raise GrainError(f"sigma must be > 0, got {self.sigma!r}")
        if not self.low < self.high:
            raise GrainError(f"need low < high, got low={self.low!r}, high={self.high!r}")
        for name in ("region_size", "num_bins"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("sigma", "low", "high"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "gray_weights": list(GRAY_WEIGHTS), "log": "natural"}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EntropySettings:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


# ------------------------------------------------------------------------------------- entropy


def gray_of(images: jax.Array) -> jax.Array:
    """uint8 RGB ``[..., 3]`` -> float32 gray ``[...]`` in [0, 0.9999]."""
    rgb = images.astype(jnp.float32) / 255.0
    return rgb @ jnp.asarray(GRAY_WEIGHTS, jnp.float32)


def _regions(gray: jax.Array, size: int) -> jax.Array:
    """``[B, H, W]`` -> ``[B, H/S, W/S, S*S]``: each region's pixels, sorted.

    Sorting puts every region's values in one canonical order, so the entropy is exactly (not just
    up to rounding) invariant to permuting or flipping a region's pixels.
    """
    b, h, w = gray.shape
    blocks = gray.reshape(b, h // size, size, w // size, size).transpose(0, 1, 3, 2, 4)
    return jnp.sort(blocks.reshape(b, h // size, w // size, size * size), axis=-1)


def _entropy_of_values(values: jax.Array, settings: EntropySettings) -> jax.Array:
    """values ``[..., N]`` -> float32 entropy ``[...]`` of their kernel density on the bins."""
    bins = jnp.linspace(settings.low, settings.high, settings.num_bins, dtype=jnp.float32)
    z = (values[..., :, None] - bins) / settings.sigma
    density = jnp.mean(jnp.exp(-0.5 * z * z), axis=-2)  # [..., num_bins]
    total = jnp.sum(density, axis=-1, keepdims=True)
    # A region whose values all lie far outside [low, high] has no density: give it entropy 0.
    p = density / jnp.where(total > 0, total, 1.0)
    return -jnp.sum(jax.scipy.special.xlogy(p, p), axis=-1)


# Kernel values held at once by the entropy (2^25 floats, 128 MiB): B * S^2 * num_bins per region
# position (at least one position per step of the loop).
KERNEL_BUDGET = 2**25


@functools.partial(jax.jit, static_argnames=("settings",))
def gray_region_entropy(gray: jax.Array, settings: EntropySettings) -> jax.Array:
    """Gray images ``[B, H, W]`` (float, [0, 1]) -> float32 region entropy ``[B, H/S, W/S]`` in nats.

    The kernel density holds H * W * num_bins values per image (16.7 M at 256 px and S = 16), so
    regions are processed a few at a time, each for the whole batch, within ``KERNEL_BUDGET``. The
    loop runs over region positions, not images: a loop over the batch axis, which the mesh
    shards, made XLA all-gather every image's regions onto every device (8 GiB per chip and step
    for the 256 px DVAE on v5e:16x16; docs/benchmarks_tpu.md).
    """
    b, h, w = gray.shape
    regions = _regions(gray.astype(jnp.float32), settings.region_size)  # [B, H/S, W/S, S*S]
    grid = regions.shape[1:3]
    by_position = jnp.moveaxis(regions.reshape(b, grid[0] * grid[1], -1), 1, 0)  # [R, B, S*S]
    per_position = b * regions.shape[-1] * settings.num_bins  # kernel values of one region, whole batch
    chunk = max(1, min(by_position.shape[0], KERNEL_BUDGET // per_position))
    entropy = jax.lax.map(lambda r: _entropy_of_values(r, settings), by_position, batch_size=chunk)
    return jnp.moveaxis(entropy, 0, 1).reshape(b, *grid)


def check_images(images: Any, region_size: int, what: str = "images") -> None:
    """Raises a one-line ``GrainError`` unless ``images`` is uint8 ``[B, H, W, 3]`` with S | H, W."""
    shape, dtype = np.shape(images), getattr(images, "dtype", None)
    if len(shape) != 4 or shape[-1] != 3 or shape[0] < 1:
        raise GrainError(f"{what} must be uint8 [B, H, W, 3], got shape {tuple(shape)}")
    if dtype != np.uint8:
        raise GrainError(f"{what} must be uint8 (0..255), got dtype {dtype}")
    if shape[1] % region_size or shape[2] % region_size:
        raise GrainError(f"{what} of {shape[1]} x {shape[2]} px do not split into "
                         f"{region_size} x {region_size} px regions (region_size must divide height and width)")


def region_entropy(images: Any, settings: EntropySettings) -> jax.Array:
    """uint8 RGB images ``[B, H, W, 3]`` -> float32 entropy ``[B, H/S, W/S]`` (nats), jitted.

    Raises ``GrainError`` for a wrong shape or dtype, or a size S does not divide.
    """
    check_images(images, settings.region_size)
    return gray_region_entropy(gray_of(jnp.asarray(images)), settings)


# ------------------------------------------------------------------------------------- grain map


def grains_of(entropy: jax.Array, thresholds: Sequence[float] | jax.Array) -> jax.Array:
    """int32 grain ``[...]`` = how many of the ascending ``thresholds`` ``entropy`` strictly exceeds."""
    thresholds = jnp.asarray(thresholds, jnp.float32).reshape(-1)
    return jnp.sum(entropy[..., None] > thresholds, axis=-1).astype(jnp.int32)


def check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(t) for t in np.reshape(np.asarray(thresholds, np.float64), -1))
    if not values:
        raise GrainError("need at least one threshold (one fewer than the number of grains)")
    if any(b < a for a, b in zip(values, values[1:])):
        raise GrainError(f"thresholds must be ascending (coarsest grain's cut first), got {list(values)}")
    return values


def grain_map(images: Any, thresholds: Sequence[float], settings: EntropySettings) -> jax.Array:
    """uint8 images ``[B, H, W, 3]`` -> int32 grain map ``[B, H/S, W/S]``.

    With one threshold, 1 = fine iff the region's entropy > threshold (strict), else 0 = coarse;
    with ``G - 1`` ascending thresholds, grains ``0 .. G-1`` (coarsest first).
    """
    return grains_of(region_entropy(images, settings), check_thresholds(thresholds))


def check_ratios(ratios: float | Sequence[float]) -> tuple[float, ...]:
    """Fractions of regions at grains 1, 2, ... (finer than the coarsest); one-line errors."""
    values = (ratios,) if isinstance(ratios, (int, float)) else tuple(ratios)
    for r in values:
        if not isinstance(r, (int, float)) or not 0 < r < 1:
            raise GrainError(f"grain ratio must lie in (0, 1), got {r!r}")
    if sum(values) >= 1:
        raise GrainError(f"grain ratios must sum to less than 1 (the coarsest grain keeps the rest), got {list(values)}")
    return tuple(float(r) for r in values)


def ratio_percentiles(ratios: float | Sequence[float]) -> tuple[float, ...]:
    """The entropy percentiles (ascending) whose thresholds give these fractions at grains 1, 2, ...

    For two grains and fine ratio r: ``100 (1 - r)`` [A: DQ-VAE]; for more, grain g's cut leaves
    the fraction ``ratios[g-1] + ... + ratios[-1]`` above it.
    """
    values = check_ratios(ratios)
    return tuple(100.0 * (1.0 - sum(values[g:])) for g in range(len(values)))


def random_grain_map(key: jax.Array, shape: Sequence[int], ratios: float | Sequence[float]) -> jax.Array:
    """int32 grains ``shape`` drawn independently per region: grain ``g >= 1`` with ``ratios[g-1]``."""
    cuts = jnp.asarray(ratio_percentiles(ratios), jnp.float32) / 100.0
    return grains_of(jax.random.uniform(key, tuple(shape)), cuts)


def constant_grain_map(shape: Sequence[int], grain: int) -> jax.Array:
    return jnp.full(tuple(shape), grain, jnp.int32)


# ------------------------------------------------------------------------------------- neighbour copying


def check_factors(factors: Sequence[int]) -> tuple[int, ...]:
    """Downsampling factors coarsest first; each must divide the one before."""
    values = tuple(int(f) for f in factors)
    if len(values) < 2 or any(f < 1 for f in values):
        raise GrainError(f"need at least two positive grain factors, coarsest first, got {list(factors)}")
    if any(a <= b or a % b for a, b in zip(values, values[1:])):
        raise GrainError(f"grain factors must be listed coarsest first, each a multiple of the next, got {list(values)}")
    return values


def expand(grid: jax.Array, copies: int) -> jax.Array:
    """``[B, h, w, ...]`` -> ``[B, h*copies, w*copies, ...]``, each cell copied to a block."""
    if copies == 1:
        return grid
    return jnp.repeat(jnp.repeat(grid, copies, axis=1), copies, axis=2)


def fine_grain_map(grains: jax.Array, fine_cells: int) -> jax.Array:
    """Grain map ``[B, H/S, W/S]`` -> the grain of every fine-grid cell ``[B, H/S*n, W/S*n]``."""
    return expand(grains, fine_cells)


def neighbour_copy(codes: Sequence[jax.Array], grains: jax.Array) -> jax.Array:
    """Lays routed codes out on the finest grid [P: D²iT's neighbour copying].

    Args:
      codes: one array per grain, coarsest first, ``codes[g]`` of shape ``[B, h_g, w_g, ...]``
        (grain g's own grid; the last is the finest grid ``[B, h, w, ...]``).
      grains: int grain map ``[B, H/S, W/S]`` (``0 .. len(codes) - 1``).

    Returns:
      ``[B, h, w, ...]``: in a region of grain g, each of grain g's codes copied onto its
      ``(h / h_g)^2`` fine cells. Gradients reach only the chosen grain's codes.
    """
    fine = codes[-1]
    size = fine.shape[1]
    cell_grains = fine_grain_map(grains, size // grains.shape[1])
    cell_grains = cell_grains.reshape(cell_grains.shape + (1,) * (fine.ndim - 3))
    out = fine
    for g, grid in enumerate(codes[:-1]):
        out = jnp.where(cell_grains == g, expand(grid, size // grid.shape[1]), out)
    return out


def code_weights(grains: jax.Array, factors: Sequence[int]) -> jax.Array:
    """float32 ``[B, h, w]`` on the fine grid: ``1 / copies`` of the code each cell holds.

    For two grains: coarse cells 1/4, fine cells 1, so a sum weighted by these counts every code
    once [A: DQ-VAE's ``codebook_mask``].
    """
    factors = check_factors(factors)
    per_grain = jnp.asarray([(factors[-1] / f) ** 2 for f in factors], jnp.float32)
    return per_grain[fine_grain_map(grains, factors[0] // factors[-1])]


def average_copies(latents: jax.Array, grains: jax.Array, factors: Sequence[int]) -> jax.Array:
    """Replaces every grain's copies by their mean: fine-grid latents that neighbour copying could
    have produced (a no-op on such latents). ``latents [B, h, w, C]``, ``grains [B, H/S, W/S]``."""
    factors = check_factors(factors)
    b, h, w = latents.shape[:3]
    pooled = []
    for f in factors:
        n = f // factors[-1]
        blocks = latents.reshape(b, h // n, n, w // n, n, *latents.shape[3:])
        pooled.append(blocks.mean(axis=(2, 4)))
    return neighbour_copy(pooled, grains)


# ------------------------------------------------------------------------------------- the router


@dataclasses.dataclass(frozen=True)
class GrainRouter:
    """Chooses each region's grain: by entropy (D²iT), or fixed for comparisons.

    Attributes:
      factors: downsampling factors coarsest first; ``settings.region_size`` must be ``factors[0]``.
      settings: the entropy's settings.
      routing: ``"entropy"`` (thresholds), ``"fine"`` / ``"coarse"`` (every region the finest /
        coarsest grain), ``"random"`` (independent per region at ``ratios``).
      thresholds: ascending, ``len(factors) - 1`` of them (entropy routing only).
      ratios: fractions of regions at grains 1, 2, ... (random routing only).
    """

    factors: tuple[int, ...]
    settings: EntropySettings
    routing: str = "entropy"
    thresholds: tuple[float, ...] = ()
    ratios: tuple[float, ...] = (0.5,)

    def __post_init__(self):
        factors = check_factors(self.factors)
        object.__setattr__(self, "factors", factors)
        if self.settings.region_size != factors[0]:
            raise GrainError(f"region_size {self.settings.region_size} must equal the coarsest factor {factors[0]}")
        if self.routing not in ROUTINGS:
            raise GrainError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        object.__setattr__(self, "ratios", check_ratios(self.ratios))
        if self.routing == "entropy":
            object.__setattr__(self, "thresholds", check_thresholds(self.thresholds))
        if self.routing in ("entropy", "random"):
            count = len(self.thresholds) if self.routing == "entropy" else len(self.ratios)
            if count != len(factors) - 1:
                raise GrainError(f"{len(factors)} grains need {len(factors) - 1} "
                                 f"{'thresholds' if self.routing == 'entropy' else 'ratios'}, got {count}")

    @property
    def num_grains(self) -> int:
        return len(self.factors)

    def map_shape(self, images_shape: Sequence[int]) -> tuple[int, int, int]:
        s = self.settings.region_size
        return (images_shape[0], images_shape[1] // s, images_shape[2] // s)

    def __call__(self, images: Any, key: jax.Array | None = None) -> jax.Array:
        """uint8 ``[B, H, W, 3]`` -> int32 grain map ``[B, H/S, W/S]`` (random routing needs ``key``)."""
        check_images(images, self.settings.region_size)
        shape = self.map_shape(np.shape(images))
        if self.routing == "entropy":
            return grain_map(images, self.thresholds, self.settings)
        if self.routing == "fine":
            return constant_grain_map(shape, self.num_grains - 1)
        if self.routing == "coarse":
            return constant_grain_map(shape, 0)
        if key is None:
            raise GrainError("random routing needs a PRNG key")
        return random_grain_map(key, shape, self.ratios)


# ------------------------------------------------------------------------------------- thresholds file

THRESHOLDS_FORMAT = "nativetok_jax.grain_thresholds/1"
PERCENTILES = tuple(range(1, 100))


@dataclasses.dataclass(frozen=True)
class GrainThresholds:
    """Entropy percentiles 1..99 of a training set's regions, with the settings that measured them.

    Written by ``python -m nativetok_jax.grain_thresholds``; :meth:`thresholds` turns grain ratios
    into entropy thresholds. ``data`` describes the images (source, size, crops, count).
    """

    settings: EntropySettings
    percentiles: tuple[float, ...]  # entropy at percentile 1, 2, ..., 99
    num_regions: int
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_entropies(cls, entropies: np.ndarray, settings: EntropySettings,
                       data: Mapping[str, Any] | None = None) -> GrainThresholds:
        values = np.asarray(entropies, np.float64).reshape(-1)
        if values.size == 0:
            raise GrainError("no region entropies to take percentiles of")
        return cls(settings, tuple(float(v) for v in np.percentile(values, PERCENTILES)), int(values.size),
                   dict(data or {}))

    def threshold_at(self, percentile: float) -> float:
        """The entropy at ``percentile`` in [1, 99], linear between the stored integer percentiles."""
        if not PERCENTILES[0] <= percentile <= PERCENTILES[-1]:
            raise GrainError(f"percentile {percentile:g} is outside the stored 1..99 "
                             "(grain ratios must lie in [0.01, 0.99])")
        return float(np.interp(percentile, PERCENTILES, self.percentiles))

    def thresholds(self, ratios: float | Sequence[float]) -> tuple[float, ...]:
        """Ascending thresholds for fine ratio ``r`` (or ratios of grains 1, 2, ...): ``100 (1 - r)``-th
        percentile [A: DQ-VAE]. Raises ``GrainError`` for a ratio outside (0, 1)."""
        return tuple(self.threshold_at(q) for q in ratio_percentiles(ratios))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": THRESHOLDS_FORMAT,
            "entropy": self.settings.to_dict(),
            "data": dict(self.data),
            "num_regions": self.num_regions,
            "percentiles": {str(p): v for p, v in zip(PERCENTILES, self.percentiles)},
        }

    def save(self, path: str) -> None:
        from etils import epath

        target = epath.Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str, settings: EntropySettings | None = None) -> GrainThresholds:
        """Reads a thresholds file; refuses (one-line ``GrainError``) one measured with settings other
        than ``settings``, when given."""
        from etils import epath

        source = epath.Path(path)
        if not source.exists():
            raise GrainError(f"thresholds file {path} does not exist (make it with "
                             "`python -m nativetok_jax.grain_thresholds --config C --out T.json`)")
        try:
            content = json.loads(source.read_text())
            if content.get("format") != THRESHOLDS_FORMAT:
                raise ValueError(f"format {content.get('format')!r}, expected {THRESHOLDS_FORMAT!r}")
            stored = EntropySettings.from_dict(content["entropy"])
            values = tuple(float(content["percentiles"][str(p)]) for p in PERCENTILES)
            thresholds = cls(stored, values, int(content["num_regions"]), content.get("data", {}))
        except (ValueError, KeyError, TypeError) as error:
            raise GrainError(f"thresholds file {path} is not readable: {error}") from None
        if settings is not None and stored != settings:
            differences = ", ".join(
                f"{f.name} {getattr(stored, f.name)!r} (wanted {getattr(settings, f.name)!r})"
                for f in dataclasses.fields(EntropySettings) if getattr(stored, f.name) != getattr(settings, f.name))
            raise GrainError(f"thresholds file {path} was made with other entropy settings: {differences}")
        return thresholds
