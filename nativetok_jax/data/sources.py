"""Random-access image sources for grain: bundled photographs, an image folder, or a TFDS dataset.

Every source has ``len()`` and ``source[i]``, which returns ``{"image": ..., "label": int}``.
The folder source returns the file *path* as ``image``; decoding happens in the pipeline, where
an unreadable file can be skipped and counted instead of stopping the run. Opening a source
checks that it exists and is not empty, so a wrong path fails before anything compiles.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from nativetok_jax.errors import UserError
from nativetok_jax.data.photos import load_photos

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# ``python -m nativetok_jax.sample`` names its images so; the folder also holds grid.png and
# ids.npz, which are not samples.
SAMPLE_FILE = "sample_{index:05d}.png"
SAMPLE_GLOB = "sample_*.png"
SAMPLE_IDS_FILE = "ids.npz"  # token ids, labels and the image size of the samples


class DataError(UserError, ValueError):
    """The configured data cannot be read; the message names the config field and the cause."""


class PhotoSource:
    """The photographs bundled with scikit-image, decoded once and kept in memory.

    They carry no labels: every one is class 0, or with ``labelled`` photograph ``i`` is class
    ``i`` (a class-conditional demo: the model learns which photograph a crop comes from).
    """

    def __init__(self, split: str, labelled: bool = False):
        self._photos = load_photos(split)
        self.labelled = labelled
        self.num_classes = len(self._photos) if labelled else 1

    def __len__(self) -> int:
        return len(self._photos)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self._photos[index], "label": index if self.labelled else 0}


class FolderSource:
    """Every image file under a folder (recursively, following links); sub-folder names become class labels.

    A class folder may be a symbolic link (a common way to assemble a dataset from several
    places): links are followed, each folder and file is taken once, and a link back into a
    folder already read (a cycle) is skipped. Hidden files (``.DS_Store``, macOS ``._name.jpg``
    copies), files without an image extension and broken links are skipped. :meth:`scan` logs
    how many files and classes it found and how many it skipped, and why (``self.skipped``).
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], class_names: Sequence[str],
                 skipped: dict[str, list[str]] | None = None):
        self.paths, self.labels, self.class_names = list(paths), list(labels), list(class_names)
        self.num_classes = max(1, len(self.class_names))
        self.skipped = dict(skipped or {})

    @classmethod
    def scan(cls, root: str | epath.PathLike, field: str = "data.path") -> FolderSource:
        """The images under ``root`` (local or ``gs://``). Raises ``DataError`` naming ``field`` (a
        config field, or a flag such as ``--data``) when the folder does not exist or holds no image."""
        culprit = field if field.startswith("--") else f"config.{field}"
        root_path = epath.Path(root) if root else None
        if root_path is None or not root_path.is_dir():
            raise DataError(f"{culprit}: image folder {str(root)!r} does not exist")
        relative_paths, skipped = _list_files(root_path)
        paths = sorted(relative_paths)
        if not paths:
            raise DataError(f"{culprit}: no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images under "
                            f"{str(root)!r}{_describe_skipped(skipped, prefix='; skipped ')}")
        class_names = sorted({os.path.dirname(p) for p in paths} - {""})
        index = {name: i for i, name in enumerate(class_names)}
        labels = [index.get(os.path.dirname(p), 0) for p in paths]
        logging.info("%s: %d image files in %d classes under %s%s", field, len(paths), max(1, len(class_names)),
                     root, _describe_skipped(skipped, prefix="; skipped "))
        return cls([str(root_path / p) for p in paths], labels, class_names, skipped)

    @classmethod
    def samples(cls, directory: str | epath.PathLike, field: str = "samples") -> FolderSource:
        """Generated images: exactly the ``sample_*.png`` files when the folder has any (what
        ``nativetok_jax.sample`` writes, beside its ``grid.png``), else every image under it."""
        found = sorted(str(p) for p in epath.Path(directory).glob(SAMPLE_GLOB))
        if not found:
            return cls.scan(directory, field)
        logging.info("%s: %d sample files (%s) in %s", field, len(found), SAMPLE_GLOB, directory)
        return cls(found, [0] * len(found), [])

    def subset(self, indices: Sequence[int]) -> FolderSource:
        return FolderSource([self.paths[i] for i in indices], [self.labels[i] for i in indices], self.class_names,
                            self.skipped)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.paths[index], "label": self.labels[index]}


def _list_files(root: epath.Path) -> tuple[list[str], dict[str, list[str]]]:
    """Image paths relative to ``root``, and the skipped ones (relative too) by reason."""
    skipped: dict[str, list[str]] = collections.defaultdict(list)
    if "://" in str(root):  # object stores have no links; their own walk lists a folder per call
        files = [os.path.join(os.path.relpath(str(d), str(root)), n).removeprefix("./")
                 for d, _, names in root.walk() for n in names]
        return [f for f in files if _keep(f, skipped)], dict(skipped)
    files: list[str] = []
    seen: set[str] = set()
    pending = collections.deque([""])  # breadth first: a real folder is met before deeper links to it
    while pending:
        relative = pending.popleft()
        directory = os.path.join(str(root), relative)
        if os.path.realpath(directory) in seen:
            skipped["folder already read through another link (or a link cycle)"].append(relative)
            continue
        seen.add(os.path.realpath(directory))
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                path = os.path.join(relative, entry.name)
                if entry.name.startswith("."):
                    skipped["hidden"].append(path)
                elif entry.is_dir():  # follows links
                    pending.append(path)
                elif not entry.is_file():
                    skipped["broken link or not a file"].append(path)
                elif _keep(path, skipped):
                    target = os.path.realpath(entry.path)
                    if target in seen:
                        skipped["file already found through another link"].append(path)
                    else:
                        seen.add(target)
                        files.append(path)
    return files, dict(skipped)


def _keep(path: str, skipped: dict[str, list[str]]) -> bool:
    name = os.path.basename(path)
    if name.startswith("."):
        skipped["hidden"].append(path)
        return False
    if not name.lower().endswith(IMAGE_EXTENSIONS):
        skipped["not an image file name"].append(path)
        return False
    return True


def _describe_skipped(skipped: dict[str, list[str]], prefix: str) -> str:
    """``"; skipped 3 files: 2 hidden (.DS_Store, ...), 1 not an image file name (notes.txt)"``, or ``""``."""
    if not skipped:
        return ""
    total = sum(len(names) for names in skipped.values())
    parts = [f"{len(names)} {reason} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
             for reason, names in skipped.items()]
    return f"{prefix}{total}: {'; '.join(parts)}"


class TfdsSource:
    """A prepared TFDS dataset read through ``tfds.data_source`` (random access, no TensorFlow graph)."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        try:
            import tensorflow_datasets as tfds
        except ImportError as error:
            raise DataError(f"config.data.tfds_name: tensorflow-datasets is not importable ({error})") from None
        self.name, self.split = name, split
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
            if isinstance(_feature(self._source, "image"), tfds.features.Image):
                # Encoded bytes, decoded by data.decoding like files: TensorFlow's image decoder
                # ignores EXIF orientation and maps depths and alpha its own way.
                self._source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False,
                                                decoders={"image": tfds.decode.SkipDecoding()})
        except Exception as error:  # TFDS raises many types for a missing or unprepared dataset.
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DataError(
                f"config.data.tfds_name: cannot open {name!r} split {split!r} in data_dir {data_dir!r}: {first_line}"
            ) from error
        if len(self._source) == 0:
            raise DataError(f"config.data.tfds_name: {name!r} split {split!r} is empty")
        self.num_classes = int(getattr(_feature(self._source, "label"), "num_classes", 1) or 1)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"image": encoded bytes (or an array), "label": int, "name": "NAME:SPLIT[index]"}``."""
        record = self._source[index]
        image = record["image"]
        return {"image": image if isinstance(image, bytes) else np.asarray(image),
                "label": int(record.get("label", 0)), "name": f"{self.name}:{self.split}[{index}]"}


def _feature(source: Any, key: str) -> Any:
    """The TFDS feature ``key`` of a data source, or ``None``."""
    features = getattr(getattr(source, "dataset_info", None), "features", None)
    # FeaturesDict is a mapping without ``get`` in some TFDS releases.
    return features[key] if features is not None and key in features.keys() else None


def open_sources(data: ml_collections.ConfigDict, num_eval_images: int) -> tuple[Any, Any]:
    """The (train, eval) sources ``config.data`` names, checked to exist and be non-empty; logs
    which data they are (:func:`data_line`)."""
    train, held_out = _open(data, num_eval_images)
    logging.info("%s", data_line(describe_data(data, train, held_out)))
    return train, held_out


def _open(data: ml_collections.ConfigDict, num_eval_images: int) -> tuple[Any, Any]:
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


def describe_data(data: ml_collections.ConfigDict, train: Any, held_out: Any, held_out_from: str = "") -> dict[str, Any]:
    """What a run reads, for the first lines of its log and its ``eval.json``: ``source``, where
    (``path``, or ``tfds_name`` and its splits), the split sizes ``train_images`` and
    ``held_out_images`` (images, before any cropping), and ``held_out_from``: where the held-out
    images come from (``held_out_from`` overrides it, e.g. other crops of the training images)."""
    described: dict[str, Any] = dict(source=data.source)
    if data.source == "folder":
        described["path"] = str(data.path)
        default = (f"data.eval_path {data.eval_path}" if data.eval_path else
                   "data.path: evenly spaced images, never trained on (data.eval_path names a folder of its own)")
    elif data.source == "tfds":
        described.update(tfds_name=data.tfds_name, train_split=data.train_split, eval_split=data.eval_split)
        default = f"split {data.eval_split!r}"
    else:
        described["path"] = "the photographs bundled with scikit-image"
        default = "other bundled photographs"
    described.update(train_images=len(train), held_out_images=len(held_out), held_out_from=held_out_from or default)
    return described


def data_line(described: dict[str, Any]) -> str:
    """One log line of :func:`describe_data`'s description."""
    where = described.get("path") or f"{described['tfds_name']} split {described['train_split']!r}"
    return (f"data: {described['source']} ({where}): {described['train_images']} training images, "
            f"{described['held_out_images']} held out from {described['held_out_from']}")
