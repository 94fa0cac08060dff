"""The checks every config schema is built from: :class:`ConfigError` and one-line field checks.

A schema (a config factory and its ``validate_*``) lives with what it configures: each model's in
its model module (``models/dit/transformer.py``, ``models/d2it/content_transformer.py``,
``models/d2it/grain_transformer.py``, ``models/nativetok/autoencoder.py``), the run's sections in
:mod:`nativetok_jax.config`. Each check raises ``ConfigError("config.<field>: <what is wrong>")``.

This module is core: it imports only :mod:`nativetok_jax.errors`.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from nativetok_jax.errors import UserError


class ConfigError(UserError, ValueError):
    """A config field has a value the code cannot use; the message names the field."""


DTYPES = ("float32", "bfloat16")  # compute dtypes; parameters are always float32

# What a rematerialised layer keeps (nativetok_jax/layers/remat.py): jax.checkpoint_policies names.
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")
# The precision of attention scores and softmax (nativetok_jax/layers/attention.py): float32
# whatever the compute dtype, or the compute dtype.
ATTENTION_LOGITS = ("float32", "compute")


def transformer_section(width: int, depth: int, num_heads: int, remat: bool = False) -> ml_collections.ConfigDict:
    """A transformer stack's section: width, depth, heads, MLP ratio 4, and whether each layer is
    rematerialised (``remat``) keeping what ``remat_policy`` names (layers/remat.py)."""
    return ml_collections.ConfigDict(
        dict(width=width, depth=depth, num_heads=num_heads, mlp_ratio=4.0, remat=remat,
             remat_policy="nothing_saveable")
    )


def require(condition: bool, field: str, message: str) -> None:
    """Raises ``ConfigError("config.<field>: <message>")`` unless ``condition``."""
    if not condition:
        raise ConfigError(f"config.{field}: {message}")


def require_unconditional_model(guidance_scale: Any, label_drop_probability: Any, field: str, drop_field: str) -> None:
    """Raises ``ConfigError`` naming ``field`` when classifier-free guidance other than 1 (0 is the
    unconditional model alone) is asked of a model trained with ``label_drop_probability`` 0 (``field``
    as the message names it: ``config.<path>`` or a flag): its
    null class's embedding never trained (it stays at its initial value), so the "unconditional"
    prediction is an arbitrary one and guidance amplifies noise. Either number being malformed is
    left to the field's own check."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (guidance_scale, label_drop_probability)):
        return
    if label_drop_probability == 0 and guidance_scale != 1:
        raise ConfigError(f"{field}: guidance {guidance_scale:g} needs the unconditional model, which never trained: "
                          f"{drop_field} is 0 (set the guidance to 1, or train with label dropout > 0)")


def positive_int(value, field: str) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, field,
             f"must be a positive integer, got {value!r}")


def boolean(value, field: str) -> None:
    require(isinstance(value, bool), field, f"must be True or False, got {value!r}")


def number(value, field: str, low: float = 0.0) -> None:
    require(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low, field,
             f"must be a number >= {low:g}, got {value!r}")


def check_attention_logits(section: ml_collections.ConfigDict, field: str) -> None:
    """Raises ``ConfigError`` unless ``<field>.attention_logits`` (default "float32") is one of
    :data:`ATTENTION_LOGITS`."""
    value = section.get("attention_logits", "float32")
    require(value in ATTENTION_LOGITS, f"{field}.attention_logits", f"must be one of {ATTENTION_LOGITS}, got {value!r}")


def validate_transformer(cfg: ml_collections.ConfigDict, field: str) -> None:
    """Checks a :func:`transformer_section` at ``config.<field>``."""
    for name in ("width", "depth", "num_heads"):
        positive_int(cfg.get(name), f"{field}.{name}")
    boolean(cfg.get("remat"), f"{field}.remat")
    require(cfg.get("remat_policy", "nothing_saveable") in REMAT_POLICIES, f"{field}.remat_policy",
             f"must be one of {REMAT_POLICIES}, got {cfg.get('remat_policy')!r}")
    require(cfg.width % cfg.num_heads == 0, f"{field}.width",
             f"{cfg.width} is not divisible by num_heads={cfg.num_heads}")
    require(float(cfg.mlp_ratio) > 0, f"{field}.mlp_ratio", f"must be > 0, got {cfg.mlp_ratio!r}")
