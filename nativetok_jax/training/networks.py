"""The frozen pretrained networks an objective uses (LPIPS, the proxy-code VQGAN), loaded once.

Their graphs are static and their arrays are an argument of the jitted train step (replicated
over the mesh), not constants baked into the compiled program, so a 100 MB network costs no
compile time. Which networks are loaded follows from the config; each comes from the file the
config names (``config.pretrained``), converted beforehand with ``python -m nativetok_jax.convert``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from nativetok_jax.models.frozen.lpips import LPIPS
from nativetok_jax.models.nativetok.proxy import ProxyPixelDecoder
from nativetok_jax.models.frozen.vqgan import VQGAN, VQGANConfig

from nativetok_jax.pretrained.lpips import load_lpips
from nativetok_jax.pretrained.proxy import load_proxy_decoder, weights_path



@dataclasses.dataclass(frozen=True)
class FrozenNetworks:
    """Graph definitions (static) and arrays (a jit argument) of the networks, by name."""

    graphdefs: dict[str, nnx.GraphDef]
    arrays: dict[str, Any]

    def __contains__(self, name: str) -> bool:
        return name in self.graphdefs

    def module(self, arrays: dict[str, Any], name: str) -> nnx.Module:
        """The network ``name`` rebuilt from ``arrays`` (the step's traced copy of ``self.arrays``)."""
        return nnx.merge(self.graphdefs[name], arrays[name])

    def shardings(self, mesh: jax.sharding.Mesh) -> dict[str, Any]:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return jax.tree.map(lambda _: replicated, self.arrays)

    def placed(self, mesh: jax.sharding.Mesh) -> FrozenNetworks:
        return dataclasses.replace(self, arrays=jax.device_put(self.arrays, self.shardings(mesh)))


def needs_lpips(config: ml_collections.ConfigDict) -> bool:
    return config.train.losses.perceptual_weight > 0


def needs_vqgan(config: ml_collections.ConfigDict) -> bool:
    return (config.model.get("decoder") or {}).get("head") == "proxy_codes"  # a DVAE has no proxy head


def load_networks(config: ml_collections.ConfigDict, *, random_weights: bool = False) -> FrozenNetworks:
    """Loads every pretrained network the objective needs (none for a pixel-loss-only run).

    ``random_weights`` builds them randomly initialised instead of reading files: for
    benchmarks, whose timings do not depend on the weights' values.
    """
    modules: dict[str, nnx.Module] = {}
    dtype = jnp.dtype(config.model.dtype)
    if needs_lpips(config):
        modules["lpips"] = (LPIPS(rngs=nnx.Rngs(0), dtype=dtype) if random_weights else
                            load_lpips(weights_path(config, "lpips", "train.losses.perceptual_weight > 0"), dtype=dtype))
    if needs_vqgan(config):
        if random_weights:
            vqgan = VQGAN(VQGANConfig(codebook_size=config.model.decoder.proxy_codebook_size), rngs=nnx.Rngs(0))
            modules["proxy"] = ProxyPixelDecoder(vqgan, config.model.decoder.proxy_decoding)
        else:
            modules["proxy"] = load_proxy_decoder(config)
    graphdefs, arrays = {}, {}
    for name, module in modules.items():
        graphdefs[name], arrays[name] = nnx.split(module)
    return FrozenNetworks(graphdefs, arrays)
