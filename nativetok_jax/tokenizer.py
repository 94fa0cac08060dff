"""The public tokenizer: uint8 images in, int32 token ids out, and back.

    tok = Tokenizer.from_config(config, seed=0)
    ids = tok.encode(images)          # uint8 [B, H, W, 3] -> int32 [B, L]
    images = tok.decode(ids[:, :4])   # the first k <= L tokens -> uint8 [B, H, W, 3]

Encode and decode are jitted once per input shape. Parameters live on the config's mesh,
sharded by its logical-axis rules; ``tok.params`` is a plain nested dict of arrays and
``tok.with_params`` swaps it (after checking every name and shape).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from nativetok_jax import checkpoints, sharding
from nativetok_jax.config import unfitted_codebook
from nativetok_jax.models.nativetok import Autoencoder, build_model, colour_id_count, id_count
from nativetok_jax.models.pixels import images_to_model, model_to_images
from nativetok_jax.pretrained import directory as pretrained_directory
from nativetok_jax.pretrained.proxy import load_proxy_decoder

# Maps proxy-code logits [B, h, w, K] to images [B, H, W, 3] in [-1, 1]: an NNX module such as
# models.proxy.ProxyPixelDecoder (a VQGAN decoder), whose arrays are passed to the jitted decode.
ProxyDecoder = nnx.Module


def preview_lengths(num_tokens: int, ratio: int = 4) -> list[int]:
    """Prefix lengths for coarse-to-fine previews: 1, 4, 16, 64, ... and finally ``num_tokens``
    (``ratio=2``: 1, 2, 4, ..., the lengths of the rate-distortion curve)."""
    lengths, k = [], 1
    while k < num_tokens:
        lengths.append(k)
        k *= ratio
    return lengths + [num_tokens]


@dataclasses.dataclass(frozen=True)
class _Compiled:
    """What every tokenizer built from one config shares: the graph, mesh and jitted functions."""

    config: ml_collections.ConfigDict
    graphdef: nnx.GraphDef
    mesh: jax.sharding.Mesh
    rules: sharding.Rules
    shardings: sharding.Params
    shapes: sharding.Params  # ShapeDtypeStructs of the parameters
    axes: sharding.Params  # their logical axis names
    encode: Callable[..., jax.Array]
    decode: Callable[..., jax.Array]
    reconstruct_continuous: Callable[..., jax.Array]


def _compile(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None) -> _Compiled:
    """The graph, shardings and jitted functions of ``config``'s tokenizer (no parameters yet)."""
    model_config = config.model
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    rules = sharding.rules_of(config)
    abstract = nnx.eval_shape(lambda: build_model(model_config, nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)

    def encode(params: sharding.Params, images: jax.Array) -> jax.Array:
        model: Autoencoder = nnx.merge(graphdef, params)
        return model.encode_ids(images_to_model(images))

    def decode(params: sharding.Params, ids: jax.Array, proxy_graphdef: nnx.GraphDef | None, proxy_state: Any) -> jax.Array:
        model: Autoencoder = nnx.merge(graphdef, params)
        num_visible = ids.shape[1]
        padded = jnp.pad(ids, ((0, 0), (0, id_count(model_config) - num_visible)))
        out = model.decode_ids(padded, num_visible)
        if model_config.decoder.head == "proxy_codes":
            out = nnx.merge(proxy_graphdef, proxy_state)(out)
        return model_to_images(out)

    def reconstruct_continuous(params: sharding.Params, images: jax.Array) -> jax.Array:
        model: Autoencoder = nnx.merge(graphdef, params)
        out, _ = model(images_to_model(images), quantize=False)
        return model_to_images(out)

    return _Compiled(
        config=config,
        graphdef=graphdef,
        mesh=mesh,
        rules=rules,
        shardings=sharding.param_shardings(abstract, mesh, rules),
        shapes=sharding.params_of(abstract),
        axes=sharding.param_axes(abstract),
        encode=jax.jit(encode),
        decode=jax.jit(decode, static_argnums=2),
        reconstruct_continuous=jax.jit(reconstruct_continuous),
    )


class Tokenizer:
    """A NativeTok (or TiTok-baseline) tokenizer with its parameters."""

    def __init__(self, compiled: _Compiled, params: sharding.Params | None, proxy_decoder: ProxyDecoder | None = None):
        self._compiled = compiled
        self._params = params
        self._proxy_decoder = proxy_decoder
        self._proxy = (None, None)
        if proxy_decoder is not None:
            proxy_graphdef, proxy_state = nnx.split(proxy_decoder)
            replicated = jax.sharding.NamedSharding(compiled.mesh, jax.sharding.PartitionSpec())
            self._proxy = (proxy_graphdef, jax.device_put(proxy_state, replicated))

    @classmethod
    def from_config(
        cls,
        config: ml_collections.ConfigDict,
        seed: int = 0,
        *,
        mesh: jax.sharding.Mesh | None = None,
        proxy_decoder: ProxyDecoder | None = None,
    ) -> Tokenizer:
        """A freshly initialised tokenizer for ``config`` (``config.model``, ``config.mesh``).

        ``proxy_decoder`` turns proxy-code logits into pixels; only the ``proxy_codes`` head needs it.
        """
        compiled = _compile(config, mesh)
        _, params, _ = sharding.init_sharded(
            lambda r: build_model(config.model, r), seed, compiled.mesh, compiled.rules
        )
        return cls(compiled, params, proxy_decoder)

    @classmethod
    def from_params(
        cls,
        config: ml_collections.ConfigDict,
        params: sharding.Params,
        *,
        mesh: jax.sharding.Mesh | None = None,
        proxy_decoder: ProxyDecoder | None = None,
    ) -> Tokenizer:
        """A tokenizer for ``config`` with the given parameters (checked, then placed on the mesh)."""
        return cls(_compile(config, mesh), None, proxy_decoder).with_params(params)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        use_ema: bool = True,
        mesh: jax.sharding.Mesh | None = None,
        proxy_decoder: ProxyDecoder | None = None,
    ) -> Tokenizer:
        """The tokenizer in the newest checkpoint of a training workdir or of one stage's directory
        (local, or a URL such as ``gs://bucket/run``).

        Uses the EMA weights when the run kept them (and ``use_ema``); the architecture comes from
        the ``config.json`` the run wrote beside its checkpoints. A proxy-code model loads its
        VQGAN from the file the run's ``config.pretrained.maskgit_vqgan`` names, unless one is given.
        Raises ``checkpoints.RunDirectoryError`` (one line) for a run without a finished checkpoint
        or whose newest one comes before the quantiser warm-up's end (its codebook is not fitted).
        """
        stage = checkpoints.final_stage_directory(path)
        config = checkpoints.read_config(stage)
        reason = unfitted_codebook(config.get("train"), checkpoints.latest_step(stage))
        if reason:  # a generator trained on such ids, or samples decoded by it, would be noise
            raise checkpoints.RunDirectoryError(f"{path}: {reason}")
        compiled = _compile(config, mesh)
        # Restored straight into their shardings: no host holds more than its devices' shards.
        params, _ = checkpoints.load_params(stage, use_ema=use_ema, placement=sharding.restore_placement(
            compiled.axes, compiled.mesh, compiled.rules))
        if config.model.decoder.head == "proxy_codes" and proxy_decoder is None:
            proxy_decoder = load_proxy_decoder(config)
        return cls(compiled, None, proxy_decoder).with_params(params)

    @classmethod
    def from_pretrained(
        cls,
        directory: str,
        *,
        mesh: jax.sharding.Mesh | None = None,
        proxy_decoder: ProxyDecoder | None = None,
    ) -> Tokenizer:
        """The tokenizer that :meth:`save_pretrained` wrote to ``directory`` (``config.json`` and
        ``model.safetensors``; no orbax checkpoint, no run directory). A proxy-code model loads
        its VQGAN from the file its config names, unless one is given. Raises ``WeightsError``
        (one line) for a missing or foreign file and ``ValueError`` for parameters that do not fit."""
        config, params, _ = pretrained_directory.load_pretrained(directory, kind="tokenizer")
        if config.model.decoder.head == "proxy_codes" and proxy_decoder is None:
            proxy_decoder = load_proxy_decoder(config)
        return cls.from_params(config, params, mesh=mesh, proxy_decoder=proxy_decoder)

    def save_pretrained(self, directory: str) -> None:
        """Writes ``directory/config.json`` (this tokenizer's config) and ``model.safetensors``
        (its parameters, float32, named ``mit/...``, ``experts/...``): what :meth:`from_pretrained`
        and any safetensors reader load. On several hosts every process calls it; process 0 writes."""
        pretrained_directory.save_pretrained(directory, kind="tokenizer", config=self.config, params=self._params,
                               image_size=self.image_size, num_tokens=self.num_tokens,
                               codebook_size=self.codebook_size)

    # ----------------------------------------------------------------------------- properties

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self._compiled.config

    @property
    def image_size(self) -> int:
        return self.config.model.image_size

    @property
    def num_tokens(self) -> int:
        """The code's length L: ``model.num_tokens`` learned ids, plus the mean colour's in front with
        ``model.shortcut = "mean_colour"`` (2 for a 4,096-code book; models/nativetok/mean_colour.py)."""
        return id_count(self.config.model)

    @property
    def colour_ids(self) -> int:
        """How many of the code's first ids carry the mean colour (0 without the shortcut)."""
        return colour_id_count(self.config.model)

    @property
    def codebook_size(self) -> int:
        return self.config.model.quantizer.codebook_size

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self._compiled.mesh

    @property
    def params(self) -> sharding.Params:
        """The parameters: a nested dict (``mit``, ``experts``, ``quantizer``, ``decoder``, ...)."""
        return self._params

    @property
    def model(self) -> Autoencoder:
        """The Flax module with these parameters, for code that needs more than ids."""
        return nnx.merge(self._compiled.graphdef, self._params)

    def with_params(self, params: sharding.Params) -> Tokenizer:
        """The same tokenizer with other parameters (same names and shapes, else ``ValueError``)."""
        placed = sharding.place_params(params, self._compiled.shapes, self._compiled.shardings, "tokenizer")
        return Tokenizer(self._compiled, placed, self._proxy_decoder)

    def with_mesh(self, mesh: jax.sharding.Mesh) -> Tokenizer:
        """The same tokenizer with its parameters placed on ``mesh`` (e.g. this process's own
        devices, to encode without the other hosts). Gathers every parameter to the host first:
        on several processes every one of them must call this together."""
        return Tokenizer.from_params(self.config, sharding.host_params(self._params), mesh=mesh,
                                     proxy_decoder=self._proxy_decoder)

    # ----------------------------------------------------------------------------- encode/decode

    def _run(self, fn: Callable[..., jax.Array], array: Any, *args: Any) -> jax.Array:
        return sharding.run_batched(lambda params, batch: fn(params, batch, *args), self.mesh,
                                    self._compiled.rules, self._params, array)

    def _check_images(self, images: Any, method: str) -> None:
        """Raises ``ValueError`` naming ``method`` unless ``images`` are uint8 ``[B, image_size, image_size, 3]``."""
        shape, dtype = np.shape(images), getattr(images, "dtype", None)
        expected = (self.image_size, self.image_size, 3)
        if len(shape) != 4 or tuple(shape[1:]) != expected or shape[0] < 1:
            raise ValueError(f"{method} expects images of shape [B, {', '.join(map(str, expected))}], got {tuple(shape)}")
        if dtype != np.uint8:
            raise ValueError(f"{method} expects uint8 images (0..255), got dtype {dtype}")

    def encode(self, images: Any) -> jax.Array:
        """uint8 images ``[B, image_size, image_size, 3]`` -> int32 token ids ``[B, num_tokens]``."""
        self._check_images(images, "encode")
        return self._run(self._compiled.encode, images)

    def decode(self, ids: Any) -> jax.Array:
        """Token ids ``[B, k]`` (the first ``k <= num_tokens`` tokens) -> uint8 images ``[B, H, W, 3]``."""
        shape, dtype = np.shape(ids), getattr(ids, "dtype", None)
        if len(shape) != 2 or shape[0] < 1:
            raise ValueError(f"decode expects token ids of shape [B, k], got {tuple(shape)}")
        if not 1 <= shape[1] <= self.num_tokens:
            raise ValueError(f"decode expects 1 <= k <= {self.num_tokens} tokens, got k={shape[1]}")
        if dtype is None or not np.issubdtype(dtype, np.integer):
            raise ValueError(f"decode expects integer token ids, got dtype {dtype}")
        low, high = int(np.min(ids)), int(np.max(ids))
        if low < 0 or high >= self.codebook_size:
            raise ValueError(f"token ids must lie in [0, {self.codebook_size}), got values in [{low}, {high}]")
        if self.config.model.decoder.head == "proxy_codes" and self._proxy_decoder is None:
            raise ValueError("model.decoder.head='proxy_codes' needs a VQGAN decoder: pass proxy_decoder=")
        return self._run(self._compiled.decode, jnp.asarray(ids, jnp.int32), *self._proxy)

    def reconstruct(self, images: Any, num_tokens: int | None = None) -> jax.Array:
        """``decode(encode(images)[:, :num_tokens])``: the round trip, optionally from a prefix."""
        ids = self.encode(images)
        return self.decode(ids[:, : num_tokens or self.num_tokens])

    def reconstruct_continuous(self, images: Any) -> jax.Array:
        """uint8 images ``[B, image_size, image_size, 3]`` through the continuous (l2-normalised,
        unquantised) tokens, all of them: what the quantiser's warm-up trains (the model's
        ``quantize=False``). Raises ``ValueError`` for a pixel-less head (``proxy_codes``) or images of
        another shape or dtype."""
        if self.config.model.decoder.head == "proxy_codes":
            raise ValueError("reconstruct_continuous needs a pixel head; model.decoder.head is 'proxy_codes'")
        self._check_images(images, "reconstruct_continuous")
        return self._run(self._compiled.reconstruct_continuous, images)
