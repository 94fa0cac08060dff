"""The grain input pipeline: shuffled, augmented, per-process batches whose position checkpoints.

Training: each process reads its own slice of the source (``source[process::num_processes]``),
shuffles it with the run's seed (reshuffled every epoch), takes a random square crop (its side a
random fraction of the short side) resized to the model resolution, flips it at random, and
batches. Every random choice is derived from the seed and the element's index, so the iterator's
state (a position) is all a resumed run needs to see exactly the batches it would have seen.
Unreadable images are skipped and counted (:class:`SkippedImages`), never fatal.

Evaluation: a fixed set of images: deterministic crops of held-out photographs, or centre crops
of the first images of the evaluation split.
"""

from __future__ import annotations

import threading
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from nativetok_jax.data.images import UnreadableImageError, center_crop, read_rgb


class SkippedImages:
    """Counts the images a pipeline could not decode (exact with ``worker_count=0``)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0
        self.examples: list[str] = []

    def add(self, description: str) -> None:
        with self._lock:
            self.count += 1
            if len(self.examples) < 5:
                self.examples.append(description)
        logging.warning("skipping unreadable image: %s", description)


def decode(image: Any, skipped: SkippedImages) -> np.ndarray | None:
    """An RGB uint8 array from a path or an array; ``None`` (and counted) when it cannot be read."""
    if isinstance(image, (str, bytes)):
        try:
            return read_rgb(image)
        except UnreadableImageError as error:
            skipped.add(str(error))
            return None
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or image.dtype != np.uint8:
        skipped.add(f"array of shape {image.shape} and dtype {image.dtype}")
        return None
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]


def random_crop(
    image: np.ndarray, rng: np.random.Generator, size: int, min_fraction: float, max_fraction: float, flip: bool
) -> np.ndarray:
    """A random square (side a random fraction of the short side) resized to ``size``, maybe flipped."""
    height, width = image.shape[:2]
    side = max(1, int(round(min(height, width) * rng.uniform(min_fraction, max_fraction))))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(image[top : top + side, left : left + side])
    out = np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
    return out[:, ::-1] if flip and rng.random() < 0.5 else out


class _Augment(grain.transforms.RandomMap):
    def __init__(self, data: ml_collections.ConfigDict, size: int, skipped: SkippedImages):
        self.size, self.skipped = size, skipped
        self.min_fraction, self.max_fraction, self.flip = data.crop_min, data.crop_max, data.flip

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any] | None:
        image = decode(element["image"], self.skipped)
        if image is None:
            return None  # grain's iterator skips None elements.
        crop = random_crop(image, rng, self.size, self.min_fraction, self.max_fraction, self.flip)
        return {"image": crop, "label": np.int32(element["label"])}


def train_iterator(
    data: ml_collections.ConfigDict,
    source: Any,
    *,
    image_size: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    skipped: SkippedImages | None = None,
) -> grain.DatasetIterator:
    """An endless iterator of this process's batches ``{"image": uint8 [b, H, W, 3], "label": [b]}``."""
    dataset = grain.MapDataset.source(source)[process_index::process_count]
    if len(dataset) == 0:
        raise ValueError(f"process {process_index} of {process_count} has no training images")
    dataset = dataset.seed(seed).shuffle().repeat().random_map(_Augment(data, image_size, skipped or SkippedImages()))
    threads = max(1, data.num_threads)  # a buffer smaller than the thread count idles threads (grain warns)
    iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, threads)))
    iterable = iterable.batch(batch_size, drop_remainder=True)
    if data.worker_count > 0:
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
    return iter(iterable)


def eval_images(
    data: ml_collections.ConfigDict,
    source: Any,
    *,
    image_size: int,
    num_images: int,
    seed: int = 0,
    skipped: SkippedImages | None = None,
) -> np.ndarray:
    """A fixed evaluation set, uint8 ``[N, H, W, 3]``.

    Bundled photographs (few and large) give ``num_images`` crops drawn like the training crops
    with a fixed seed; other sources give centre crops of their first ``num_images`` images.
    """
    skipped = skipped or SkippedImages()
    rng = np.random.default_rng(seed)
    images = []
    index = 0
    while len(images) < num_images and index < len(source) * (num_images if data.source == "photos" else 1):
        image = decode(source[index % len(source)]["image"], skipped)
        index += 1
        if image is None:
            continue
        if data.source == "photos":
            images.append(random_crop(image, rng, image_size, data.crop_min, data.crop_max, flip=False))
        else:
            images.append(center_crop(image, image_size))
    if not images:
        raise ValueError("the evaluation split has no readable images")
    return np.stack(images)
