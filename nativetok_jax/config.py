"""The configuration schema: every field with its default, and one-line validation errors.

Config files in ``configs/`` start from :func:`base_config` and override what they change, so a
field exists (and is documented) in exactly one place. :func:`validate` turns a bad value into
a ``ConfigError`` that names the field, before anything is built or compiled.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

MODEL_KINDS = ("nativetok", "titok")
DECODER_HEADS = ("pixel", "proxy_codes")
DTYPES = ("float32", "bfloat16")

# Logical axis -> mesh axes. Batch is split over data and fsdp; parameters are split over fsdp
# along their width ("embed") and over model along heads and hidden units (Megatron style).
# The stacked-expert and stacked-layer axes stay whole: the scan walks along them.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("head_dim", None),
    ("length", None),
    ("layers", None),
    ("experts", None),
    ("position", None),
    ("patch", None),
    ("norm", None),
    ("codebook", None),
    ("token_dim", None),
)


class ConfigError(ValueError):
    """A config field has a value the code cannot use; the message names the field."""


def _transformer(width: int, depth: int, num_heads: int, remat: bool = False) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(width=width, depth=depth, num_heads=num_heads, mlp_ratio=4.0, remat=remat)
    )


def base_config() -> ml_collections.ConfigDict:
    """NativeTok with 32 tokens at 256 px, the paper's sizes (NATIVETOK.md)."""
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()
    config.model.kind = "nativetok"  # or "titok": the order-free baseline.
    config.model.image_size = 256
    config.model.patch_size = 16
    config.model.num_tokens = 32
    config.model.dtype = "float32"  # Compute dtype; parameters are always float32.
    # Unroll the layer and expert scans in the compiled program: compile time grows with depth
    # and num_tokens; XLA's FLOP count becomes exact (the model benchmark uses it for that).
    config.model.unroll_scans = False
    # Meta Image Transformer (for kind="titok": the bidirectional encoder with latent tokens).
    # The prototype used 4 heads at width 1024; 16 (head dim 64) is the ViT-L choice we default to.
    config.model.encoder = _transformer(width=1024, depth=18, num_heads=16)
    # One light transformer per token position.
    config.model.experts = _transformer(width=256, depth=2, num_heads=4)
    # scan=False runs the prototype's unrolled Python loop instead of the scanned stack: same
    # numbers, compile time growing with num_tokens. For tests and benchmarks only.
    config.model.experts.scan = True
    config.model.quantizer = ml_collections.ConfigDict(
        dict(codebook_size=4096, token_dim=12, commitment_weight=0.25)
    )
    # TiTok-L decoder.
    config.model.decoder = _transformer(width=1024, depth=24, num_heads=16)
    config.model.decoder.head = "pixel"  # or "proxy_codes" (logits over a VQGAN codebook).
    config.model.decoder.proxy_codebook_size = 1024

    # Mesh axis sizes; -1 takes every device left over.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
    config.sharding = ml_collections.ConfigDict()
    config.sharding.rules = DEFAULT_RULES
    return config


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/config.py[:arg]`` by calling its ``get_config([arg])``, like config flags do."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{field}: {message}")


def _positive_int(value, field: str) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, field,
             f"must be a positive integer, got {value!r}")


def _validate_transformer(cfg: ml_collections.ConfigDict, field: str) -> None:
    for name in ("width", "depth", "num_heads"):
        _positive_int(cfg.get(name), f"{field}.{name}")
    _require(cfg.width % cfg.num_heads == 0, f"{field}.width",
             f"{cfg.width} is not divisible by num_heads={cfg.num_heads}")
    _require(float(cfg.mlp_ratio) > 0, f"{field}.mlp_ratio", f"must be > 0, got {cfg.mlp_ratio!r}")


def validate_model(model: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` naming the first field of ``config.model`` that cannot work."""
    _require(model.get("kind") in MODEL_KINDS, "model.kind", f"must be one of {MODEL_KINDS}, got {model.get('kind')!r}")
    _require(model.get("dtype") in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {model.get('dtype')!r}")
    for name in ("image_size", "patch_size", "num_tokens"):
        _positive_int(model.get(name), f"model.{name}")
    _require(model.image_size % model.patch_size == 0, "model.image_size",
             f"{model.image_size} is not a multiple of patch_size={model.patch_size}")
    _validate_transformer(model.encoder, "model.encoder")
    _validate_transformer(model.decoder, "model.decoder")
    if model.kind == "nativetok":
        _validate_transformer(model.experts, "model.experts")
    _positive_int(model.quantizer.get("codebook_size"), "model.quantizer.codebook_size")
    _positive_int(model.quantizer.get("token_dim"), "model.quantizer.token_dim")
    _require(model.decoder.get("head") in DECODER_HEADS, "model.decoder.head",
             f"must be one of {DECODER_HEADS}, got {model.decoder.get('head')!r}")
    _positive_int(model.decoder.get("proxy_codebook_size"), "model.decoder.proxy_codebook_size")


def validate_mesh(mesh: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolves ``-1`` and checks that the axis sizes multiply to the device count."""
    sizes = {name: mesh.get(name, 1) for name in ("data", "fsdp", "model")}
    for name, size in sizes.items():
        _require(isinstance(size, int) and (size >= 1 or size == -1), f"mesh.{name}",
                 f"must be a positive integer or -1, got {size!r}")
    free = [name for name, size in sizes.items() if size == -1]
    _require(len(free) <= 1, "mesh", f"only one axis may be -1, got {free}")
    fixed = 1
    for size in sizes.values():
        fixed *= max(size, 1)
    if free:
        _require(num_devices % fixed == 0, f"mesh.{free[0]}",
                 f"cannot fill {num_devices} devices with the other axes' product {fixed}")
        sizes[free[0]] = num_devices // fixed
    else:
        _require(fixed == num_devices, "mesh",
                 f"data*fsdp*model = {fixed} but there are {num_devices} devices")
    return sizes
