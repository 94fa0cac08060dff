"""Converts TiTok's released tokenizers (Yu et al. 2024, bytedance/1d-tokenizer) into a run directory
that ``evaluate`` and ``Tokenizer.from_checkpoint`` read.

The input is the state dict of ``modeling/titok.py``'s ``TiTok`` as released (TiTok-L-32, B-64,
S-128: ``tokenizer_titok_l32.bin`` or the Hugging Face ``model.safetensors`` of
``yucornetto/tokenizer_titok_l32_imagenet`` and its B-64 / S-128 siblings), the stage-2 model with
its ``finetune_decoder`` parts:

- ``latent_tokens`` ``[L, W]`` and ``encoder.*`` (``modeling/modules/blocks.py`` ``TiTokEncoder``):
  ``patch_embed`` (a conv, OIHW), ``class_embedding`` ``[1, W]``, ``positional_embedding``
  ``[g*g + 1, W]``, ``latent_token_positional_embedding``, ``ln_pre``, ``transformer.{i}`` (CLIP's
  ``ResidualAttentionBlock``: ``ln_1``, ``attn.in_proj_weight/bias`` (q, k, v stacked),
  ``attn.out_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``), ``ln_post`` and ``conv_out`` (1x1);
- ``quantize.embedding.weight``: the l2-normalised codebook;
- ``decoder.*`` (``TiTokDecoder``, the legacy one): ``decoder_embed``, ``class_embedding``,
  ``positional_embedding``, ``mask_token``, ``latent_token_positional_embedding``, ``ln_pre``,
  ``transformer.{i}``, ``ln_post`` and ``ffn.{0,2}`` (1x1 convs with tanh between: logits over the
  1024 MaskGIT-VQGAN codes);
- ``pixel_quantize.embedding.weight`` and ``pixel_decoder.*``: the MaskGIT VQGAN's codebook and
  decoder, fine-tuned with TiTok's stage 2 (so not the MaskGIT release's).

What differs from our TiTok is folded into the weights or named in the config
(:func:`nativetok_jax.config.titok_release_config`): TiTok reads images in [0, 1], ours in [-1, 1],
so the patch embedding absorbs ``x01 = (x + 1) / 2``; the latent tokens' positions are added to
them; the encoder's ``is_legacy`` reshape is ``model.legacy_token_layout``; PyTorch's LayerNorm
epsilon is ``model.norm_epsilon = 1e-5``; ``ffn`` is the decoder head with ``head_hidden``;
the decoder's ``hidden_token`` (our decoding from a prefix of the tokens, which TiTok has not) is
zero. The VQGAN decoder goes to ``OUT/pixel_decoder.npz`` (a ``maskgit_vqgan`` file whose encoder
is zero: TiTok's checkpoint has none), named by ``config.pretrained.maskgit_vqgan``.

TiTok's non-legacy tokenizers (the VQ-8k and VAE ones, with a pixel head) are not handled: their
files are refused with a one-line error.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
from flax import nnx, traverse_util

from nativetok_jax.workdir import write_config
from nativetok_jax import checkpoints, storage
from nativetok_jax.config import TITOK_VIT_SIZES, ConfigError, titok_release_config
from nativetok_jax.models.nativetok import build_model
from nativetok_jax.models.frozen.vqgan import VQGANConfig
from nativetok_jax.pretrained import files
from nativetok_jax.pretrained.maskgit_vqgan import KIND as VQGAN_KIND
from nativetok_jax.pretrained.maskgit_vqgan import _expected_shapes as vqgan_shapes
from nativetok_jax.pretrained.maskgit_vqgan import _map, _strip_prefix, port_name

SOURCE = "bytedance/1d-tokenizer TiTok"
PIXEL_DECODER_FILE = "pixel_decoder.npz"
_ANCHOR = "quantize.embedding.weight"
_BLOCK = {  # our block parameter -> the name inside CLIP's ResidualAttentionBlock
    "attention_norm/scale": "ln_1.weight", "attention_norm/bias": "ln_1.bias",
    "mlp_norm/scale": "ln_2.weight", "mlp_norm/bias": "ln_2.bias",
    "mlp/fc1/kernel": "mlp.c_fc.weight", "mlp/fc1/bias": "mlp.c_fc.bias",
    "mlp/fc2/kernel": "mlp.c_proj.weight", "mlp/fc2/bias": "mlp.c_proj.bias",
    "attention/out": "attn.out_proj.weight", "attention/out_bias": "attn.out_proj.bias",
    "attention/query": "attn.in_proj_weight", "attention/key": "attn.in_proj_weight",
    "attention/value": "attn.in_proj_weight", "attention/query_bias": "attn.in_proj_bias",
    "attention/key_bias": "attn.in_proj_bias", "attention/value_bias": "attn.in_proj_bias",
}
_NAMES = {  # our (non-block) parameter -> TiTok's name
    "encoder/embedding/projection/kernel": "encoder.patch_embed.weight",
    "encoder/embedding/projection/bias": "encoder.patch_embed.bias",
    "encoder/embedding/class_token": "encoder.class_embedding",
    "encoder/embedding/position": "encoder.positional_embedding",
    "encoder/latent_tokens": "latent_tokens",
    "encoder/input_norm/scale": "encoder.ln_pre.weight", "encoder/input_norm/bias": "encoder.ln_pre.bias",
    "token_head/norm/scale": "encoder.ln_post.weight", "token_head/norm/bias": "encoder.ln_post.bias",
    "token_head/projection/kernel": "encoder.conv_out.weight", "token_head/projection/bias": "encoder.conv_out.bias",
    "quantizer/codebook": "quantize.embedding.weight",
    "decoder/token_embedding/kernel": "decoder.decoder_embed.weight",
    "decoder/token_embedding/bias": "decoder.decoder_embed.bias",
    "decoder/token_position": "decoder.latent_token_positional_embedding",
    "decoder/class_token": "decoder.class_embedding",
    "decoder/patch_token": "decoder.mask_token",
    "decoder/grid_position": "decoder.positional_embedding",
    "decoder/input_norm/scale": "decoder.ln_pre.weight", "decoder/input_norm/bias": "decoder.ln_pre.bias",
    "decoder/output_norm/scale": "decoder.ln_post.weight", "decoder/output_norm/bias": "decoder.ln_post.bias",
    "decoder/head_hidden/kernel": "decoder.ffn.0.weight", "decoder/head_hidden/bias": "decoder.ffn.0.bias",
    "decoder/head/kernel": "decoder.ffn.2.weight", "decoder/head/bias": "decoder.ffn.2.bias",
}
_HIDDEN_TOKEN = "decoder/hidden_token"


def _require(source: dict[str, np.ndarray], key: str, path: str, ndim: int) -> np.ndarray:
    if key not in source:
        raise files.WeightsError(f"{path} is not a TiTok tokenizer state dict: it has no '{key}'")
    if source[key].ndim != ndim:
        raise files.WeightsError(f"{path}: '{key}' has shape {tuple(source[key].shape)}, expected {ndim} dimensions")
    return source[key]


def _vit(source: dict[str, np.ndarray], tower: str, path: str) -> dict[str, Any]:
    """Width, depth, heads and MLP ratio of ``encoder`` or ``decoder``."""
    width = int(_require(source, f"{tower}.class_embedding", path, 2).shape[-1])
    depth = len({m.group(1) for k in source if (m := re.match(rf"{tower}\.transformer\.(\d+)\.", k))})
    if depth == 0:
        raise files.WeightsError(f"{path} is not a TiTok tokenizer state dict: it has no '{tower}.transformer.0'")
    heads = next((h for w, _, h in TITOK_VIT_SIZES.values() if w == width), width // 64)
    if heads < 1 or width % heads:
        raise files.WeightsError(f"{path}: a {tower} of width {width} is none of TiTok's ViT sizes")
    fc = _require(source, f"{tower}.transformer.0.mlp.c_fc.weight", path, 2)
    return dict(width=width, depth=depth, num_heads=heads, mlp_ratio=float(fc.shape[0]) / width)


def _vqgan_config(source: dict[str, np.ndarray], path: str) -> VQGANConfig:
    """The VQGAN of ``pixel_decoder.*`` (levels, blocks and widths read off the decoder)."""
    codebook = _require(source, "pixel_quantize.embedding.weight", path, 2)
    levels = len({m.group(1) for k in source if (m := re.match(r"pixel_decoder\.up\.(\d+)\.", k))})
    blocks = len({m.group(1) for k in source if (m := re.match(r"pixel_decoder\.up\.0\.block\.(\d+)\.", k))})
    if not levels or not blocks:
        raise files.WeightsError(f"{path} is not a TiTok tokenizer state dict: it has no 'pixel_decoder.up.0.block.0'")
    widths = [int(_require(source, f"pixel_decoder.up.{i}.block.0.conv2.weight", path, 4).shape[0])
              for i in range(levels)]
    image_channels = int(_require(source, "pixel_decoder.conv_out.weight", path, 4).shape[0])
    try:
        return VQGANConfig(filters=widths[0], num_res_blocks=blocks, channel_multipliers=[w // widths[0] for w in widths],
                           embedding_dim=int(codebook.shape[1]), codebook_size=int(codebook.shape[0]),
                           image_channels=image_channels)
    except ValueError as e:
        raise files.WeightsError(f"{path}: 'pixel_decoder' describes no MaskGIT VQGAN ({e})") from None


def run_config(source: dict[str, np.ndarray], path: str, pixel_decoder: str = ""):
    """The tokenizer config of the released TiTok in ``source`` (sizes read off the weights)."""
    encoder, decoder = _vit(source, "encoder", path), _vit(source, "decoder", path)
    patch = _require(source, "encoder.patch_embed.weight", path, 4)
    positions = _require(source, "encoder.positional_embedding", path, 2)
    latents = _require(source, "latent_tokens", path, 2)
    codebook = _require(source, _ANCHOR, path, 2)
    head = _require(source, "decoder.ffn.2.weight", path, 4)
    hidden = _require(source, "decoder.ffn.0.weight", path, 4)
    grid = int(round((positions.shape[0] - 1) ** 0.5))
    if grid * grid + 1 != positions.shape[0]:
        raise files.WeightsError(f"{path}: 'encoder.positional_embedding' has {positions.shape[0]} rows, not a "
                                 "square grid and a class token")
    config = titok_release_config()
    m = config.model
    m.num_tokens, m.patch_size, m.image_size = int(latents.shape[0]), int(patch.shape[2]), grid * int(patch.shape[2])
    m.quantizer.update(codebook_size=int(codebook.shape[0]), token_dim=int(codebook.shape[1]))
    m.encoder.update(**encoder)
    m.decoder.update(**decoder, head_hidden=int(hidden.shape[0]), proxy_codebook_size=int(head.shape[0]))
    config.pretrained.maskgit_vqgan = pixel_decoder
    return config


def _block_array(source: dict[str, np.ndarray], tower: str, key: str, i: int,
                 heads: int) -> tuple[str, np.ndarray | None]:
    part = key.split("/layers/", 1)[1]
    name = f"{tower}.transformer.{i}.{_BLOCK[part]}"
    if name not in source:
        return name, None
    value = np.asarray(source[name], np.float32)
    width = value.shape[-1] if value.ndim == 2 else value.shape[0] // 3
    if part.startswith("attention/") and part != "attention/out" and part != "attention/out_bias":
        if value.shape[0] != 3 * width:
            return name, value
        chunk = np.split(value, 3)[("query", "key", "value").index(part.split("/")[1].removesuffix("_bias"))]
        return name, chunk.reshape(heads, -1) if part.endswith("_bias") else chunk.T.reshape(width, heads, -1)
    if part == "attention/out":
        return name, value.T.reshape(heads, -1, value.shape[0]) if value.ndim == 2 else value
    return name, value.T if part.endswith("/kernel") and value.ndim == 2 else value


def _array(source: dict[str, np.ndarray], key: str) -> tuple[str, np.ndarray | None]:
    name = _NAMES[key]
    if name not in source:
        return name, None
    value = np.asarray(source[name], np.float32)
    if key == "encoder/embedding/projection/kernel" and value.ndim == 4:
        # [W, 3, p, p] -> [(p q c), W], halved: TiTok's patch embedding reads [0, 1], ours [-1, 1].
        return name, value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0]) / 2
    if key == "encoder/embedding/projection/bias":
        kernel = source.get(_NAMES["encoder/embedding/projection/kernel"])
        return name, value if kernel is None else value + 0.5 * np.asarray(kernel, np.float32).sum(axis=(1, 2, 3))
    if key == "encoder/latent_tokens":
        positions = source.get("encoder.latent_token_positional_embedding")
        return name, None if positions is None or positions.shape != value.shape else value + positions
    if key in ("encoder/embedding/class_token", "decoder/class_token", "decoder/patch_token"):
        return name, value.reshape(-1)
    if key.endswith("/kernel") and value.ndim == 4 and value.shape[2:] == (1, 1):  # 1x1 convs
        return name, value[:, :, 0, 0].T
    return name, value.T if key.endswith("/kernel") and value.ndim == 2 else value


def convert_state_dict(source: dict[str, np.ndarray], path: str) -> tuple[dict[str, np.ndarray], Any,
                                                                           dict[str, np.ndarray], VQGANConfig]:
    """TiTok's arrays -> (our tokenizer's flat arrays, its config, the VQGAN's flat arrays, its config).

    Raises:
      files.WeightsError: not a released TiTok tokenizer, or arrays that do not fit the sizes read
        off it (one line naming the file and the keys).
    """
    source = _strip_prefix(source, "latent_tokens")
    if "decoder.conv_out.weight" in source:
        raise files.WeightsError(f"{path} is a non-legacy TiTok (a pixel-head decoder: 'decoder.conv_out.weight'); "
                                 "only the released L-32, B-64 and S-128 tokenizers convert")
    config = run_config(source, path)
    try:
        abstract = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0)))
    except ConfigError as e:  # sizes read off the file that make no tokenizer of ours
        raise files.WeightsError(f"{path}: {e}") from None
    expected = {"/".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    towers = {"encoder": config.model.encoder, "decoder": config.model.decoder}

    def fetch(key: str, i: int | None) -> tuple[str, np.ndarray | None]:
        if i is not None:
            tower = key.split("/")[0]
            return _block_array(source, tower, key, i, towers[tower].num_heads)
        if key == _HIDDEN_TOKEN:
            return key, np.zeros(expected[key], np.float32)
        return _array(source, key)

    extra = ("encoder.latent_token_positional_embedding",)  # added to latent_tokens
    flat = files.gather(expected, source, fetch,
                        depth=lambda key: towers[key.split("/")[0]].depth if "/blocks/" in key else 0,
                        ignored=lambda name: name in extra or name.startswith(("pixel_decoder.", "pixel_quantize.")),
                        path=path, label=SOURCE, model="a TiTok tokenizer of the sizes it implies")
    vqgan_config = _vqgan_config(source, path)
    shapes = vqgan_shapes(vqgan_config)
    vqgan = _map({k: v for k, v in source.items() if k.startswith("pixel_")},
                 {k: v for k, v in shapes.items() if not k.startswith("encoder/")}, lambda key: "pixel_" + port_name(key),
                 lambda key, value: value.transpose(2, 3, 1, 0) if value.ndim == 4 else value, path,
                 f"{SOURCE} pixel_decoder")
    vqgan.update({k: np.zeros(v, np.float32) for k, v in shapes.items() if k.startswith("encoder/")})  # TiTok has none
    return flat, config, vqgan, vqgan_config


def convert_titok(path: str, out: str) -> str:
    """Converts a released TiTok tokenizer at ``path`` into the run directory ``out``
    (``config.json``, a checkpoint at step 0 and ``pixel_decoder.npz``). Returns a one-line summary.

    Raises:
      files.WeightsError: an unreadable or foreign file, or ``out`` already holding checkpoints.
    """
    flat, config, vqgan, vqgan_config = convert_state_dict(files.read_state_dict(path), path)
    directory = storage.path(out)
    if checkpoints.checkpoint_directory(directory).exists():
        raise files.WeightsError(f"{out} already holds checkpoints: convert into a new directory")
    directory.mkdir(parents=True, exist_ok=True)
    pixel_decoder = str(directory / PIXEL_DECODER_FILE)
    files.save_weights(pixel_decoder, vqgan, kind=VQGAN_KIND, source=f"{SOURCE} pixel_decoder (no encoder: zeros)",
                       source_file=os.path.basename(str(path)), config=vqgan_config.to_dict())
    config.pretrained.maskgit_vqgan = pixel_decoder
    write_config(directory, config)
    checkpoints.save_params(directory, traverse_util.unflatten_dict(flat, sep="/"))
    m = config.model
    return (f"wrote {out}: TiTok from {os.path.basename(str(path))}: {m.num_tokens} tokens, encoder "
            f"{m.encoder.depth} x {m.encoder.width}, decoder {m.decoder.depth} x {m.decoder.width}, codebook "
            f"{m.quantizer.codebook_size} x {m.quantizer.token_dim}, {sum(int(a.size) for a in flat.values()):,} "
            "parameters (and the VQGAN decoder)")
