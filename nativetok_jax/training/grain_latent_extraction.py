"""Grain latent extraction: encode a dataset once with a trained Dynamic VAE, for D²iT's diffusion.

Example ``i`` is image ``i mod len(source)`` cropped as the DVAE's training data is (the crops of
:func:`nativetok_jax.training.token_extraction.example_image`, drawn from ``(seed, i)`` without
the random flip: the store holds both orientations), so the store is the same whoever makes it
and whenever an interrupted extraction resumes. See :mod:`nativetok_jax.data.grain_latent_store`.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from absl import logging

from nativetok_jax import storage
from nativetok_jax.data import grain_latent_store as store
from nativetok_jax.data.pipeline import SkippedImages
from nativetok_jax.training.token_extraction import example_image


def extract_grain_latents(
    dvae: Any,
    source: Any,
    directory: storage.PathLike,
    *,
    data: ml_collections.ConfigDict,
    num_examples: int,
    seed: int,
    description: dict[str, Any],
    batch_size: int = 64,
    shard_size: int = 4096,
) -> store.GrainLatentSource:
    """Encodes ``num_examples`` examples and their flips into ``directory`` with ``dvae`` (a
    :class:`nativetok_jax.dvae.DVAE`), resuming an interrupted extraction or reusing a finished one.

    ``description`` (e.g. the DVAE's workdir and step) is recorded in ``meta.json`` with the
    routing, shapes, crops and latent scale; a store made with other settings raises
    ``TokenStoreError`` (one line naming the differing fields). Single-process: on several hosts,
    give each its own ``directory``.
    """
    recorded = store.read_meta(directory)
    shard_size = recorded["shard_size"] if recorded is not None else max(batch_size, shard_size // batch_size * batch_size)
    config = dvae.model_config
    meta = dict(description, num_examples=num_examples, shard_size=shard_size, seed=seed,
                image_size=dvae.image_size, latent_shape=list(dvae.latent_shape),
                grain_map_shape=list(dvae.grain_map_shape), latent_scale=dvae.latent_scale,
                routing=config.routing, fine_ratio=config.fine_ratio, entropy=config.entropy_settings.to_dict(),
                crops=[data.crop_min, data.crop_max], orientations=["image", "horizontal flip"])
    existing = store.check_meta(directory, meta)
    if existing is not None and existing.get("complete"):
        return store.GrainLatentSource(directory)
    if existing is None:
        store.write_meta(directory, dict(meta, complete=False))
    unflipped = ml_collections.ConfigDict(dict(data.to_dict(), flip=False))
    skipped = SkippedImages()
    missing = store.missing_shards(directory, meta)
    if missing:
        logging.info("encoding %d examples and their flips into %s (%d shards left)", num_examples, directory,
                     len(missing))
    for shard in missing:
        indices = range(shard * shard_size, min((shard + 1) * shard_size, num_examples))
        examples = [example_image(source, i, unflipped, dvae.image_size, seed, skipped) for i in indices]
        examples = [e for e in examples if e is not None]
        parts: dict[str, list[np.ndarray]] = {"mean": [], "logvar": [], "grains": []}
        for start in range(0, len(examples), batch_size):
            images = np.stack([e[0] for e in examples[start:start + batch_size]])
            both = [_posterior_padded(dvae, batch, batch_size) for batch in (images, images[:, :, ::-1])]
            for index, name in enumerate(("mean", "logvar", "grains")):
                parts[name].append(np.stack([both[0][index], both[1][index]], axis=1))
        empty = {"mean": (0, 2, *dvae.latent_shape), "logvar": (0, 2, *dvae.latent_shape),
                 "grains": (0, 2, *dvae.grain_map_shape)}
        arrays = {k: np.concatenate(v) if v else np.zeros(empty[k]) for k, v in parts.items()}
        store.write_shard(directory, shard, arrays["mean"], arrays["logvar"], arrays["grains"],
                          np.array([e[1] for e in examples], np.int32))
    written = store.mark_complete(directory)
    logging.info("grain latent store %s complete: %d examples", directory, written)
    return store.GrainLatentSource(directory)


def _posterior_padded(dvae: Any, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``dvae.posterior`` of a batch padded to ``batch_size`` (one compiled program for all)."""
    count = len(images)
    padded = np.concatenate([images, np.repeat(images[-1:], batch_size - count, axis=0)])
    mean, logvar, grains = dvae.posterior(padded)
    return np.asarray(mean)[:count], np.asarray(logvar)[:count], np.asarray(grains)[:count]
