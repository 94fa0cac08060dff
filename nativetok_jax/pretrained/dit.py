"""Converts DiT's released weights (Peebles & Xie 2023) into a run directory that ``sample`` reads.

Two layouts are accepted, told apart by their names:

- facebookresearch/DiT's checkpoints (``DiT-XL-2-256x256.pt``, ``DiT-XL-2-512x512.pt``: a plain
  state dict of ``models.py``'s ``DiT``): ``x_embedder.proj`` (the patch convolution, OIHW),
  ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table`` (``num_classes + 1`` rows, the last the
  null class), ``pos_embed`` (the fixed sin-cos table ``[1, T, W]``, checked, not stored),
  ``blocks.{i}.attn.qkv`` (timm's fused ``[3W, W]``, rows ordered (q/k/v, head, channel)),
  ``blocks.{i}.attn.proj``, ``blocks.{i}.mlp.fc{1,2}``, ``blocks.{i}.adaLN_modulation.1`` and
  ``final_layer.{linear,adaLN_modulation.1}``;
- diffusers' ``DiTTransformer2DModel`` (``facebook/DiT-XL-2-256``'s
  ``transformer/diffusion_pytorch_model.safetensors``): ``pos_embed.proj``,
  ``transformer_blocks.{i}.norm1.emb.{timestep_embedder.linear_{1,2},class_embedder.embedding_table}``
  (a copy of the one embedder in every block: they must be equal), ``transformer_blocks.{i}.norm1.linear``,
  ``attn1.{to_q,to_k,to_v,to_out.0}``, ``ff.net.{0.proj,2}``, ``proj_out_1`` (the final
  modulation) and ``proj_out_2``. This layout stores no position table, so the image size is
  given (``image_size``, 256 by default).

The sizes (width, depth, patch, classes, learned sigma, MLP ratio) are read off the weights. The
head count is not in either file: DiT's tables give it by width (S 6, B 12, L 16, XL 16), other
widths get ``width / 64`` unless ``num_heads`` is given. The output is a run directory
(``config.json``, DiT's ``configs/dit.py`` recipe at these sizes, and one checkpoint at step 0),
so ``python -m nativetok_jax.sample --workdir OUT`` samples the released model with DiT's FID
protocol (DDPM-250, guidance 1.5 on three channels) once ``model.autoencoder.weights`` names the
converted SD-VAE (``--vae``).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from flax import nnx, traverse_util

from nativetok_jax.workdir import write_config
from nativetok_jax import checkpoints, storage
from nativetok_jax.config import DIT_SIZES, ConfigError, dit_config
from nativetok_jax.models.dit.transformer import dit_from_config, sincos_2d_positions
from nativetok_jax.pretrained import files
from nativetok_jax.pretrained.maskgit_vqgan import _strip_prefix

DIT_SOURCE = "facebookresearch/DiT checkpoint"
DIFFUSERS_SOURCE = "diffusers DiTTransformer2DModel"
SD_VAE_DOWNSAMPLING = 8
_DIT_ANCHOR = "x_embedder.proj.weight"
_DIFFUSERS_ANCHOR = "pos_embed.proj.weight"
_DIFFUSERS_EMBEDDER = "transformer_blocks.{i}.norm1.emb."

# Our parameter -> (DiT's name, diffusers' name); "{i}" is a block index for the stacked blocks.
_NAMES = {
    "patch_embedding/kernel": ("x_embedder.proj.weight", "pos_embed.proj.weight"),
    "patch_embedding/bias": ("x_embedder.proj.bias", "pos_embed.proj.bias"),
    "timestep_embedder/fc1/kernel": ("t_embedder.mlp.0.weight", _DIFFUSERS_EMBEDDER.format(i=0) + "timestep_embedder.linear_1.weight"),
    "timestep_embedder/fc1/bias": ("t_embedder.mlp.0.bias", _DIFFUSERS_EMBEDDER.format(i=0) + "timestep_embedder.linear_1.bias"),
    "timestep_embedder/fc2/kernel": ("t_embedder.mlp.2.weight", _DIFFUSERS_EMBEDDER.format(i=0) + "timestep_embedder.linear_2.weight"),
    "timestep_embedder/fc2/bias": ("t_embedder.mlp.2.bias", _DIFFUSERS_EMBEDDER.format(i=0) + "timestep_embedder.linear_2.bias"),
    "label_embedding": ("y_embedder.embedding_table.weight",
                        _DIFFUSERS_EMBEDDER.format(i=0) + "class_embedder.embedding_table.weight"),
    "final_layer/modulation/kernel": ("final_layer.adaLN_modulation.1.weight", "proj_out_1.weight"),
    "final_layer/modulation/bias": ("final_layer.adaLN_modulation.1.bias", "proj_out_1.bias"),
    "final_layer/linear/kernel": ("final_layer.linear.weight", "proj_out_2.weight"),
    "final_layer/linear/bias": ("final_layer.linear.bias", "proj_out_2.bias"),
    "blocks/modulation/kernel": ("blocks.{i}.adaLN_modulation.1.weight", "transformer_blocks.{i}.norm1.linear.weight"),
    "blocks/modulation/bias": ("blocks.{i}.adaLN_modulation.1.bias", "transformer_blocks.{i}.norm1.linear.bias"),
    "blocks/mlp/fc1/kernel": ("blocks.{i}.mlp.fc1.weight", "transformer_blocks.{i}.ff.net.0.proj.weight"),
    "blocks/mlp/fc1/bias": ("blocks.{i}.mlp.fc1.bias", "transformer_blocks.{i}.ff.net.0.proj.bias"),
    "blocks/mlp/fc2/kernel": ("blocks.{i}.mlp.fc2.weight", "transformer_blocks.{i}.ff.net.2.weight"),
    "blocks/mlp/fc2/bias": ("blocks.{i}.mlp.fc2.bias", "transformer_blocks.{i}.ff.net.2.bias"),
    "blocks/attention/out": ("blocks.{i}.attn.proj.weight", "transformer_blocks.{i}.attn1.to_out.0.weight"),
    "blocks/attention/out_bias": ("blocks.{i}.attn.proj.bias", "transformer_blocks.{i}.attn1.to_out.0.bias"),
}
_PROJECTIONS = ("query", "key", "value")
_DIFFUSERS_PROJECTIONS = {"query": "to_q", "key": "to_k", "value": "to_v"}


def _layout(source: dict[str, np.ndarray], path: str) -> str:
    if _DIT_ANCHOR in source:
        return "dit"
    if _DIFFUSERS_ANCHOR in source:
        return "diffusers"
    raise files.WeightsError(f"{path} is not a DiT state dict: it has neither '{_DIT_ANCHOR}' (facebookresearch/DiT) "
                             f"nor '{_DIFFUSERS_ANCHOR}' (diffusers' DiTTransformer2DModel)")


def _count(source: dict[str, np.ndarray], template: str) -> int:
    depth = 0
    while template.format(i=depth) in source:
        depth += 1
    return depth


def _require(source: dict[str, np.ndarray], key: str, path: str, ndim: int) -> np.ndarray:
    if key not in source:
        raise files.WeightsError(f"{path} is not a complete DiT state dict: it has no '{key}'")
    value = source[key]
    if value.ndim != ndim:
        raise files.WeightsError(f"{path}: '{key}' has shape {tuple(value.shape)}, expected {ndim} dimensions")
    return value


def _heads(width: int, num_heads: int | None, path: str) -> int:
    if num_heads is None:
        num_heads = next((h for w, _, h in DIT_SIZES.values() if w == width), width // 64 if width % 64 == 0 else 0)
    if num_heads < 1 or width % num_heads:
        raise files.WeightsError(f"{path}: the head count of a DiT of width {width} is not in DiT's tables; "
                                 "give it (--num_heads)")
    return num_heads


def _sizes(source: dict[str, np.ndarray], layout: str, path: str, image_size: int | None,
           num_heads: int | None) -> dict[str, Any]:
    """The network's sizes read off the weights (``WeightsError`` naming the key that does not fit)."""
    dit = layout == "dit"
    name = lambda key: _NAMES[key][0 if dit else 1]  # noqa: E731
    patch = _require(source, name("patch_embedding/kernel"), path, 4)
    width, channels, patch_size = int(patch.shape[0]), int(patch.shape[1]), int(patch.shape[2])
    labels = _require(source, name("label_embedding"), path, 2)
    final = _require(source, name("final_layer/linear/kernel"), path, 2)
    fc1 = _require(source, name("blocks/mlp/fc1/kernel").format(i=0), path, 2)
    depth = _count(source, name("blocks/modulation/kernel"))
    out_channels, rest = divmod(int(final.shape[0]), patch_size * patch_size)
    if rest or out_channels not in (channels, 2 * channels):
        raise files.WeightsError(f"{path}: '{name('final_layer/linear/kernel')}' has shape {tuple(final.shape)}: "
                                 f"{patch_size}x{patch_size} patches of {channels} or {2 * channels} channels expected")
    if channels not in (3, 4):
        raise files.WeightsError(f"{path}: '{name('patch_embedding/kernel')}' takes {channels} channels; DiT "
                                 "diffuses SD-VAE latents (4) or pixels (3)")
    downsampling = SD_VAE_DOWNSAMPLING if channels == 4 else 1
    if dit:
        positions = _require(source, "pos_embed", path, 3)
        grid = math.isqrt(int(positions.shape[1]))
        if grid * grid != positions.shape[1] or positions.shape[2] != width:
            raise files.WeightsError(f"{path}: 'pos_embed' has shape {tuple(positions.shape)}, not [1, T, {width}] "
                                     "for a square grid")
        if not np.allclose(positions[0], sincos_2d_positions(width, grid), atol=1e-5):
            raise files.WeightsError(f"{path}: 'pos_embed' is not DiT's fixed 2-D sin-cos table")
        found = grid * patch_size * downsampling
        if image_size is not None and image_size != found:
            raise files.WeightsError(f"{path}: 'pos_embed' is a {grid}x{grid} grid, {found} px images, "
                                     f"not the {image_size} asked for")
        image_size = found
    elif image_size is None:
        image_size = 256
    return dict(width=width, depth=depth, num_heads=_heads(width, num_heads, path), patch_size=patch_size,
                in_channels=channels, learn_sigma=out_channels == 2 * channels, num_classes=int(labels.shape[0]) - 1,
                mlp_ratio=float(fc1.shape[0]) / width, image_size=image_size, downsampling=downsampling)


def run_config(sizes: dict[str, Any], vae: str = ""):
    """DiT's recipe (``configs/dit.py``) at ``sizes``; ``vae`` is the converted SD-VAE file. Sampling
    is DiT's FID protocol exactly: DDPM-250, guidance 1.5 on the first three latent channels (DiT's
    ``sample_ddp.py``; its FID-50K of 2.27 was measured so)."""
    size = next((s for s, (w, d, h) in DIT_SIZES.items()
                 if (w, d, h) == (sizes["width"], sizes["depth"], sizes["num_heads"])), "XL")
    config = dit_config(size, sizes["patch_size"])
    m = config.model
    m.width, m.depth, m.num_heads = sizes["width"], sizes["depth"], sizes["num_heads"]
    m.mlp_ratio, m.learn_sigma, m.num_classes = sizes["mlp_ratio"], sizes["learn_sigma"], sizes["num_classes"]
    m.image_size = sizes["image_size"]
    m.sample.guided_channels = 3
    if sizes["in_channels"] == 3:
        m.autoencoder.kind = "pixels"
    else:
        m.autoencoder.weights = vae
    return config


def _transform(key: str, value: np.ndarray, sizes: dict[str, Any]) -> np.ndarray:
    """A source array (PyTorch layout) in our layout; ``key`` without the block index."""
    width, heads = sizes["width"], sizes["num_heads"]
    if key == "patch_embedding/kernel":  # conv OIHW -> [(p q c), W], patchify's order
        return value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0])
    if key == "blocks/attention/out":  # Linear [W, W] -> [heads, head_dim, W]
        return value.T.reshape(heads, width // heads, width)
    if key.endswith("/kernel"):
        return value.T
    return value


def _source_array(source: dict[str, np.ndarray], key: str, i: int | None, layout: str,
                  sizes: dict[str, Any]) -> tuple[str, np.ndarray | None]:
    """(the source's name, our array or None when the file lacks it) of our parameter ``key``
    (of block ``i``); DiT's fused ``qkv`` is split into our query, key and value."""
    width, heads = sizes["width"], sizes["num_heads"]
    projection = key.removeprefix("blocks/attention/").removesuffix("_bias")
    if projection in _PROJECTIONS:
        leaf = "bias" if key.endswith("_bias") else "weight"
        if layout == "dit":
            name = f"blocks.{i}.attn.qkv.{leaf}"
            fused = source.get(name)
            if fused is None or fused.shape[0] != 3 * width:
                return name, fused
            value = np.split(np.asarray(fused, np.float32), 3)[_PROJECTIONS.index(projection)]
        else:
            name = f"transformer_blocks.{i}.attn1.{_DIFFUSERS_PROJECTIONS[projection]}.{leaf}"
            if name not in source:
                return name, None
            value = np.asarray(source[name], np.float32)
        if value.shape != ((width, width) if leaf == "weight" else (width,)):
            return name, value
        return name, value.T.reshape(width, heads, width // heads) if leaf == "weight" else value.reshape(heads, -1)
    name = _NAMES[key][0 if layout == "dit" else 1].format(i=i)
    if name not in source:
        return name, None
    value = np.asarray(source[name], np.float32)
    try:
        return name, _transform(key, value, sizes)
    except ValueError:  # a reshape that cannot work: the shape is wrong
        return name, value


def convert_state_dict(source: dict[str, np.ndarray], path: str, *, image_size: int | None = None,
                       num_heads: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
    """DiT's or diffusers' arrays -> (our flat arrays, the sizes, the source's label).

    Raises:
      files.WeightsError: not a DiT state dict, or arrays that do not fit the sizes read off it (one
        line naming the file and the keys: missing, unexpected, wrong shape).
    """
    anchor = _DIT_ANCHOR if any(k.endswith(_DIT_ANCHOR) for k in source) else _DIFFUSERS_ANCHOR
    source = _strip_prefix(source, anchor)
    layout = _layout(source, path)
    label = DIT_SOURCE if layout == "dit" else DIFFUSERS_SOURCE
    sizes = _sizes(source, layout, path, image_size, num_heads)
    depth = sizes["depth"]
    if layout == "diffusers":  # diffusers copies DiT's one embedder into every block: the copies must agree
        first = _DIFFUSERS_EMBEDDER.format(i=0)
        for i in range(1, depth):
            prefix = _DIFFUSERS_EMBEDDER.format(i=i)
            for key in (k for k in source if k.startswith(prefix)):
                if not np.array_equal(source[key], source.get(first + key[len(prefix):])):
                    raise files.WeightsError(f"{path}: '{key}' differs from block 0's, but DiT has one timestep and "
                                             "label embedder")
    try:
        abstract = nnx.eval_shape(lambda: dit_from_config(run_config(sizes).model, nnx.Rngs(0)))
    except ConfigError as e:  # sizes that make no DiT (an --image_size the patches do not tile)
        raise files.WeightsError(f"{path}: {e}") from None
    expected = {"/".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    # The position table is checked by _sizes; diffusers' per-block embedder copies by the loop above.
    ignored = (lambda name: name == "pos_embed") if layout == "dit" else (lambda name: ".norm1.emb." in name)
    flat = files.gather(expected, source, lambda key, i: _source_array(source, key, i, layout, sizes),
                        depth=lambda key: depth if key.startswith("blocks/") else 0, ignored=ignored, path=path,
                        label=label, model="a DiT of the sizes it implies")
    return flat, sizes, label


def convert_dit(path: str, out: str, *, image_size: int | None = None, num_heads: int | None = None,
                vae: str = "") -> str:
    """Converts a DiT checkpoint at ``path`` into the run directory ``out`` (``config.json`` and a
    checkpoint at step 0); ``vae`` (the converted SD-VAE file) is recorded as
    ``model.autoencoder.weights``. Returns a one-line summary.

    Raises:
      files.WeightsError: an unreadable or foreign file, or ``out`` already holding checkpoints.
    """
    flat, sizes, label = convert_state_dict(files.read_state_dict(path), path, image_size=image_size,
                                            num_heads=num_heads)
    directory = storage.path(out)
    if checkpoints.checkpoint_directory(directory).exists():
        raise files.WeightsError(f"{out} already holds checkpoints: convert into a new directory")
    directory.mkdir(parents=True, exist_ok=True)
    write_config(directory, run_config(sizes, vae))
    checkpoints.save_params(directory, traverse_util.unflatten_dict(flat, sep="/"))
    count = sum(int(a.size) for a in flat.values())
    return (f"wrote {out}: DiT from {label} {os.path.basename(str(path))}: depth {sizes['depth']}, width "
            f"{sizes['width']}, {sizes['num_heads']} heads, patch {sizes['patch_size']}, {sizes['image_size']} px, "
            f"{count:,} parameters")
