"""The public Dynamic VAE: uint8 images in, fine-grid latents and a grain map out, and back.

    vae = DVAE.from_config(config, seed=0)        # config: nativetok_jax.config.dvae_config()
    vae = DVAE.from_checkpoint(workdir)           # a trained run (task="dvae"), its latent scale included
    vae.save_pretrained("exported/dvae")          # config.json + model.safetensors (+ thresholds.json)
    vae = DVAE.from_pretrained("exported/dvae")
    latents, grains = vae.encode(images)          # uint8 [B, H, W, 3] -> float32 [B, h, w, C], int32 [B, H/S, W/S]
    images = vae.decode(latents, grains)          # -> uint8 [B, H, W, 3]
    z = latents * vae.latent_scale               # what a diffusion model sees (unit variance)

``h = H / (f/2)`` (the fine grid), ``S = f`` (the coarse factor); grain 1 = fine, 0 = coarse, and a
coarse region's 2x2 cells hold copies of one code (docs/d2it.md, neighbour copying). Encode and
decode are jitted once per input shape; parameters live on the config's mesh, sharded by its
logical-axis rules. The router (``vae.router``) is the config's: entropy thresholds from the
file ``model.grain.thresholds`` names, or a fixed-grain mode ("fine", "coarse", "random").
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from nativetok_jax import checkpoints, sharding, storage
from nativetok_jax.config import validate_dvae_model
from nativetok_jax.models.d2it import grain_router
from nativetok_jax.models.d2it.dvae import DVAEConfig, DynamicVAE, sample_latents
from nativetok_jax.models.pixels import images_to_model, model_to_images
from nativetok_jax.pretrained import directory as pretrained_directory

LATENT_SCALE_FILE = "latent_scale.json"  # written by the trainer beside the checkpoints
THRESHOLDS_FILE = "thresholds.json"  # an export's copy of the entropy thresholds its router reads
TASK = "dvae"  # the config.task of the runs from_checkpoint loads (tasks.TASKS)


@dataclasses.dataclass(frozen=True)
class _Compiled:
    """What every DVAE built from one config shares: the graph, router, mesh and jitted functions."""

    config: ml_collections.ConfigDict
    model_config: DVAEConfig
    router: grain_router.GrainRouter
    graphdef: nnx.GraphDef
    mesh: jax.sharding.Mesh
    rules: sharding.Rules
    shardings: sharding.Params
    shapes: sharding.Params
    axes: sharding.Params  # the parameters' logical axis names
    encode: Callable[..., Any]
    decode: Callable[..., jax.Array]


def _compile(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None) -> _Compiled:
    validate_dvae_model(config.model)
    model_config = DVAEConfig.from_model_config(config.model)
    router = model_config.router()
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    rules = sharding.rules_of(config)
    abstract = nnx.eval_shape(lambda: DynamicVAE(model_config, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)

    def encode(params: sharding.Params, images: jax.Array, grains: jax.Array | None, key: jax.Array,
               sample: bool) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        model: DynamicVAE = nnx.merge(graphdef, params)
        route_key, sample_key = jax.random.split(key)
        grains = router(images, route_key) if grains is None else grains
        posterior = model.posterior(images_to_model(images), grains)
        latents = sample_latents(posterior, grains, sample_key) if sample else posterior.mean
        return latents, grains, posterior.mean, posterior.logvar

    def decode(params: sharding.Params, latents: jax.Array, grains: jax.Array) -> jax.Array:
        model: DynamicVAE = nnx.merge(graphdef, params)
        return model_to_images(model.decode(latents, grains))

    return _Compiled(
        config=config, model_config=model_config, router=router, graphdef=graphdef, mesh=mesh, rules=rules,
        shardings=sharding.param_shardings(abstract, mesh, rules), shapes=sharding.params_of(abstract), axes=sharding.param_axes(abstract),
        encode=jax.jit(encode, static_argnames="sample"), decode=jax.jit(decode),
    )


def _list_keys(tree: Any) -> Any:
    """A restored parameter tree with the integer keys of ``nnx.List`` layers back (orbax stores
    every dict key as a string)."""
    if not isinstance(tree, dict):
        return tree
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _list_keys(v) for k, v in tree.items()}


def _key(seed: int | jax.Array) -> jax.Array:
    return jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed


class DVAE:
    """A Dynamic VAE with its parameters, router and latent scale."""

    def __init__(self, compiled: _Compiled, params: sharding.Params | None, latent_scale: float = 1.0):
        self._compiled = compiled
        self._params = params
        self._latent_scale = float(latent_scale)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, seed: int = 0, *,
                    mesh: jax.sharding.Mesh | None = None) -> DVAE:
        """A freshly initialised DVAE for ``config`` (``config.model``, ``config.mesh``); latent scale 1.

        Raises ``ConfigError`` for a bad model field, ``GrainError`` for a missing thresholds file
        or one measured with other entropy settings.
        """
        compiled = _compile(config, mesh)
        _, params, _ = sharding.init_sharded(
            lambda r: DynamicVAE(compiled.model_config, rngs=r), seed, compiled.mesh, compiled.rules)
        return cls(compiled, params)

    @classmethod
    def from_params(cls, config: ml_collections.ConfigDict, params: sharding.Params, *, latent_scale: float = 1.0,
                    mesh: jax.sharding.Mesh | None = None) -> DVAE:
        """A DVAE for ``config`` with the given parameters (checked, then placed on the mesh)."""
        return cls(_compile(config, mesh), None, latent_scale).with_params(params)

    @classmethod
    def from_checkpoint(cls, path: str | Any, *, use_ema: bool = True,
                        mesh: jax.sharding.Mesh | None = None) -> DVAE:
        """The DVAE in the newest checkpoint of a ``task="dvae"`` workdir (local or a URL), with the
        latent scale the trainer stored beside it (``latent_scale.json``; 1.0 when the run has not
        finished, or when that file was measured at another step than the newest checkpoint's). EMA weights when the run kept them and ``use_ema``. Raises ``FileNotFoundError``
        for a directory without a config or checkpoints, ``ValueError`` for a run of another task."""
        config = checkpoints.read_config(path)
        if config.get("task") != TASK:
            raise ValueError(f"{path} holds a {config.get('task', 'tokenizer')!r} run, not a Dynamic VAE (task='dvae')")
        compiled = _compile(config, mesh)
        # Restored straight into their shardings: no host holds more than its devices' shards.
        params, step = checkpoints.load_params(path, use_ema=use_ema, placement=sharding.restore_placement(
            compiled.axes, compiled.mesh, compiled.rules))
        scale_file = storage.path(path) / LATENT_SCALE_FILE
        stored = json.loads(scale_file.read_text()) if scale_file.is_file() else {}
        scale = stored.get("latent_scale", 1.0)
        if stored.get("step", step) != step:  # measured on other weights: a finished run being extended
            logging.warning("%s: %s was measured at step %d, the newest checkpoint is step %d (the run goes on); "
                            "latent scale 1.0 until it finishes", path, LATENT_SCALE_FILE, stored["step"], step)
            scale = 1.0
        return cls(compiled, None, scale).with_params(_list_keys(params))

    @classmethod
    def from_pretrained(cls, directory: str, *, mesh: jax.sharding.Mesh | None = None) -> DVAE:
        """The DVAE :meth:`save_pretrained` wrote to ``directory``, with its latent scale and (entropy
        routing) the thresholds file saved beside it. Raises ``WeightsError`` (one line) for a
        missing or foreign file, ``ValueError`` for parameters that do not fit."""
        config, params, meta = pretrained_directory.load_pretrained(directory, kind="dvae")
        thresholds = storage.path(directory) / THRESHOLDS_FILE
        if thresholds.is_file():  # the router reads the export's copy, not the training run's file
            config.model.grain.thresholds = str(thresholds)
        return cls.from_params(config, _list_keys(params), latent_scale=meta["latent_scale"], mesh=mesh)

    def save_pretrained(self, directory: str) -> None:
        """Writes ``directory/config.json`` (config, ``latent_scale``), ``model.safetensors`` and, for
        entropy routing, a copy of the thresholds file as ``thresholds.json``: what
        :meth:`from_pretrained` loads. On several hosts every process calls it; process 0 writes."""
        pretrained_directory.save_pretrained(directory, kind="dvae", config=self.config, params=self._params,
                               latent_scale=self.latent_scale, image_size=self.image_size,
                               latent_shape=list(self.latent_shape), grain_map_shape=list(self.grain_map_shape))
        source = self.model_config.thresholds
        if source and jax.process_index() == 0:
            storage.write_bytes(storage.path(directory) / THRESHOLDS_FILE, storage.path(source).read_bytes())

    # ----------------------------------------------------------------------------- properties

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self._compiled.config

    @property
    def model_config(self) -> DVAEConfig:
        return self._compiled.model_config

    @property
    def router(self) -> grain_router.GrainRouter:
        return self._compiled.router

    @property
    def image_size(self) -> int:
        return self.model_config.image_size

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(h, w, C)`` of one image's fine-grid latent."""
        size = self.model_config.latent_size
        return (size, size, self.model_config.latent_channels)

    @property
    def grain_map_shape(self) -> tuple[int, int]:
        side = self.image_size // self.model_config.coarse_factor
        return (side, side)

    @property
    def latent_scale(self) -> float:
        """Multiply latents by this before diffusion (``1 / std`` of routed training latents; 1.0
        until a trainer has estimated it, see :func:`nativetok_jax.models.d2it.dvae.latent_scale_of`)."""
        return self._latent_scale

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self._compiled.mesh

    @property
    def params(self) -> sharding.Params:
        return self._params

    @property
    def model(self) -> DynamicVAE:
        """The Flax module with these parameters."""
        return nnx.merge(self._compiled.graphdef, self._params)

    def with_params(self, params: sharding.Params, latent_scale: float | None = None) -> DVAE:
        """The same DVAE with other parameters (same names and shapes, else ``ValueError``)."""
        placed = sharding.place_params(params, self._compiled.shapes, self._compiled.shardings, "DVAE")
        return DVAE(self._compiled, placed, self._latent_scale if latent_scale is None else latent_scale)

    def with_mesh(self, mesh: jax.sharding.Mesh) -> DVAE:
        """The same DVAE with its parameters placed on ``mesh`` (e.g. this process's own devices,
        to encode without the other hosts). Gathers every parameter to the host first: on several
        processes every one of them must call this together."""
        return DVAE.from_params(self.config, sharding.host_params(self._params), latent_scale=self._latent_scale,
                                mesh=mesh)

    # ----------------------------------------------------------------------------- encode/decode

    def _run(self, fn: Callable[..., Any], *arrays: Any, **static: Any) -> Any:
        return sharding.run_batched(fn, self.mesh, self._compiled.rules, self._params, *arrays, **static)

    def _check_images(self, images: Any) -> None:
        grain_router.check_images(images, self.model_config.coarse_factor)
        if tuple(np.shape(images)[1:3]) != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size} x {self.image_size} px, got {tuple(np.shape(images))}")

    def _check_grains(self, grains: Any, batch: int) -> jax.Array:
        shape = np.shape(grains)
        if shape != (batch, *self.grain_map_shape):
            raise ValueError(f"grain map must have shape {(batch, *self.grain_map_shape)}, got {tuple(shape)}")
        dtype = getattr(grains, "dtype", None)
        if dtype is None or not np.issubdtype(dtype, np.integer):
            raise ValueError(f"grain map must hold integers (0 coarse, 1 fine), got dtype {dtype}")
        low, high = int(np.min(grains)), int(np.max(grains))
        if low < 0 or high > 1:
            raise ValueError(f"grain map values must be 0 (coarse) or 1 (fine), got values in [{low}, {high}]")
        return jnp.asarray(grains, jnp.int32)

    def posterior(self, images: Any, grains: Any = None, *, seed: int | jax.Array = 0
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """uint8 images -> (mean, log-variance ``[B, h, w, C]``, grain map): the routed posterior.

        ``grains`` overrides the router; ``seed`` drives random routing."""
        self._check_images(images)
        grains = None if grains is None else self._check_grains(grains, np.shape(images)[0])
        _, grains, mean, logvar = self._run(self._compiled.encode, images, grains, _key(seed), sample=False)
        return mean, logvar, grains

    def encode(self, images: Any, grains: Any = None, *, sample: bool = False, seed: int | jax.Array = 0
               ) -> tuple[jax.Array, jax.Array]:
        """uint8 images ``[B, H, W, 3]`` -> (float32 latents ``[B, h, w, C]`` on the fine grid,
        int32 grain map ``[B, H/S, W/S]``).

        Latents are the posterior mean, or a sample when ``sample`` (noise from ``seed``, drawn on
        each grain's grid so coarse copies stay equal). Unscaled: diffusion uses ``latents *
        latent_scale``. Raises ``GrainError`` / ``ValueError`` with one line for bad inputs.
        """
        self._check_images(images)
        grains = None if grains is None else self._check_grains(grains, np.shape(images)[0])
        latents, grains, _, _ = self._run(self._compiled.encode, images, grains, _key(seed), sample=sample)
        return latents, grains

    def decode(self, latents: Any, grains: Any) -> jax.Array:
        """Latents ``[B, h, w, C]`` and grain map ``[B, H/S, W/S]`` -> uint8 images ``[B, H, W, 3]``.

        In coarse regions the mean of each code's 2x2 copies is decoded (exact copies decode as
        themselves)."""
        shape = np.shape(latents)
        if len(shape) != 4 or tuple(shape[1:]) != self.latent_shape or shape[0] < 1:
            raise ValueError(f"latents must have shape [B, {', '.join(map(str, self.latent_shape))}], got {tuple(shape)}")
        grains = self._check_grains(grains, shape[0])
        return self._run(self._compiled.decode, jnp.asarray(latents, jnp.float32), grains)

    def reconstruct(self, images: Any, grains: Any = None) -> jax.Array:
        """``decode(*encode(images))``."""
        return self.decode(*self.encode(images, grains))
