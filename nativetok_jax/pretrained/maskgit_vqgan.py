"""Converts the MaskGIT VQGAN's released weights into the project's format, and loads them.

Two layouts are accepted, told apart by their contents rather than the file name:

- google-research/maskgit's Flax checkpoint (``tokenizer_imagenet256_checkpoint``, msgpack), a
  linen variables tree ``{"params": {"encoder": ..., "decoder": ..., "quantizer": {"codebook"}}}``
  with linen's automatic names: ``encoder/Conv_0`` (the input conv), ``encoder/ResBlock_{k}``
  (levels finest first, then the middle blocks) each holding ``GroupNorm_0, Conv_0, GroupNorm_1,
  Conv_1`` and, where the width changes, ``Conv_2`` (the shortcut), then ``encoder/GroupNorm_0`` and
  ``encoder/Conv_1``; ``decoder/Conv_0``, ``decoder/ResBlock_{k}`` (middle blocks, then levels
  coarsest first), ``decoder/Conv_{1..L-1}`` (the upsampling convs, coarsest first),
  ``decoder/GroupNorm_0`` and ``decoder/Conv_{L}``. A TrainState-style ``{"target": ...}`` wrapper is
  unwrapped too.
- the PyTorch port used by TiTok (``maskgit-vqgan-imagenet-f16-256.bin``) and open-muse: keys
  ``encoder.conv_in.weight``, ``encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}``,
  ``encoder.mid.{j}``, ``encoder.norm_out``, ``encoder.conv_out``, ``decoder.conv_in``,
  ``decoder.mid.{j}``, ``decoder.up.{i}.block.{j}``, ``decoder.up.{i}.upsample_conv``,
  ``decoder.norm_out``, ``decoder.conv_out``, ``quantize.embedding.weight``; convolutions OIHW.

The model's sizes are read off the weights, checked against every array, and recorded in the
output file's header, so :func:`load_maskgit_vqgan` rebuilds the same network.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nativetok_jax.models.frozen.vqgan import VQGAN, VQGANConfig
from nativetok_jax import storage
from nativetok_jax.pretrained import files

KIND = "maskgit_vqgan"
MASKGIT_SOURCE = "google-research/maskgit Flax checkpoint"
PORT_SOURCE = "MaskGIT VQGAN PyTorch port (TiTok / open-muse)"

_STATE_DICT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
_PORT_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_RESBLOCK_PARTS = {"norm1": "GroupNorm_0", "conv1": "Conv_0", "norm2": "GroupNorm_1",
                   "conv2": "Conv_1", "nin_shortcut": "Conv_2"}


def _read(path: str) -> tuple[str, dict[str, np.ndarray]]:
    """(layout, flat arrays): ``"maskgit"`` with '/'-joined linen paths, or ``"port"`` with
    PyTorch's '.'-joined names."""
    if path.endswith(_STATE_DICT_SUFFIXES):
        return "port", files.read_state_dict(path)
    try:
        tree = files.read_flax_msgpack(path)
    except files.WeightsError as msgpack_error:
        if not storage.path(path).is_file():
            raise
        try:
            return "port", files.read_state_dict(path)
        except files.WeightsError:
            raise files.WeightsError(
                f"{path} is neither a Flax msgpack checkpoint nor a PyTorch state dict "
                f"({msgpack_error})") from None
    if not isinstance(tree, Mapping):
        raise files.WeightsError(f"{path} holds a msgpack {type(tree).__name__}, not a Flax checkpoint")
    for wrapper in ("target", "params"):
        if wrapper in tree and isinstance(tree[wrapper], Mapping):
            tree = tree[wrapper]
    return "maskgit", files.flatten(tree)


def _strip_prefix(state: dict[str, np.ndarray], anchor: str) -> dict[str, np.ndarray]:
    """Drops a wrapper prefix (``module.``, ``vq_model.``) found in front of ``anchor``."""
    prefix = next((k[: -len(anchor)] for k in state if k.endswith(anchor)), "")
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if prefix else state


def _require(flat: Mapping[str, np.ndarray], key: str, path: str, what: str) -> np.ndarray:
    if key not in flat:
        raise files.WeightsError(f"{path} is not a {what}: it has no '{key}'")
    return flat[key]


def _indices(flat: Mapping[str, Any], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in flat if (m := regex.match(k))})


def _config_from_port(state: Mapping[str, np.ndarray], path: str) -> VQGANConfig:
    what = "MaskGIT VQGAN state dict"
    conv_in = _require(state, "encoder.conv_in.weight", path, what)
    codebook = _require(state, "quantize.embedding.weight", path, what)
    levels = _indices(state, r"encoder\.down\.(\d+)\.")
    blocks = _indices(state, r"encoder\.down\.0\.block\.(\d+)\.")
    if not levels or not blocks:
        raise files.WeightsError(f"{path} is not a {what}: it has no 'encoder.down.0.block.0' weights")
    filters = conv_in.shape[0]
    multipliers = [
        _require(state, f"encoder.down.{i}.block.0.conv1.weight", path, what).shape[0] // filters
        for i in levels
    ]
    return _config(path, filters=filters, num_res_blocks=len(blocks), channel_multipliers=multipliers,
                   codebook_size=codebook.shape[0], embedding_dim=codebook.shape[1],
                   image_channels=conv_in.shape[1])


def _config_from_maskgit(tree: Mapping[str, np.ndarray], path: str) -> VQGANConfig:
    what = "MaskGIT VQGAN Flax checkpoint"
    conv_in = _require(tree, "encoder/Conv_0/kernel", path, what)
    codebook = _require(tree, "quantizer/codebook", path, what)
    # The decoder has one conv in, one per upsampling (levels - 1) and one out.
    num_levels = len(_indices(tree, r"decoder/Conv_(\d+)/")) - 1
    num_blocks = len(_indices(tree, r"encoder/ResBlock_(\d+)/"))
    if num_levels < 1 or num_blocks % (num_levels + 1):
        raise files.WeightsError(
            f"{path} is not a {what}: {num_blocks} encoder ResBlocks do not fit {num_levels} levels")
    per_level = num_blocks // (num_levels + 1)
    filters = conv_in.shape[3]
    multipliers = [
        _require(tree, f"encoder/ResBlock_{i * per_level}/Conv_0/kernel", path, what).shape[3] // filters
        for i in range(num_levels)
    ]
    return _config(path, filters=filters, num_res_blocks=per_level, channel_multipliers=multipliers,
                   codebook_size=codebook.shape[0], embedding_dim=codebook.shape[1],
                   image_channels=conv_in.shape[2])


def _config(path: str, **sizes: Any) -> VQGANConfig:
    try:
        return VQGANConfig(**sizes)
    except ValueError as e:
        raise files.WeightsError(f"{path}: the weights describe no valid MaskGIT VQGAN ({e})") from None


def _resblock_key(parts: list[str], base: str) -> str:
    """``[.., 'norm1', 'scale']`` -> ``{base}/GroupNorm_0/scale``."""
    return f"{base}/{_RESBLOCK_PARTS[parts[0]]}/{parts[1]}"


def maskgit_name(key: str, config: VQGANConfig) -> str:
    """The linen path in maskgit's checkpoint of the model parameter ``key``."""
    parts = key.split("/")
    levels, per_level = config.num_levels, config.num_res_blocks
    tower, rest = parts[0], parts[1:]
    if tower == "quantizer":
        return key
    if tower == "encoder":
        if rest[0] == "conv_in":
            return f"encoder/Conv_0/{rest[1]}"
        if rest[0] == "norm_out":
            return f"encoder/GroupNorm_0/{rest[1]}"
        if rest[0] == "conv_out":
            return f"encoder/Conv_1/{rest[1]}"
        if rest[0] == "down":  # down/{level}/block/{j}/...
            index = int(rest[1]) * per_level + int(rest[3])
            return _resblock_key(rest[4:], f"encoder/ResBlock_{index}")
        if rest[0] == "mid":
            return _resblock_key(rest[2:], f"encoder/ResBlock_{levels * per_level + int(rest[1])}")
    if tower == "decoder":
        if rest[0] == "conv_in":
            return f"decoder/Conv_0/{rest[1]}"
        if rest[0] == "norm_out":
            return f"decoder/GroupNorm_0/{rest[1]}"
        if rest[0] == "conv_out":
            return f"decoder/Conv_{levels}/{rest[1]}"
        if rest[0] == "mid":
            return _resblock_key(rest[2:], f"decoder/ResBlock_{int(rest[1])}")
        if rest[0] == "up":  # levels run coarsest first: up/{L-1} is the first after the middle
            step = levels - 1 - int(rest[1])
            if rest[2] == "upsample_conv":
                return f"decoder/Conv_{1 + step}/{rest[3]}"
            index = per_level + step * per_level + int(rest[3])
            return _resblock_key(rest[4:], f"decoder/ResBlock_{index}")
    raise ValueError(f"no maskgit name for {key}")


def port_name(key: str) -> str:
    """The PyTorch port's name of the model parameter ``key``."""
    if key == "quantizer/codebook":
        return "quantize.embedding.weight"
    *path, leaf = key.split("/")
    return ".".join(path + [_PORT_LEAVES[leaf]])


def _is_conv_kernel(key: str) -> bool:
    return key.endswith("/kernel")


def _map(source: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
         name_of: Callable[[str], str], transform: Callable[[str, np.ndarray], np.ndarray],
         path: str, label: str, model: str = "a MaskGIT VQGAN") -> dict[str, np.ndarray]:
    """Gathers every expected parameter from ``source``; all problems in one error line."""
    flat: dict[str, np.ndarray] = {}
    missing, misshaped = [], []
    for key, shape in expected.items():
        name = name_of(key)
        if name not in source:
            missing.append(name)
            continue
        value = transform(key, np.asarray(source[name], dtype=np.float32))
        if value.shape != shape:
            misshaped.append(f"{name} {tuple(np.shape(source[name]))}")
            continue
        flat[key] = value
    used = {name_of(key) for key in expected}
    problems = files.problems_line(missing, sorted(set(source) - used), misshaped)
    if problems:
        raise files.WeightsError(f"{path} ({label}) does not fit {model}: {problems}")
    return flat


def _expected_shapes(config: VQGANConfig) -> dict[str, tuple[int, ...]]:
    abstract = nnx.eval_shape(lambda: VQGAN(config, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    return {"/".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(state)}


def convert_maskgit_vqgan(path: str, out_path: str) -> None:
    """Converts maskgit's Flax checkpoint or the PyTorch port's state dict at ``path`` into a
    ``maskgit_vqgan`` weights file at ``out_path``."""
    layout, source = _read(path)
    if layout == "maskgit":
        config = _config_from_maskgit(source, path)
        label, name_of = MASKGIT_SOURCE, (lambda key: maskgit_name(key, config))
        transform = lambda key, value: value  # noqa: E731  linen kernels are already HWIO
    else:
        source = _strip_prefix(source, "quantize.embedding.weight")
        config = _config_from_port(source, path)
        label, name_of = PORT_SOURCE, port_name
        transform = lambda key, value: (  # noqa: E731
            value.transpose(2, 3, 1, 0) if _is_conv_kernel(key) and value.ndim == 4 else value)
    flat = _map(source, _expected_shapes(config), name_of, transform, path, label)
    files.save_weights(out_path, flat, kind=KIND, source=label, source_file=os.path.basename(path),
                       config=config.to_dict())


def load_maskgit_vqgan(path: str, *, dtype: Any = jnp.float32) -> VQGAN:
    """A :class:`VQGAN` with the weights of a file written by :func:`convert_maskgit_vqgan`;
    ``dtype`` is the convolutions' compute dtype (parameters stay float32)."""
    flat, meta = files.load_weights(path, kind=KIND)
    config = files.header_config(meta, VQGANConfig.from_dict, source=path, what="VQGAN")
    return files.build_loaded(lambda: VQGAN(config, rngs=nnx.Rngs(0), dtype=dtype), flat, source=path)
