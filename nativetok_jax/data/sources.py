"""Random-access image sources for grain: bundled photographs, an image folder, or a TFDS dataset.

Every source has ``len()`` and ``source[i]``, which returns ``{"image": ..., "label": int}``.
The folder source returns the file *path* as ``image``; decoding happens in the pipeline, where
an unreadable file can be skipped and counted instead of stopping the run. Opening a source
checks that it exists and is not empty, so a wrong path fails before anything compiles.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from nativetok_jax.data.photos import load_photos

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class DataError(ValueError):
    """The configured data cannot be read; the message names the config field and the cause."""


class PhotoSource:
    """The photographs bundled with scikit-image, decoded once and kept in memory."""

    num_classes = 1  # the photographs carry no labels

    def __init__(self, split: str):
        self._photos = load_photos(split)

    def __len__(self) -> int:
        return len(self._photos)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self._photos[index], "label": 0}


class FolderSource:
    """Every jpg/png/webp file under a folder (recursively); sub-folder names become class labels."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], class_names: Sequence[str]):
        self.paths, self.labels, self.class_names = list(paths), list(labels), list(class_names)
        self.num_classes = max(1, len(self.class_names))

    @classmethod
    def scan(cls, root: str, field: str = "data.path") -> FolderSource:
        if not root or not os.path.isdir(root):
            raise DataError(f"config.{field}: image folder {root!r} does not exist")
        paths = sorted(
            os.path.join(directory, name)
            for directory, _, names in os.walk(root)
            for name in names
            if name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not paths:
            raise DataError(f"config.{field}: no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images under {root!r}")
        class_names = sorted({os.path.relpath(os.path.dirname(p), root) for p in paths} - {"."})
        index = {name: i for i, name in enumerate(class_names)}
        labels = [index.get(os.path.relpath(os.path.dirname(p), root), 0) for p in paths]
        return cls(paths, labels, class_names)

    def subset(self, indices: Sequence[int]) -> FolderSource:
        return FolderSource([self.paths[i] for i in indices], [self.labels[i] for i in indices], self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.paths[index], "label": self.labels[index]}


class TfdsSource:
    """A prepared TFDS dataset read through ``tfds.data_source`` (random access, no TensorFlow graph)."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        try:
            import tensorflow_datasets as tfds
        except ImportError as error:
            raise DataError(f"config.data.tfds_name: tensorflow-datasets is not importable ({error})") from None
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
        except Exception as error:  # TFDS raises many types for a missing or unprepared dataset.
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DataError(
                f"config.data.tfds_name: cannot open {name!r} split {split!r} in data_dir {data_dir!r}: {first_line}"
            ) from None
        if len(self._source) == 0:
            raise DataError(f"config.data.tfds_name: {name!r} split {split!r} is empty")
        features = getattr(getattr(self._source, "dataset_info", None), "features", None)
        # FeaturesDict is a mapping without ``get`` in some TFDS releases.
        label = features["label"] if features is not None and "label" in features.keys() else None
        self.num_classes = int(getattr(label, "num_classes", 1) or 1)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        return {"image": np.asarray(record["image"]), "label": int(record.get("label", 0))}


def open_sources(data: ml_collections.ConfigDict, num_eval_images: int) -> tuple[Any, Any]:
    """The (train, eval) sources ``config.data`` names, checked to exist and be non-empty."""
    if data.source == "photos":
        return PhotoSource("train"), PhotoSource("heldout")
    if data.source == "folder":
        train = FolderSource.scan(data.path)
        if data.eval_path:
            return train, FolderSource.scan(data.eval_path, "data.eval_path")
        # Hold out evenly spaced files (never trained on) when no evaluation folder is given.
        held = set(np.linspace(0, len(train) - 1, min(num_eval_images, len(train) // 2)).astype(int).tolist())
        if not held:
            raise DataError(f"config.data.path: {len(train)} image(s) are too few to hold out evaluation images")
        kept = [i for i in range(len(train)) if i not in held]
        return train.subset(kept), train.subset(sorted(held))
    if data.source == "tfds":
        if not data.tfds_name:
            raise DataError("config.data.tfds_name: must name a TFDS dataset when data.source='tfds'")
        return (
            TfdsSource(data.tfds_name, data.train_split, data.tfds_data_dir),
            TfdsSource(data.tfds_name, data.eval_split, data.tfds_data_dir),
        )
    raise DataError(f"config.data.source: must be one of ('photos', 'folder', 'tfds'), got {data.source!r}")
