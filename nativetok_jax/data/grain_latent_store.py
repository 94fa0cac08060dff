"""A grain latent store: a dataset encoded once by a Dynamic VAE, for the diffusion stage (D²iT).

    DIR/meta.json              what was encoded, how, and whether it is complete
    DIR/labels-00000.npy       int32 [n]
    DIR/grains-00000.npy       int8 [n, 2, H/S, W/S]      grain maps (1 fine, 0 coarse)
    DIR/logvar-00000.npy       float32 [n, 2, h, w, C]    routed posterior log-variances
    DIR/mean-00000.npy         float32 [n, 2, h, w, C]    routed posterior means (unscaled)

Axis 1 holds the image (0) and its horizontal flip (1), each routed and encoded on its own (a
flip's grain map is the flipped map, ``grain_map(flip(x)) == flip(grain_map(x))``, but its latents
are the encoder's, not flipped latents), so a diffusion trainer samples ``mean + exp(logvar / 2) *
noise`` (noise drawn per grain and neighbour-copied, :func:`nativetok_jax.models.dvae.sample_latents`)
of a random one of the two each step, as DiT does with its flips. Latents are unscaled: multiply
by ``meta["latent_scale"]``.

The files, resumption and refusal follow :mod:`nativetok_jax.data.token_store` (whose helpers this
module uses): shards are written whole, the means last, so an interrupted extraction resumes
after the last finished shard; a store whose ``meta.json`` describes other settings is refused
with a one-line :class:`~nativetok_jax.data.token_store.TokenStoreError`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from etils import epath

from nativetok_jax import storage
from nativetok_jax.data.token_store import (  # noqa: F401  (check_meta, read_meta: this store's API too)
    TokenStoreError,
    _load,
    _save,
    _shard_files,
    check_meta,
    mark_complete,
    read_meta,
    write_meta,
)

KINDS = ("labels", "grains", "logvar", "mean")  # in the order a shard's files are written


def shard_paths(directory: storage.PathLike, index: int) -> dict[str, epath.Path]:
    directory = storage.path(directory)
    return {kind: directory / f"{kind}-{index:05d}.npy" for kind in KINDS}


def missing_shards(directory: storage.PathLike, meta: dict[str, Any]) -> list[int]:
    """The shards of the extraction ``meta`` describes whose means are not on disk yet."""
    num_shards = -(-meta["num_examples"] // meta["shard_size"])
    return [i for i in range(num_shards) if not shard_paths(directory, i)["mean"].is_file()]


def write_shard(directory: storage.PathLike, index: int, mean: np.ndarray, logvar: np.ndarray, grains: np.ndarray,
                labels: np.ndarray) -> None:
    """Writes one shard; it counts as written once its means exist (written last)."""
    paths = shard_paths(directory, index)
    arrays = {"labels": np.asarray(labels, np.int32), "grains": np.asarray(grains, np.int8),
              "logvar": np.asarray(logvar, np.float32), "mean": np.asarray(mean, np.float32)}
    for kind in KINDS:
        _save(paths[kind], arrays[kind])


class GrainLatentSource:
    """Random access to a complete store: ``source[i] -> {"mean", "logvar": float32 [2, h, w, C],
    "grains": int32 [2, H/S, W/S], "label": int32}`` (axis 0: the image and its flip)."""

    def __init__(self, directory: storage.PathLike):
        meta = read_meta(directory)
        if meta is None or not meta.get("complete"):
            raise TokenStoreError(f"{directory} is not a complete grain latent store (no finished extraction)")
        self.meta = meta
        self._arrays = {kind: [_load(p) for p in _shard_files(directory, kind)] for kind in KINDS}
        self._offsets = np.cumsum([0] + [len(x) for x in self._arrays["mean"]])
        if self._offsets[-1] != meta["num_written"] or not len(self):
            raise TokenStoreError(f"{directory}: {self._offsets[-1]} examples on disk, meta.json says "
                                  f"{meta['num_written']}")

    @property
    def latent_scale(self) -> float:
        return float(self.meta["latent_scale"])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        row = index - self._offsets[shard]
        a = self._arrays
        return {"mean": np.asarray(a["mean"][shard][row]), "logvar": np.asarray(a["logvar"][shard][row]),
                "grains": np.asarray(a["grains"][shard][row], np.int32), "label": np.int32(a["labels"][shard][row])}
