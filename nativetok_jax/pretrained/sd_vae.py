"""Converts Stable Diffusion's VAE (``stabilityai/sd-vae-ft-ema``, ``sd-vae-ft-mse``: the KL-f8
autoencoder DiT uses) from diffusers' layout into the project's format, and loads it.

The input is diffusers' ``diffusion_pytorch_model.safetensors`` (or ``.bin``) of ``AutoencoderKL``:
``encoder.conv_in``, ``encoder.down_blocks.{i}.resnets.{j}.{norm1,conv1,norm2,conv2,conv_shortcut}``,
``encoder.down_blocks.{i}.downsamplers.0.conv``, ``encoder.mid_block.resnets.{0,1}``,
``encoder.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}``, ``encoder.conv_norm_out``,
``encoder.conv_out``, ``quant_conv``, ``post_quant_conv``, and the decoder's ``up_blocks.{i}`` with
``upsamplers.0.conv``. Files saved by diffusers before 0.14 name the attention projections
``query``, ``key``, ``value``, ``proj_attn``; both spellings are read, as are attention weights
stored as 1x1 convolutions. A wrapper prefix (``vae.``, ``first_stage_model.``) is dropped.

CompVis' original layout (``vae-ft-mse-840000-ema-pruned.safetensors``, the ``first_stage_model`` of
a Stable Diffusion checkpoint: ``encoder.down.{i}.block.{j}``, ``nin_shortcut``, ``downsample.conv``,
``mid.block_1``, ``mid.attn_1.{norm,q,k,v,proj_out}``, ``norm_out``, and ``decoder.up.{i}`` numbered
finest first) is renamed to diffusers' first, so the same weights convert from either file.

The sizes (block widths, ResNet blocks per level, latent channels) are read off the weights and
recorded in the output's header; ``load_sd_vae`` rebuilds the same network.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from nativetok_jax.models.dit.kl_autoencoder import SD_SCALE_FACTOR, KLAutoencoder, KLAutoencoderConfig, PixelSpace
from nativetok_jax.pretrained import files
from nativetok_jax.pretrained.maskgit_vqgan import _map, _strip_prefix

KIND = "sd_vae"
SOURCE = "diffusers AutoencoderKL (Stable Diffusion VAE)"
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out": "proj_attn"}
_ATTENTION_PROJECTIONS = tuple(_LEGACY_ATTENTION)


def diffusers_name(key: str, legacy_attention: bool = False) -> str:
    """diffusers' name of the model parameter ``key`` (``encoder/mid_block/attentions/0/to_out/kernel``
    -> ``encoder.mid_block.attentions.0.to_out.0.weight``, or ``....proj_attn.weight`` if legacy)."""
    *parts, leaf = key.split("/")
    if parts[-1] in _ATTENTION_PROJECTIONS:
        if legacy_attention:
            parts[-1] = _LEGACY_ATTENTION[parts[-1]]
        elif parts[-1] == "to_out":
            parts.append("0")
    return ".".join(parts + [_LEAVES[leaf]])


_COMPVIS_RENAMES = (
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn_1\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
)


def _from_compvis(source: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CompVis' LDM names -> diffusers' (the decoder's levels run coarsest first in diffusers)."""
    levels = 1 + max(int(m.group(1)) for k in source if (m := re.match(r"decoder\.up\.(\d+)\.", k)))
    renamed = {}
    for key, value in source.items():
        up = re.match(r"decoder\.up\.(\d+)\.(block|upsample)\.(.*)", key)
        if up:
            level, part, rest = int(up.group(1)), up.group(2), up.group(3)
            key = f"decoder.up_blocks.{levels - 1 - level}." + (f"resnets.{rest}" if part == "block"
                                                                 else f"upsamplers.0.{rest}")
        for pattern, replacement in _COMPVIS_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def _transform(key: str, value: np.ndarray) -> np.ndarray:
    *parts, leaf = key.split("/")
    if leaf != "kernel":
        return value
    if parts[-1] in _ATTENTION_PROJECTIONS:  # Linear [out, in] (or a 1x1 conv [out, in, 1, 1]) -> [in, out]
        return value.reshape(value.shape[:2]).T
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO


def _config_from(source: dict[str, np.ndarray], path: str) -> KLAutoencoderConfig:
    widths, level = [], 0
    while f"encoder.down_blocks.{level}.resnets.0.conv1.weight" in source:
        widths.append(int(source[f"encoder.down_blocks.{level}.resnets.0.conv1.weight"].shape[0]))
        level += 1
    blocks = 0
    while f"encoder.down_blocks.0.resnets.{blocks}.conv1.weight" in source:
        blocks += 1
    if not widths or "post_quant_conv.weight" not in source or "encoder.conv_in.weight" not in source:
        raise files.WeightsError(f"{path} is not a diffusers AutoencoderKL state dict (no "
                                 "encoder.down_blocks.0.resnets.0.conv1.weight / post_quant_conv.weight)")
    return KLAutoencoderConfig(block_widths=tuple(widths), layers_per_block=blocks,
                               latent_channels=int(source["post_quant_conv.weight"].shape[0]),
                               image_channels=int(source["encoder.conv_in.weight"].shape[1]),
                               scale_factor=SD_SCALE_FACTOR)


def _expected_shapes(config: KLAutoencoderConfig) -> dict[str, tuple[int, ...]]:
    abstract = nnx.eval_shape(lambda: KLAutoencoder(config, rngs=nnx.Rngs(0)))
    return {"/".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def convert_state_dict(source: dict[str, np.ndarray], path: str) -> tuple[dict[str, np.ndarray], KLAutoencoderConfig]:
    """diffusers (or CompVis) arrays -> (the project's flat arrays, the config they fit); one error line
    lists every missing, unexpected or misshaped name."""
    source = _strip_prefix(source, "post_quant_conv.weight")
    if "encoder.down.0.block.0.conv1.weight" in source:
        source = _from_compvis(source)
    config = _config_from(source, path)
    legacy = "encoder.mid_block.attentions.0.query.weight" in source
    flat = _map(source, _expected_shapes(config), lambda key: diffusers_name(key, legacy), _transform, path, SOURCE,
                model="a KL-f8 autoencoder")
    return flat, config


def convert_sd_vae(path: str, out_path: str, scale_factor: float = SD_SCALE_FACTOR) -> None:
    """Converts diffusers' ``AutoencoderKL`` weights at ``path`` into an ``sd_vae`` file at ``out_path``."""
    flat, config = convert_state_dict(files.read_state_dict(path), path)
    config = KLAutoencoderConfig.from_dict({**config.to_dict(), "scale_factor": float(scale_factor)})
    files.save_weights(out_path, flat, kind=KIND, source=SOURCE, source_file=path.rsplit("/", 1)[-1],
                       config=config.to_dict())


def load_sd_vae(path: str, *, dtype: Any = jnp.float32, scale_factor: float | None = None) -> KLAutoencoder:
    """A :class:`KLAutoencoder` with the weights of a file written by :func:`convert_sd_vae`; ``dtype``
    is the compute dtype (parameters stay float32); ``scale_factor`` replaces the file's latent scale."""
    flat, meta = files.load_weights(path, kind=KIND)
    config = files.header_config(meta, KLAutoencoderConfig.from_dict, source=path, what="KL autoencoder")
    if scale_factor is not None:
        config = dataclasses.replace(config, scale_factor=float(scale_factor))
    return files.build_loaded(lambda: KLAutoencoder(config, rngs=nnx.Rngs(0), dtype=dtype), flat, source=path)


def latent_space(autoencoder: ml_collections.ConfigDict, *, dtype: Any = jnp.float32) -> KLAutoencoder | PixelSpace:
    """The latent space a DiT config's ``model.autoencoder`` names: :class:`PixelSpace` for ``"pixels"``,
    else the converted SD-VAE file ``weights`` with the config's ``scale_factor``.

    Raises:
      files.WeightsError: the weights file is missing or is not an ``sd_vae`` file.
    """
    if autoencoder.kind == "pixels":
        return PixelSpace()
    return load_sd_vae(autoencoder.weights, dtype=dtype, scale_factor=autoencoder.scale_factor)
