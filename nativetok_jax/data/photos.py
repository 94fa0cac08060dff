"""Real photographs that ship inside scikit-image's wheel: data with no download.

Two disjoint splits: training photographs, and held-out ones (a cat, a coffee cup, a rocket and
a motorcycle) that a model never trains on, for judging reconstructions honestly.
"""

from __future__ import annotations

import os

import numpy as np

from nativetok_jax.data.decoding import read_rgb

TRAIN_PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "retina.jpg",
)
HELDOUT_PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_right.png")


def photo_directory() -> str:
    """Where scikit-image keeps its bundled images."""
    import skimage.data

    return os.path.dirname(skimage.data.__file__)


def load_photos(split: str) -> list[np.ndarray]:
    """The photographs of ``split`` ("train" or "heldout") as uint8 ``[H, W, 3]`` arrays."""
    names = {"train": TRAIN_PHOTOS, "heldout": HELDOUT_PHOTOS}.get(split)
    if names is None:
        raise ValueError(f"unknown photo split {split!r}; expected 'train' or 'heldout'")
    return [read_rgb(os.path.join(photo_directory(), name)) for name in names]
