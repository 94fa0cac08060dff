"""A token store: a dataset encoded once by a tokenizer, kept as sharded ``.npy`` files.

    DIR/meta.json             what was encoded, how, and whether it is complete
    DIR/ids-00000.npy         int32 [shard_size, num_tokens]
    DIR/labels-00000.npy      int32 [shard_size]

Shards are written whole (a temporary file, then a rename), so an interrupted extraction keeps
the shards it finished and resumes after them; a complete store whose ``meta.json`` matches is
reused as it is. :class:`TokenSource` is a random-access source that grain reads (memory-mapped).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np

META = "meta.json"


class TokenStoreError(ValueError):
    """A token store that cannot be used as asked; the message says why and what to do."""


def shard_paths(directory: str, index: int) -> tuple[str, str]:
    return (os.path.join(directory, f"ids-{index:05d}.npy"), os.path.join(directory, f"labels-{index:05d}.npy"))


def _save_atomically(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def read_meta(directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, META)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_meta(directory: str, meta: dict[str, Any]) -> None:
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f"{META}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(directory, META))


def open_for_writing(directory: str, meta: dict[str, Any]) -> list[int]:
    """Prepares ``directory`` for an extraction described by ``meta``; returns the shard indices
    still to write (none when a matching store is complete). A store made with other settings
    is never mixed with new shards: that is an error naming the differing fields."""
    existing = read_meta(directory)
    if existing is not None:
        described = {k: v for k, v in existing.items() if k not in ("complete", "num_written")}
        differing = sorted(k for k in set(described) | set(meta) if described.get(k) != meta.get(k))
        if differing:
            raise TokenStoreError(
                f"{directory} holds tokens made with other settings ({', '.join(differing)}); "
                "delete it or choose another directory")
    else:
        write_meta(directory, dict(meta, complete=False))
    num_shards = -(-meta["num_examples"] // meta["shard_size"])
    return [i for i in range(num_shards) if not all(map(os.path.isfile, shard_paths(directory, i)))]


def write_shard(directory: str, index: int, ids: np.ndarray, labels: np.ndarray) -> None:
    ids_path, labels_path = shard_paths(directory, index)
    _save_atomically(labels_path, np.asarray(labels, np.int32))
    _save_atomically(ids_path, np.asarray(ids, np.int32))


def mark_complete(directory: str) -> int:
    """Records the store as complete; returns the number of examples written (unreadable images
    are left out of their shard, so it can be fewer than asked for)."""
    count = sum(len(np.load(p, mmap_mode="r")) for p in glob.glob(os.path.join(directory, "labels-*.npy")))
    write_meta(directory, dict(read_meta(directory), complete=True, num_written=count))
    return count


class TokenSource:
    """Random access to a complete store: ``source[i] -> {"ids": int32 [L], "label": int32}``."""

    def __init__(self, directory: str):
        meta = read_meta(directory)
        if meta is None or not meta.get("complete"):
            raise TokenStoreError(f"{directory} is not a complete token store (no finished extraction)")
        self.meta = meta
        self._ids = [np.load(p, mmap_mode="r") for p in sorted(glob.glob(os.path.join(directory, "ids-*.npy")))]
        self._labels = [np.load(p) for p in sorted(glob.glob(os.path.join(directory, "labels-*.npy")))]
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
        return {"ids": np.asarray(self._ids[shard][row], np.int32), "label": np.int32(self._labels[shard][row])}

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All ids ``[N, L]`` and labels ``[N]`` (for evaluation sets, which are small)."""
        return np.concatenate([np.asarray(x) for x in self._ids]), np.concatenate(self._labels)
