"""D²iT's grain latent stores: the trained Dynamic VAE a config names (:func:`open_dvae`), where its
stores live (:func:`store_directory`), and their extraction (:func:`extract_grain_latents`): a
dataset encoded once with the DVAE, for D²iT's diffusion.

Example ``i`` is image ``i mod len(source)`` cropped as the DVAE's training data is (the crops of
:func:`nativetok_jax.training.token_extraction.example_image`, drawn from ``(seed, i)`` without
the random flip: the store holds both orientations), so the store is the same whoever makes it
and whenever an interrupted extraction resumes. The store is written by the one writer of every
array store (:func:`~nativetok_jax.training.token_extraction.encode_into_store`: shards split
over processes, barriers); see :mod:`nativetok_jax.data.grain_latent_store` for the files.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from nativetok_jax import checkpoints, storage
from nativetok_jax.config import ConfigError, d2it_latent_shape
from nativetok_jax.data.grain_latent_store import GrainLatentSource
from nativetok_jax.dvae import DVAE
from nativetok_jax.training.token_extraction import encode_into_store, local_mesh


GRAIN_LATENTS = "grain_latents"  # the stores' directory inside the DVAE workdir


def open_dvae(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> DVAE:
    """The trained Dynamic VAE of ``config.dvae.workdir`` (EMA weights, latent scale), checked
    against ``config.model``: its fine latent must be the one the content transformer diffuses.

    Raises:
      ConfigError: no DVAE workdir named, a workdir of another task, or a latent shape mismatch.
      FileNotFoundError: the workdir has no config or no checkpoint.
    """
    workdir = config.dvae.workdir
    if not workdir:
        raise ConfigError("config.dvae.workdir: names no Dynamic VAE run (train one with configs/dvae_demo.py)")
    try:
        dvae = DVAE.from_checkpoint(workdir, mesh=mesh)
    except ValueError as error:
        raise ConfigError(f"config.dvae.workdir: {error}") from None
    expected = d2it_latent_shape(config.model)
    if tuple(dvae.latent_shape) != tuple(expected):
        raise ConfigError(f"config.model: the content transformer diffuses {expected} latents "
                          f"(image_size {config.model.image_size}, fine_factor {config.model.fine_factor}, "
                          f"latent_channels {config.model.latent_channels}), the DVAE in {workdir} makes "
                          f"{tuple(dvae.latent_shape)}")
    return dvae


def dvae_upstream(config: ml_collections.ConfigDict, dvae: DVAE) -> dict[str, Any]:
    """What identifies the trained DVAE a D²iT run diffuses the latents of, beyond its workdir: its
    newest checkpoint's step and its latent scale (a DVAE trained further, or rescaled, encodes and
    scales latents otherwise). Recorded by :func:`workdir.record_upstream`."""
    return {"dvae step": checkpoints.latest_step(config.dvae.workdir), "dvae latent_scale": float(dvae.latent_scale)}


def store_directory(config: ml_collections.ConfigDict) -> epath.Path:
    """Where the grain latent stores live: ``config.latents.directory``, else ``<dvae>/grain_latents``."""
    return storage.path(config.latents.directory) if config.latents.directory else \
        storage.path(config.dvae.workdir) / GRAIN_LATENTS


def fine_fraction(store: GrainLatentSource) -> float:
    """The fraction of fine regions over a store's grain maps (both orientations: the same maps)."""
    return float(store.columns("grains")["grains"][:, 0].mean())


def extract_grain_latents(
    dvae: DVAE,
    source: Any,
    directory: storage.PathLike,
    *,
    data: ml_collections.ConfigDict,
    num_examples: int,
    seed: int,
    description: dict[str, Any],
    batch_size: int = 64,
    shard_size: int = 4096,
) -> GrainLatentSource:
    """Encodes ``num_examples`` examples and their flips into ``directory`` with ``dvae`` (a
    :class:`nativetok_jax.dvae.DVAE`), resuming an interrupted extraction or reusing a finished one.

    ``description`` (e.g. the DVAE's workdir and step) is recorded in ``meta.json`` with the
    routing, shapes, crops and latent scale; a store made with other settings raises
    ``TokenStoreError`` (one line naming the differing fields). On several processes every one
    calls this with the same arguments (collective: each first gathers a copy of the DVAE onto
    its own devices); each encodes its share of the shards.
    """
    config = dvae.model_config
    meta = dict(description, image_size=dvae.image_size, latent_shape=list(dvae.latent_shape),
                grain_map_shape=list(dvae.grain_map_shape), latent_scale=dvae.latent_scale,
                routing=config.routing, fine_ratio=config.fine_ratio, entropy=config.entropy_settings.to_dict(),
                orientations=["image", "horizontal flip"])
    encoder = dvae.with_mesh(local_mesh()) if jax.process_count() > 1 else dvae

    def encode(images: np.ndarray) -> dict[str, np.ndarray]:
        both = [[np.asarray(a) for a in encoder.posterior(batch)] for batch in (images, images[:, :, ::-1])]
        mean, logvar, grains = (np.stack([both[0][k], both[1][k]], axis=1) for k in range(3))
        return {"grains": grains.astype(np.int8), "logvar": logvar.astype(np.float32), "mean": mean.astype(np.float32)}

    latent = (2, *dvae.latent_shape)
    unflipped = ml_collections.ConfigDict(dict(data.to_dict(), flip=False))
    return encode_into_store(
        encode, source, directory, data=unflipped, image_size=dvae.image_size, num_examples=num_examples, seed=seed,
        description=meta, value_shapes={"grains": (2, *dvae.grain_map_shape), "logvar": latent, "mean": latent},
        store=GrainLatentSource, batch_size=batch_size, shard_size=shard_size)
