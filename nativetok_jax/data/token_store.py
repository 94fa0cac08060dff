"""A token store: a dataset encoded once by a tokenizer, kept as sharded ``.npy`` files.

    DIR/meta.json             what was encoded, how, and whether it is complete
    DIR/ids-00000.npy         int32 [shard_size, num_tokens]
    DIR/labels-00000.npy      int32 [shard_size]

The same files hold any per-example array (``array`` names it: the diffusion trainer's latent
store, :mod:`nativetok_jax.data.latent_store`, keeps ``moments-00000.npy``).

``DIR`` may be local or a URL (``gs://...``). Shards are written whole
(:func:`nativetok_jax.storage.write_bytes`), so an interrupted extraction keeps the shards it
finished and resumes after them; a complete store whose ``meta.json`` matches is reused as it is.
:class:`TokenSource` is a random-access source that grain reads (local shards memory-mapped,
remote ones read whole into host memory).
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from etils import epath

from nativetok_jax.errors import UserError
from nativetok_jax import storage

META = "meta.json"


class TokenStoreError(UserError, ValueError):
    """A token store that cannot be used as asked; the message says why and what to do."""


def shard_paths(directory: storage.PathLike, index: int, array: str = "ids") -> tuple[epath.Path, epath.Path]:
    """``(values, labels)`` file paths of shard ``index`` (``array`` names the values)."""
    directory = storage.path(directory)
    return directory / f"{array}-{index:05d}.npy", directory / f"labels-{index:05d}.npy"


def _save(path: epath.Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    storage.write_bytes(path, buffer.getvalue())


def _load(path: epath.Path) -> np.ndarray:
    """A shard: memory-mapped when local, read whole from an object store."""
    if storage.is_local(path):
        return np.load(path, mmap_mode="r")
    return np.load(io.BytesIO(path.read_bytes()))


def _shard_files(directory: storage.PathLike, kind: str) -> list[epath.Path]:
    return sorted(storage.path(directory).glob(f"{kind}-*.npy"))


def read_meta(directory: storage.PathLike) -> dict[str, Any] | None:
    path = storage.path(directory) / META
    return json.loads(path.read_text()) if path.is_file() else None


def write_meta(directory: storage.PathLike, meta: dict[str, Any]) -> None:
    storage.write_json(storage.path(directory) / META, meta)


def check_meta(directory: storage.PathLike, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The store's recorded ``meta.json`` (``None`` when there is none yet), checked against
    ``meta``: a store made with other settings is never mixed with new shards, that is an error
    naming the differing fields."""
    existing = read_meta(directory)
    if existing is not None:
        described = {k: v for k, v in existing.items() if k not in ("complete", "num_written")}
        differing = sorted(k for k in set(described) | set(meta) if described.get(k) != meta.get(k))
        if differing:
            raise TokenStoreError(
                f"{directory} holds tokens made with other settings ({', '.join(differing)}); "
                "delete it or choose another directory")
    return existing


def missing_shards(directory: storage.PathLike, meta: dict[str, Any], array: str = "ids") -> list[int]:
    """The shard indices of the extraction ``meta`` describes that are not on disk yet."""
    num_shards = -(-meta["num_examples"] // meta["shard_size"])
    return [i for i in range(num_shards) if not all(p.is_file() for p in shard_paths(directory, i, array))]


def write_shard(directory: storage.PathLike, index: int, ids: np.ndarray, labels: np.ndarray,
                array: str = "ids") -> None:
    """Writes one shard (its labels first: a shard counts as written once its values exist); token
    ids as int32, any other ``array`` in its own dtype."""
    values_path, labels_path = shard_paths(directory, index, array)
    _save(labels_path, np.asarray(labels, np.int32))
    _save(values_path, np.asarray(ids, np.int32) if array == "ids" else np.asarray(ids))


def mark_complete(directory: storage.PathLike) -> int:
    """Records the store as complete; returns the number of examples written (unreadable images
    are left out of their shard, so it can be fewer than asked for)."""
    count = sum(len(_load(p)) for p in _shard_files(directory, "labels"))
    write_meta(directory, dict(read_meta(directory), complete=True, num_written=count))
    return count


class TokenSource:
    """Random access to a complete store: ``source[i] -> {"ids": int32 [L], "label": int32}``
    (``{array: values[i], "label": ...}`` for a store of another ``array``)."""

    array = "ids"
    dtype: Any = np.int32
    kind = "token"

    def __init__(self, directory: storage.PathLike):
        meta = read_meta(directory)
        if meta is None or not meta.get("complete"):
            raise TokenStoreError(f"{directory} is not a complete {self.kind} store (no finished extraction)")
        self.meta = meta
        self._ids = [_load(p) for p in _shard_files(directory, self.array)]
        self._labels = [np.asarray(_load(p)) for p in _shard_files(directory, "labels")]
        self._offsets = np.cumsum([0] + [len(x) for x in self._ids])
        if self._offsets[-1] != meta["num_written"] or not len(self):
            raise TokenStoreError(f"{directory}: {self._offsets[-1]} examples on disk, meta.json says "
                                  f"{meta['num_written']}")

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def codebook_size(self) -> int:
        return int(self.meta["codebook_size"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        row = index - self._offsets[shard]
        return {self.array: np.asarray(self._ids[shard][row], self.dtype), "label": np.int32(self._labels[shard][row])}

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All values (ids ``[N, L]``) and labels ``[N]`` (for evaluation sets, which are small)."""
        return np.concatenate([np.asarray(x) for x in self._ids]), np.concatenate(self._labels)
