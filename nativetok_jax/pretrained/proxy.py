"""The proxy-code decoder of a config: its MaskGIT VQGAN, loaded from ``config.pretrained``."""

from __future__ import annotations

import ml_collections

from nativetok_jax import storage
from nativetok_jax.config import ConfigError
from nativetok_jax.models.nativetok.proxy import ProxyPixelDecoder
from nativetok_jax.pretrained.maskgit_vqgan import load_maskgit_vqgan


def weights_path(config: ml_collections.ConfigDict, name: str, why: str) -> str:
    """``config.pretrained.<name>``, checked to name an existing file (one-line ConfigError)."""
    path = config.get("pretrained", {}).get(name, "")
    if not path:
        raise ConfigError(f"config.pretrained.{name}: {why} needs a weights file; convert one with "
                          f"`python -m nativetok_jax.convert` and name it here")
    if not storage.path(path).is_file():
        raise ConfigError(f"config.pretrained.{name}: file not found: {path}")
    return path


def load_proxy_decoder(config: ml_collections.ConfigDict) -> ProxyPixelDecoder:
    """The VQGAN behind the proxy-code head, decoding as ``model.decoder.proxy_decoding`` says."""
    vqgan = load_maskgit_vqgan(weights_path(config, "maskgit_vqgan", "model.decoder.head='proxy_codes'"))
    model = config.model
    if vqgan.codebook_size != model.decoder.proxy_codebook_size:
        raise ConfigError(f"config.model.decoder.proxy_codebook_size: {model.decoder.proxy_codebook_size}, "
                          f"but the VQGAN has {vqgan.codebook_size} codes")
    grid = model.image_size // model.patch_size
    if model.image_size // vqgan.downsample_factor != grid:
        raise ConfigError(f"config.model.patch_size: the decoder predicts a {grid}x{grid} code grid, the VQGAN "
                          f"needs {model.image_size // vqgan.downsample_factor}x{model.image_size // vqgan.downsample_factor}")
    return ProxyPixelDecoder(vqgan, model.decoder.proxy_decoding)
