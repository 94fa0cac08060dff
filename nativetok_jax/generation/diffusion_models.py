"""Trained diffusion transformers as files: a DiT run (``task="diffusion"``) and a D²iT run
(``task="d2it"``) with ``from_checkpoint``, ``save_pretrained`` and ``from_pretrained``.

    dit = TrainedDiT.from_checkpoint("workdirs/dit_demo")      # the newest checkpoint (EMA weights)
    dit.save_pretrained("exported/dit_demo")                   # config.json + model.safetensors
    dit = TrainedDiT.from_pretrained("exported/dit_demo")
    eps = dit.model(latents, timesteps, labels)                # the nnx module with these parameters

    d2it = TrainedD2iT.from_checkpoint("workdirs/d2it_demo")   # with the DVAE its config names
    d2it.save_pretrained("exported/d2it_demo")                 # the DVAE in exported/d2it_demo/dvae/

The export format is :mod:`nativetok_jax.pretrained.export`'s (kinds ``"dit"`` and ``"d2it"``); the
DiT's parameter names and the config fields that shape them are listed in docs/export.md, for
converters of released checkpoints. A DiT's latent space (``config.model.autoencoder``: the
SD-VAE weights file, or pixel space) is not part of its export: the config names the file, which
sampling needs. Parameters live on the config's mesh, sharded by its rules.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from nativetok_jax import checkpoints, sharding
from nativetok_jax.dvae import DVAE
from nativetok_jax.models.dit.transformer import dit_from_config
from nativetok_jax.models.d2it.dynamic_diffusion_transformer import dynamic_diffusion_transformer_from_config
from nativetok_jax.pretrained import directory as pretrained_directory
from nativetok_jax.training import diffusion_trainer
from nativetok_jax.training import grain_latent_extraction
from nativetok_jax.workdir import check_upstream

DVAE_DIRECTORY = "dvae"


class _TrainedTransformer:
    """What the two share: parameters checked against the config's model and placed on its mesh."""

    kind = ""
    task = ""

    def __init__(self, config: ml_collections.ConfigDict, params: sharding.Params, *, step: int | None = None,
                 mesh: jax.sharding.Mesh | None = None):
        self.config = config
        self.step = step  # the checkpoint's training step; None when loaded from an export
        self.mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
        abstract = nnx.eval_shape(lambda: self._build(nnx.Rngs(0)))
        self.graphdef, _ = nnx.split(abstract)
        shardings = sharding.param_shardings(abstract, self.mesh, sharding.rules_of(config))
        self.params = sharding.place_params(params, sharding.params_of(abstract), shardings, self.kind)

    def _build(self, rngs: nnx.Rngs) -> nnx.Module:
        raise NotImplementedError

    @property
    def model(self) -> nnx.Module:
        """The Flax module with these parameters."""
        return nnx.merge(self.graphdef, self.params)

    @staticmethod
    def _checkpoint(workdir: str, task: str, use_ema: bool) -> tuple[ml_collections.ConfigDict, Any, int]:
        from nativetok_jax.workdir import require_task  # it reads checkpoints through the models

        config = require_task(workdir, "from_checkpoint", (task,))
        params, step = checkpoints.load_params(workdir, use_ema=use_ema)
        return config, params, step


class TrainedDiT(_TrainedTransformer):
    """A DiT (``config.model``: :func:`nativetok_jax.config.dit_model_config`) and its parameters."""

    kind = "dit"

    def _build(self, rngs: nnx.Rngs) -> nnx.Module:
        return dit_from_config(self.config.model, rngs)

    @classmethod
    def from_checkpoint(cls, workdir: str, *, use_ema: bool = True) -> TrainedDiT:
        """The newest checkpoint of a DiT run (``task="diffusion"``), EMA weights when kept.
        Raises ``ConfigError`` when its autoencoder changed since it trained (``workdir.check_upstream``)."""
        config, params, step = cls._checkpoint(workdir, "diffusion", use_ema)
        check_upstream(workdir, diffusion_trainer.autoencoder_upstream(config.model.autoencoder), "loading it")
        return cls(config, params, step=step)

    @classmethod
    def from_pretrained(cls, directory: str) -> TrainedDiT:
        """What :meth:`save_pretrained` wrote (``WeightsError`` for a missing or foreign file,
        ``ValueError`` for parameters that do not fit the config)."""
        config, params, _ = pretrained_directory.load_pretrained(directory, kind="dit")
        return cls(config, params)

    def save_pretrained(self, directory: str) -> None:
        """``directory/config.json`` and ``model.safetensors`` (docs/export.md lists the names)."""
        m = self.config.model
        pretrained_directory.save_pretrained(directory, kind="dit", config=self.config, params=self.params,
                               image_size=m.image_size, num_classes=m.num_classes, patch_size=m.patch_size)


class TrainedD2iT(_TrainedTransformer):
    """D²iT's two transformers (content and grain, ``config.model`` and ``config.grain_transformer``)
    with their parameters and the Dynamic VAE whose latents and grain maps they model."""

    kind = "d2it"

    def __init__(self, config: ml_collections.ConfigDict, params: sharding.Params, dvae: DVAE, *,
                 step: int | None = None):
        self.dvae = dvae
        super().__init__(config, params, step=step, mesh=dvae.mesh)

    def _build(self, rngs: nnx.Rngs) -> nnx.Module:
        return dynamic_diffusion_transformer_from_config(self.config, self.dvae.grain_map_shape, rngs)

    @classmethod
    def from_checkpoint(cls, workdir: str, *, use_ema: bool = True) -> TrainedD2iT:
        """The newest checkpoint of a D²iT run (``task="d2it"``) and the DVAE of its ``dvae.workdir``.
        Raises ``ConfigError`` when that DVAE (its step or latent scale) changed since the run
        trained on it (``workdir.check_upstream``)."""
        config, params, step = cls._checkpoint(workdir, "d2it", use_ema)
        dvae = DVAE.from_checkpoint(config.dvae.workdir, mesh=sharding.make_mesh(config.mesh))
        check_upstream(workdir, grain_latent_extraction.dvae_upstream(config, dvae), "loading it")
        return cls(config, params, dvae, step=step)

    @classmethod
    def from_pretrained(cls, directory: str) -> TrainedD2iT:
        """What :meth:`save_pretrained` wrote, its DVAE from ``directory/dvae``."""
        config, params, _ = pretrained_directory.load_pretrained(directory, kind="d2it")
        dvae = DVAE.from_pretrained(os.path.join(directory, DVAE_DIRECTORY), mesh=sharding.make_mesh(config.mesh))
        return cls(config, params, dvae)

    def save_pretrained(self, directory: str) -> None:
        """``directory/config.json``, ``model.safetensors`` (both transformers: ``content/...``,
        ``grain/...``) and the DVAE in ``directory/dvae/``: a self-contained model."""
        pretrained_directory.save_pretrained(directory, kind="d2it", config=self.config, params=self.params,
                               image_size=self.dvae.image_size, num_classes=self.config.model.num_classes,
                               grain_map_shape=list(self.dvae.grain_map_shape))
        self.dvae.save_pretrained(os.path.join(directory, DVAE_DIRECTORY))
