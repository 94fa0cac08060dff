"""The grain input pipeline: shuffled, augmented, per-process batches whose position checkpoints.

Training: each process reads its own slice of the source (``source[process::num_processes]``),
shuffles it with the run's seed (reshuffled every epoch), takes a random square crop (its side a
random fraction of the short side) resized to the model resolution, flips it at random, and
batches. Every random choice is derived from the seed and the element's index, so the iterator's
state (a position) is all a resumed run needs to see exactly the batches it would have seen.
Images are decoded as viewers show them (``data.decoding``); unreadable ones are skipped, counted
and warned about once per file (:class:`SkippedImages`), never fatal.

Evaluation: a fixed set of images: deterministic crops of held-out photographs, or centre crops
of the first images of the evaluation split.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from nativetok_jax.data.decoding import UnreadableImageError, array_to_rgb, decode_rgb, read_rgb
from nativetok_jax.data.images import center_crop


class SkippedImages:
    """The images a pipeline could not decode, each counted and warned about once.

    ``count`` is the number of distinct unreadable files (or array elements), however often
    the epochs revisit them; ``names`` lists them in the order they were found and
    ``examples`` gives the first few causes, for logs and JSON reports. A file known to be
    unreadable is not read again. Exact with ``worker_count=0``: worker processes keep their
    own copies.
    """

    MAX_EXAMPLES = 5

    def __init__(self):
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self.names: list[str] = []
        self.examples: list[str] = []

    @property
    def count(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._seen

    def add(self, name: str, description: str | None = None) -> None:
        """Records ``name`` (a file path, or an element's description) as unreadable, once."""
        with self._lock:
            if name in self._seen:
                return
            self._seen.add(name)
            self.names.append(name)
            if len(self.examples) < self.MAX_EXAMPLES:
                self.examples.append(description or name)
        logging.warning("skipping unreadable image (counted once, not read again): %s", description or name)


def decode(image: Any, skipped: SkippedImages, name: str | None = None) -> np.ndarray | None:
    """A path, encoded bytes or an array as the uint8 RGB image a viewer shows (``data.decoding``);
    ``None``, and recorded once in ``skipped``, when it cannot be read. ``name`` identifies an
    element that is not a file (a TFDS record)."""
    if isinstance(image, (str, os.PathLike)):
        key = os.fspath(image)
        if key in skipped:
            return None
        try:
            return read_rgb(key)
        except UnreadableImageError as error:
            skipped.add(key, str(error))
            return None
    if name is not None and name in skipped:
        return None
    try:
        return decode_rgb(image, name or "element") if isinstance(image, bytes) else array_to_rgb(image)
    except UnreadableImageError as error:
        skipped.add(name or str(error), f"{name}: {error}" if name else str(error))
        return None


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
        self.permute_channels = data.get("permute_channels", False)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any] | None:
        image = decode(element["image"], self.skipped, element.get("name"))
        if image is None:
            return None  # grain's iterator skips None elements.
        crop = random_crop(image, rng, self.size, self.min_fraction, self.max_fraction, self.flip)
        if self.permute_channels:
            crop = np.ascontiguousarray(crop[..., rng.permutation(3)])
        return {"image": crop, "label": np.int32(element["label"])}


# grain's global shuffle draws each index from a keyed permutation that walks cycles over a domain
# of about 2**15 (grain 0.2.18), so one index of an n-element epoch costs about 28 ms / n: 2.5 ms
# for the 11 bundled photographs (ten times their crop, 40 % of the demo's step on 2 cores),
# 9 us from 4096 elements on.
MIN_SHUFFLE_DOMAIN = 4096


def shuffled_forever(dataset: grain.MapDataset, seed: int) -> grain.MapDataset:
    """``dataset`` shuffled anew each epoch and repeated without end.

    A dataset of fewer than :data:`MIN_SHUFFLE_DOMAIN` elements is shuffled as
    ``ceil(MIN_SHUFFLE_DOMAIN / n)`` copies of itself at once: every element still comes equally
    often (exactly that many times in each shuffled block), and each index costs microseconds.
    """
    copies = -(-MIN_SHUFFLE_DOMAIN // len(dataset))
    if copies > 1:
        dataset = dataset.repeat(copies)
    return dataset.seed(seed).shuffle().repeat()


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
    dataset = shuffled_forever(dataset, seed).random_map(_Augment(data, image_size, skipped or SkippedImages()))
    threads = max(1, data.num_threads)  # a buffer smaller than the thread count idles threads (grain warns)
    iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, threads)))
    iterable = iterable.batch(batch_size, drop_remainder=True)
    if data.worker_count > 0:
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
    return iter(iterable)


def eval_crop_range(data: ml_collections.ConfigDict) -> tuple[float, float]:
    """The held-out crops' side as a fraction ``(low, high)`` of the short side.

    ``data.eval_crop_min`` / ``eval_crop_max`` where set (both > 0), else the training crops'
    ``data.crop_min`` / ``crop_max``: a run judged at the scale it trains at unless told otherwise.
    """
    low, high = data.get("eval_crop_min", 0.0), data.get("eval_crop_max", 0.0)
    return (low, high) if low > 0 and high > 0 else (data.crop_min, data.crop_max)


def held_out_section(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``data`` that crops the held-out images as a store of them is cropped: unflipped,
    at :func:`eval_crop_range`'s scale for the bundled photographs (few and large, cropped like the
    training images), whole (centre crops, ``crop_min = crop_max = 1``) for every other source."""
    held_out = ml_collections.ConfigDict(data.to_dict())
    low, high = eval_crop_range(data) if data.source == "photos" else (1.0, 1.0)
    held_out.update(crop_min=low, crop_max=high, flip=False)
    return held_out


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
    (at :func:`eval_crop_range`'s scale) with a fixed seed; other sources give centre crops of their
    first ``num_images`` images.
    """
    skipped = skipped or SkippedImages()
    low, high = eval_crop_range(data)
    rng = np.random.default_rng(seed)
    images = []
    index = 0
    while len(images) < num_images and index < len(source) * (num_images if data.source == "photos" else 1):
        element = source[index % len(source)]
        image = decode(element["image"], skipped, element.get("name", f"evaluation element {index % len(source)}"))
        index += 1
        if image is None:
            continue
        if data.source == "photos":
            images.append(random_crop(image, rng, image_size, low, high, flip=False))
        else:
            images.append(center_crop(image, image_size))
    if not images:
        raise ValueError("the evaluation split has no readable images")
    return np.stack(images)
