"""The second-stage generators' schema and builder: ``config.generator``'s model fields (their
defaults and checks, once), the sampling settings' checks, and the GPT or MaskGIT transformer they
describe over the tokenizer's ids. The run's fields (the tokenizer's workdir, the token store, the
token order) are added by ``nativetok_jax.config.generator_config``."""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections
from flax import nnx

from nativetok_jax.layers.remat import remat_of
from nativetok_jax.models.generators.gpt import GPT
from nativetok_jax.models.generators.masked_generator import MaskedTokenTransformer
from nativetok_jax.schema import DTYPES, ConfigError, require, validate_transformer

Generator = GPT | MaskedTokenTransformer

GENERATOR_KINDS = ("ar", "maskgit")


def generator_model_config() -> ml_collections.ConfigDict:
    """The generator's model fields with their defaults: LlamaGen-B (AR), float32 compute,
    classifier-free guidance's label dropout 0.1, and the sampling settings of ``sample.py`` and the
    trainer's preview (``sample``)."""
    g = ml_collections.ConfigDict()
    g.kind = "ar"  # "ar": LlamaGen-class GPT; "maskgit": bidirectional masked-token transformer
    g.width, g.depth, g.num_heads = 768, 12, 12  # LlamaGen-B
    g.mlp_ratio = 4.0  # maskgit's MLP; the GPT's SwiGLU uses LlamaGen's 2/3 of it, rounded to 256
    g.remat = False
    g.remat_policy = "nothing_saveable"  # layers/remat.py
    g.dtype = "float32"  # compute dtype; parameters are always float32
    g.num_classes = 0  # 0: as many as the data has (max label + 1)
    g.label_drop_probability = 0.1  # classifier-free guidance: labels dropped to the null class
    g.sample = ml_collections.ConfigDict(dict(
        num_samples=16, seed=0, temperature=1.0, top_k=0, top_p=1.0, guidance_scale=1.0,
        num_steps=8, choice_temperature=4.5))  # num_steps, choice_temperature: maskgit only
    return g


def validate_generator_model(g: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` naming the first of :func:`generator_model_config`'s fields (at
    ``config.generator``) that cannot build a generator."""
    require(g.get("kind") in GENERATOR_KINDS, "generator.kind", f"must be one of {GENERATOR_KINDS}, got {g.get('kind')!r}")
    validate_transformer(ml_collections.ConfigDict(dict(width=g.width, depth=g.depth, num_heads=g.num_heads,
                                                        mlp_ratio=g.mlp_ratio, remat=g.remat,
                                                        remat_policy=g.remat_policy)), "generator")
    require(g.get("dtype") in DTYPES, "generator.dtype", f"must be one of {DTYPES}, got {g.get('dtype')!r}")
    require(isinstance(g.get("num_classes"), int) and g.get("num_classes") >= 0, "generator.num_classes",
            f"must be an integer >= 0, got {g.get('num_classes')!r}")
    p = g.get("label_drop_probability")
    require(isinstance(p, (int, float)) and 0 <= p < 1, "generator.label_drop_probability", f"must lie in [0, 1), got {p!r}")


def validate_sampling(settings: ml_collections.ConfigDict, kind: str, *, vocab_size: int | None = None,
                      names: dict[str, str] | None = None) -> None:
    """Raises ``ConfigError`` naming the first sampling setting a ``kind`` generator cannot use.

    ``settings`` is ``config.generator.sample`` after any command-line overrides; ``names`` says
    how an error names a setting (``{"temperature": "--temperature"}`` for a flag; default
    ``config.generator.sample.<name>``); ``vocab_size`` bounds ``top_k`` when known. Temperature 0
    is greedy decoding (the limit), not an error; ``num_steps`` and ``choice_temperature`` are
    checked for MaskGIT, the only kind that uses them.
    """
    names = names or {}

    def require(condition: bool, name: str, message: str) -> None:
        if not condition:
            raise ConfigError(f"{names.get(name, f'config.generator.sample.{name}')}: {message}")

    def number(name: str, low: float, high: float = math.inf, high_open: bool = False) -> None:
        value = settings.get(name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and low <= value and (value <= high if not high_open else value < high)
        span = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        require(ok, name, f"must be a finite number {span}, got {value!r}")

    def integer(name: str, low: int, high: int | None = None) -> None:
        value = settings.get(name)
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
        require(ok, name, f"must be an integer >= {low}{'' if high is None else f' and <= {high}'}, got {value!r}")

    integer("num_samples", 1)
    integer("seed", 0)
    number("temperature", 0.0)  # 0: greedy
    integer("top_k", 0, vocab_size)  # 0: every id
    top_p = settings.get("top_p")
    require(isinstance(top_p, (int, float)) and not isinstance(top_p, bool) and 0 < top_p <= 1, "top_p",
            f"must lie in (0, 1] (1: off), got {top_p!r}")
    number("guidance_scale", 0.0)  # 0: the unconditional model, 1: no guidance
    if kind == "maskgit":
        integer("num_steps", 1)
        number("choice_temperature", 0.0)




def build_generator(
    generator: ml_collections.ConfigDict, *, vocab_size: int, num_tokens: int, num_classes: int,
    rngs: nnx.Rngs, dtype: str = "float32",
) -> Generator:
    """A GPT (``kind="ar"``; LlamaGen's SwiGLU width, 4 x width x 2/3 rounded to 256) or a MaskGIT
    transformer (``"maskgit"``; ``mlp_ratio`` x width) over ``vocab_size`` ids."""
    common = dict(vocab_size=vocab_size, num_tokens=num_tokens, num_classes=num_classes, width=generator.width,
                  depth=generator.depth, num_heads=generator.num_heads, dtype=jnp.dtype(dtype),
                  remat=remat_of(generator), rngs=rngs)
    if generator.kind == "ar":
        return GPT(**common)
    return MaskedTokenTransformer(mlp_ratio=generator.mlp_ratio, **common)
