"""D²iT's Dynamic Grain Transformer: a generative model of grain maps, a MaskGIT over 2 ids.

D²iT (arXiv 2504.09454, Sec. 3.2; docs/d2it.md "Stage 2") generates an image in
two steps: a *grain transformer* draws the grain map (which regions are fine, which coarse) from
the class label, then the content transformer draws the mixed-grain latent given that map. The
paper says the grain map is generated [P] (FFHQ has no labels, so it must be a generative model
of maps, not a classifier) but not how; we model it as a discrete generator over the binary map
[C]: the project's MaskGIT (:class:`~nativetok_jax.models.generators.masked_generator.MaskedTokenTransformer`,
Chang et al. 2022) with vocabulary 2 (0 coarse, 1 fine) and one token per region, read in raster
order (a ``[gh, gw]`` map is ``gh * gw`` tokens: 16 x 16 = 256 at 256 px, 4 x 4 in the 32 px demo).
Its positions are learned per token, so the 2-D layout is learned rather than imposed.

Training is MaskGIT's: a cosine-distributed fraction of each map is hidden and the hidden
regions' grains are scored by cross-entropy (:func:`grain_transformer_loss`); the label is
dropped to the null class at ``label_drop_probability`` so one network is both the conditional
and the unconditional model classifier-free guidance mixes. Sampling
(:func:`nativetok_jax.generation.grain_maps.sample_grain_maps`) is MaskGIT's parallel decoding
(:func:`nativetok_jax.generation.masked.sample`) reshaped to maps.

When the data has no labels (``num_classes`` 0 or 1) the model is unconditional: its class
table holds the null row only, every label is read as that row, and guidance is off.

Config section ``config.grain_transformer`` (:func:`default_grain_transformer_config`), every
value our choice [C] (the paper gives no size for its grain transformer):

| field | default | meaning |
| --- | --- | --- |
| width, depth, num_heads | 384, 6, 6 | the transformer (a 256-token binary map needs little) |
| mlp_ratio | 4.0 | MLP hidden width / width |
| remat | False | rematerialise each block in the backward pass |
| dtype | "float32" | compute dtype ("bfloat16" on TPU); parameters stay float32 |
| label_drop_probability | 0.1 | labels replaced by the null class in training (DiT's) |
| num_steps | 8 | MaskGIT decoding steps (MaskGIT's 8) |
| temperature | 1.0 | divides the logits before sampling each grain (1: the model's distribution) |
| choice_temperature | inf | which decoded grains to keep: inf a uniformly random choice (below) |
| guidance_scale | 1.0 | classifier-free guidance; 1 samples the learned conditional distribution |

Why ``choice_temperature = inf`` rather than MaskGIT's 4.5: MaskGIT keeps, at each step, the
sampled ids the model is most confident about, so a region whose sampled grain is the class's
rarer one is more often re-masked and re-drawn, and the maps drift toward each class's majority
grain (a tiny model trained on a class with 16 % fine regions sampled 7 % fine maps at 4.5, 15 % at
inf). A random choice keeps every sampled grain with the same chance, so the samples' fine
fraction, the latent budget the content transformer spends, follows the data's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from nativetok_jax.schema import DTYPES, number, require, validate_transformer
from nativetok_jax.models.generators.masked_generator import MaskedTokenTransformer

GRAIN_VOCABULARY = 2  # grain ids: 0 coarse, 1 fine (the grain latent store's convention)


class GrainTransformer(MaskedTokenTransformer):
    """A MaskGIT over grain maps: ids ``int [B, gh * gw]`` (raster order, 0 coarse, 1 fine, 2 the
    ``[MASK]`` id) and labels ``int [B]`` -> float32 logits ``[B, gh * gw, 2]``.

    ``num_classes`` is the data's class count; 0 or 1 builds the unconditional model (a class
    table with the null row only, :attr:`conditional` False). Parameters carry the masked
    generator's logical axis names; the blocks are one scanned stack.
    """

    def __init__(
        self,
        *,
        grain_shape: Sequence[int],
        num_classes: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        label_drop_probability: float = 0.1,
        dtype: jnp.dtype = jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        grain_shape = tuple(int(n) for n in grain_shape)
        if len(grain_shape) != 2 or min(grain_shape) < 1:
            raise ValueError(f"grain_shape must be (rows, columns) of positive sizes, got {grain_shape}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 or 1: unconditional), got {num_classes}")
        if not 0 <= label_drop_probability < 1:
            raise ValueError(f"label_drop_probability must lie in [0, 1), got {label_drop_probability}")
        conditional = num_classes >= 2
        super().__init__(
            vocab_size=GRAIN_VOCABULARY, num_tokens=grain_shape[0] * grain_shape[1],
            num_classes=num_classes if conditional else 0, width=width, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, dtype=dtype, remat=remat, rngs=rngs,
        )
        self.grain_shape = grain_shape
        self.conditional = conditional
        self.label_drop_probability = float(label_drop_probability)

    def class_labels(self, labels: jax.Array) -> jax.Array:
        """``labels`` as the class table reads them: unchanged when conditional, else the null row."""
        labels = jnp.asarray(labels, jnp.int32)
        return labels if self.conditional else jnp.full_like(labels, self.null_class)


def grain_transformer_from_config(
    section: ml_collections.ConfigDict, num_classes: int, grain_shape: Sequence[int], rngs: nnx.Rngs
) -> GrainTransformer:
    """The :class:`GrainTransformer` that ``config.grain_transformer`` describes, for data with
    ``num_classes`` classes (0 or 1: unconditional) and grain maps of ``grain_shape`` (gh, gw).

    Raises :class:`~nativetok_jax.schema.ConfigError` for a field that cannot work.
    """
    validate_grain_transformer_config(section)
    return GrainTransformer(
        grain_shape=grain_shape, num_classes=num_classes, width=section.width, depth=section.depth,
        num_heads=section.num_heads, mlp_ratio=float(section.mlp_ratio),
        label_drop_probability=float(section.label_drop_probability), dtype=jnp.dtype(section.dtype),
        remat=section.remat, rngs=rngs,
    )


def is_concrete(x: Any) -> bool:
    """Whether ``x`` has values to read (not a tracer inside ``jit``)."""
    return not isinstance(x, jax.core.Tracer)


def check_grain_maps(grains: Any, grain_shape: Sequence[int], name: str = "grains") -> None:
    """Raises a one-line ``ValueError`` unless ``grains`` is an integer or boolean array
    ``[B, *grain_shape]`` whose values are 0 (coarse) or 1 (fine).

    Values are checked only for concrete arrays (a traced batch inside ``jit`` has no values to
    read); check a data set once on the host, e.g. the store's ``grains``, before training.
    """
    grain_shape = tuple(grain_shape)
    if not hasattr(grains, "dtype"):
        grains = np.asarray(grains)
    shape, dtype = np.shape(grains), grains.dtype
    if len(shape) != 3 or tuple(shape[1:]) != grain_shape:
        raise ValueError(f"{name} must be [batch, {grain_shape[0]}, {grain_shape[1]}], got shape {tuple(shape)}")
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)):
        raise ValueError(f"{name} must be integer grain ids (0 coarse, 1 fine), got dtype {dtype}")
    if is_concrete(grains):
        values = np.unique(np.asarray(grains))
        bad = values[(values != 0) & (values != 1)]
        if bad.size:
            raise ValueError(f"{name} must hold only 0 (coarse) and 1 (fine), found {bad[:5].tolist()}")


def check_labels(model: GrainTransformer, labels: Any) -> None:
    """Raises a one-line ``ValueError`` unless ``labels`` is ``[B]`` with values in
    ``[0, model.null_class]`` (checked when concrete; an unconditional model ignores the values).

    The class table is read with ``jnp.take``, which clamps an out-of-range id to the last row
    without a word: a label past ``num_classes`` would silently train the null class.
    """
    if np.ndim(labels) != 1:
        raise ValueError(f"labels must be [batch], got shape {np.shape(labels)}")
    if model.conditional and is_concrete(labels):
        values = np.asarray(labels)
        if values.size and (values.min() < 0 or values.max() > model.null_class):
            raise ValueError(f"labels must lie in [0, {model.null_class}] ({model.null_class}: unconditional), "
                             f"got {values.min()}..{values.max()}")


def grain_transformer_loss(
    model: GrainTransformer, grains: jax.Array, labels: jax.Array, key: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MaskGIT's masked cross-entropy on a batch of grain maps, with label dropout to the null class.

    Args:
      model: the grain transformer.
      grains: int (or bool) ``[B, gh, gw]``, 0 coarse, 1 fine (the grain latent store's
        ``grains[:, flip]``).
      labels: int ``[B]`` class ids (ignored by an unconditional model).
      key: drives the cosine mask and the label dropout
        (:meth:`MaskedTokenTransformer.masked_token_loss`).

    Returns:
      ``(loss, metrics)``: the float32 mean cross-entropy over hidden regions, and ``loss``,
      ``accuracy`` (on hidden regions), ``mask_ratio`` and ``fine_fraction`` (of the batch's maps).

    Raises ``ValueError`` (one line, before anything compiles) for maps of the wrong shape or
    dtype, values other than 0/1, or labels not ``[B]`` or outside ``[0, null_class]`` (values:
    concrete arrays only).
    """
    check_grain_maps(grains, model.grain_shape)
    if np.shape(labels) != np.shape(grains)[:1]:
        raise ValueError(f"labels must be [{np.shape(grains)[0]}] (one per grain map), got shape {np.shape(labels)}")
    check_labels(model, labels)
    tokens = jnp.asarray(grains, jnp.int32).reshape(np.shape(grains)[0], -1)
    loss, metrics = model.masked_token_loss(
        tokens, model.class_labels(labels), key=key,
        label_drop_probability=model.label_drop_probability if model.conditional else 0.0)
    metrics["fine_fraction"] = tokens.mean(dtype=jnp.float32)
    return loss, metrics


SAMPLING_FIELDS = ("num_steps", "temperature", "choice_temperature", "guidance_scale")


def grain_sampling_settings(section: ml_collections.ConfigDict) -> dict[str, Any]:
    """The keyword arguments of :func:`nativetok_jax.generation.grain_maps.sample_grain_maps` that
    ``config.grain_transformer`` sets: ``sample_grain_maps(model, labels, key, **settings)``."""
    return {name: section[name] for name in SAMPLING_FIELDS}

# ----------------------------------------------------------------- config.grain_transformer: defaults and checks

def default_grain_transformer_config() -> ml_collections.ConfigDict:
    """The ``config.grain_transformer`` section (``models/d2it/grain_transformer.py`` documents every field)."""
    return ml_collections.ConfigDict(dict(
        width=384, depth=6, num_heads=6, mlp_ratio=4.0, remat=False, dtype="float32",
        label_drop_probability=0.1,
        num_steps=8, temperature=1.0, choice_temperature=math.inf, guidance_scale=1.0,
    ))


def validate_grain_transformer_config(section: ml_collections.ConfigDict, field: str = "grain_transformer") -> None:
    """Raises :class:`~nativetok_jax.schema.ConfigError` naming the first field of ``section``
    (``config.<field>.<name>``) that cannot work."""
    validate_transformer(section, field)
    require(section.get("dtype") in DTYPES, f"{field}.dtype", f"must be one of {DTYPES}, got {section.get('dtype')!r}")
    drop = section.get("label_drop_probability")
    require(isinstance(drop, (int, float)) and not isinstance(drop, bool) and 0 <= drop < 1,
             f"{field}.label_drop_probability", f"must lie in [0, 1), got {drop!r}")
    steps = section.get("num_steps")
    require(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1, f"{field}.num_steps",
             f"must be a positive integer, got {steps!r}")
    for name in ("temperature", "choice_temperature", "guidance_scale"):
        number(section.get(name), f"{field}.{name}")
        # An infinite choice temperature is a uniformly random keep order; elsewhere inf means nothing.
        require(math.isfinite(section.get(name)) or name == "choice_temperature", f"{field}.{name}",
                 f"must be finite, got {section.get(name)!r}")
