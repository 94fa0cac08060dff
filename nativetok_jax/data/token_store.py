"""The array store: a dataset encoded once, kept as sharded ``.npy`` files, one per named array.

    DIR/meta.json             what was encoded, how, and whether it is complete
    DIR/labels-00000.npy      int32 [n]
    DIR/<field>-00000.npy     one file per field of the store, e.g. ids int32 [n, num_tokens]

Every store of the project is one of these, told apart by its fields: the token store
(:class:`TokenSource`, ``ids``), the diffusion latent store
(:class:`nativetok_jax.data.latent_store.LatentSource`, ``moments``) and D²iT's grain latent
store (:class:`nativetok_jax.data.grain_latent_store.GrainLatentSource`, ``grains``, ``logvar``,
``mean``). One writer fills them all (:func:`nativetok_jax.training.token_extraction.encode_into_store`,
split over processes with barriers) and :class:`ArraySource` reads them all.

``DIR`` may be local or a URL (``gs://...``). Shards are written whole
(:func:`nativetok_jax.storage.write_bytes`), the labels first and the fields in order, so a shard
counts as written once its last field's file exists: an interrupted extraction keeps the shards
it finished and resumes after them; a complete store whose ``meta.json`` matches is reused as it
is. Local shards are memory-mapped, remote ones read whole into host memory.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from nativetok_jax.errors import UserError
from nativetok_jax import storage

META = "meta.json"


class TokenStoreError(UserError, ValueError):
    """A store (of tokens, latents or grain latents) that cannot be used as asked; the message says why and what to do."""


def shard_paths(directory: storage.PathLike, index: int, array: str = "ids") -> tuple[epath.Path, epath.Path]:
    """``(values, labels)`` file paths of shard ``index`` (``array`` names the field)."""
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


# Description fields added after stores were first written (2026-12-07: the tokenizer checkpoint's
# stage and step): a store made before records neither, and is compared without them.
ADDED_FIELDS = ("tokenizer stage", "tokenizer step")


def check_meta(directory: storage.PathLike, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The store's recorded ``meta.json`` (``None`` when there is none yet), checked against
    ``meta``: a store made with other settings is never mixed with new shards, that is an error
    naming the differing fields (:data:`ADDED_FIELDS` only where the store records them)."""
    existing = read_meta(directory)
    if existing is not None:
        described = {k: v for k, v in existing.items() if k not in ("complete", "num_written")}
        differing = sorted(k for k in set(described) | set(meta) if described.get(k) != meta.get(k)
                           and not (k in ADDED_FIELDS and k not in described))
        if differing:
            raise TokenStoreError(
                f"{directory} holds a store made with other settings ({', '.join(differing)}); "
                "delete it or choose another directory")
    return existing


def _last(array: str | Sequence[str]) -> str:
    return array if isinstance(array, str) else array[-1]


def missing_shards(directory: storage.PathLike, meta: dict[str, Any], array: str | Sequence[str] = "ids") -> list[int]:
    """The shard indices of the extraction ``meta`` describes that are not on disk yet (``array``:
    the store's field, or its fields in the order they are written: the last one is written last)."""
    num_shards = -(-meta["num_examples"] // meta["shard_size"])
    directory = storage.path(directory)
    return [i for i in range(num_shards) if not (directory / f"{_last(array)}-{i:05d}.npy").is_file()]


def write_shard(directory: storage.PathLike, index: int, values: np.ndarray | Mapping[str, np.ndarray],
                labels: np.ndarray, array: str = "ids") -> None:
    """Writes one shard: the labels (int32), then ``values`` (one array, the field ``array``, or
    ``{field: array}`` in the order given; each in its own dtype, token ids as int32). A shard counts
    as written once its last field exists."""
    directory = storage.path(directory)
    fields = dict(values) if isinstance(values, Mapping) else {array: values}
    _save(directory / f"labels-{index:05d}.npy", np.asarray(labels, np.int32))
    for name, value in fields.items():
        _save(directory / f"{name}-{index:05d}.npy", np.asarray(value, np.int32) if name == "ids" else np.asarray(value))


def mark_complete(directory: storage.PathLike) -> int:
    """Records the store as complete; returns the number of examples written (unreadable images
    are left out of their shard, so it can be fewer than asked for)."""
    count = sum(len(_load(p)) for p in _shard_files(directory, "labels"))
    write_meta(directory, dict(read_meta(directory), complete=True, num_written=count))
    return count


class ArraySource:
    """Random access to a complete store of the fields ``FIELDS`` (``{name: dtype}``, in the
    order a shard's files are written): ``source[i] -> {name: values[i] as dtype, ..., "label": int32}``.

    Raises :class:`TokenStoreError` for a directory without a finished extraction or whose files
    disagree with its ``meta.json``.
    """

    FIELDS: dict[str, Any] = {"ids": np.int32}
    kind = "token"

    def __init__(self, directory: storage.PathLike):
        meta = read_meta(directory)
        if meta is None or not meta.get("complete"):
            raise TokenStoreError(f"{directory} is not a complete {self.kind} store (no finished extraction)")
        self.meta = meta
        self._labels = [np.asarray(_load(p)) for p in _shard_files(directory, "labels")]
        self._values = {name: [_load(p) for p in _shard_files(directory, name)] for name in self.FIELDS}
        self._offsets = np.cumsum([0] + [len(x) for x in self._labels])
        counts = {name: sum(len(x) for x in values) for name, values in self._values.items()}
        if self._offsets[-1] != meta["num_written"] or not len(self) or set(counts.values()) != {len(self)}:
            raise TokenStoreError(f"{directory}: {self._offsets[-1]} labelled examples on disk "
                                  f"({', '.join(f'{k} {v}' for k, v in counts.items())}), meta.json says "
                                  f"{meta['num_written']}")

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        row = index - self._offsets[shard]
        example = {name: np.asarray(self._values[name][shard][row], dtype) for name, dtype in self.FIELDS.items()}
        example["label"] = np.int32(self._labels[shard][row])
        return example

    def columns(self, *names: str) -> dict[str, np.ndarray]:
        """Every example's fields (``names``, default all) and ``label`` as whole arrays (for
        evaluation sets, which are small, or a training set's small fields)."""
        columns = {name: np.concatenate([np.asarray(x, self.FIELDS[name]) for x in self._values[name]])
                   for name in names or self.FIELDS}
        columns["label"] = np.concatenate(self._labels)
        return columns

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The first field's values (e.g. ids ``[N, L]``) and the labels ``[N]``."""
        columns = self.columns()
        return columns[next(iter(self.FIELDS))], columns["label"]


class TokenSource(ArraySource):
    """Random access to a complete token store: ``source[i] -> {"ids": int32 [L], "label": int32}``."""

    FIELDS = {"ids": np.int32}
    kind = "token"

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def codebook_size(self) -> int:
        return int(self.meta["codebook_size"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])
