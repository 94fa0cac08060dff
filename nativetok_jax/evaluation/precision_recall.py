"""Improved precision and recall (Kynkaanniemi et al. 2019) on Inception features, as ADM's evaluator
computes them (openai/guided-diffusion ``evaluations/evaluator.py``, ``ManifoldEstimator``).

Each set of features is a union of balls: around every feature, the ball whose radius is the
distance to its ``k``-th nearest neighbour in its own set (``k = 3``; the sorted distances include
the point itself at index 0, so the radius is ``sorted[k]``). Precision is the fraction of the
generated features inside the real manifold; recall the fraction of real features inside the
generated one. Distances are squared Euclidean (radii too, so comparisons are the same), in
float32 at full matmul precision (TPUs would otherwise round the products to bfloat16), computed
in blocks so 50,000 x 50,000 pairs never sit in memory at once.

Reference features are kept in an ``.npz`` with ``features [N, D]`` (float32), beside the ``mu``
/ ``sigma`` statistics files of FID; ADM's reference batches (``VIRTUAL_imagenet256_labeled.npz``:
``arr_0`` uint8 images ``[N, H, W, 3]`` with ``mu``, ``sigma``) are read by
:func:`read_adm_reference_batch`.
"""

from __future__ import annotations

import functools
import io

import jax
import jax.numpy as jnp
import numpy as np

from nativetok_jax import storage

NEIGHBOURHOOD = 3  # ADM's nhood_sizes=[3]
BLOCK = 10_000  # ADM's row and column batch size


def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    cross = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(jnp.sum(a * a, 1)[:, None] - 2.0 * cross + jnp.sum(b * b, 1)[None, :], 0.0)


@functools.partial(jax.jit, static_argnames="count")
def _smallest(rows: jax.Array, columns: jax.Array, valid: jax.Array, running: jax.Array, count: int) -> jax.Array:
    """The ``count`` smallest distances of each row so far, given one more block of columns."""
    distances = jnp.where(valid[None, :], _squared_distances(rows, columns), jnp.inf)
    merged = jnp.concatenate([running, distances], axis=1)
    return -jax.lax.top_k(-merged, count)[0]


@jax.jit
def _covered(queries: jax.Array, centres: jax.Array, radii: jax.Array, valid: jax.Array, so_far: jax.Array) -> jax.Array:
    inside = (_squared_distances(queries, centres) <= radii[None, :]) & valid[None, :]
    return so_far | inside.any(axis=1)


def _blocks(features: np.ndarray, size: int):
    """``(start, padded block [size, D], valid [size])`` over the rows of ``features``."""
    for start in range(0, len(features), size):
        block = features[start:start + size]
        valid = np.arange(size) < len(block)
        yield start, np.pad(block, ((0, size - len(block)), (0, 0))), valid


def _as_features(features, name: str) -> np.ndarray:
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"{name}: expected features [N >= 2, D], got shape {features.shape}")
    return features


def manifold_radii(features: np.ndarray, k: int = NEIGHBOURHOOD, block: int = BLOCK) -> np.ndarray:
    """Squared distance of each feature ``[N, D]`` to its ``k``-th nearest neighbour in the set: ``[N]``.

    Raises:
      ValueError: fewer than ``k + 1`` features, or not ``[N, D]``.
    """
    features = _as_features(features, "manifold_radii")
    if len(features) <= k:
        raise ValueError(f"manifold_radii: {len(features)} features cannot have {k} nearest neighbours each")
    size = min(block, len(features))
    radii = np.empty(len(features), np.float32)
    for start, rows, row_valid in _blocks(features, size):
        running = jnp.full((size, k + 1), jnp.inf)
        for _, columns, valid in _blocks(features, size):
            running = _smallest(rows, columns, valid, running, k + 1)
        radii[start:start + size] = np.asarray(running[:, k])[row_valid]
    return radii


def within_manifold(centres: np.ndarray, radii: np.ndarray, queries: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """bool ``[M]``: whether each query lies in some ball ``|q - centre_i|^2 <= radii_i``."""
    centres, queries = _as_features(centres, "within_manifold"), np.asarray(queries, np.float32)
    size = min(block, max(len(centres), len(queries)))
    radii_padded = np.pad(np.asarray(radii, np.float32), (0, -len(centres) % size))
    inside = np.empty(len(queries), bool)
    for start, rows, row_valid in _blocks(queries, size):
        so_far = jnp.zeros((size,), bool)
        for column_start, columns, valid in _blocks(centres, size):
            so_far = _covered(rows, columns, radii_padded[column_start:column_start + size], valid, so_far)
        inside[start:start + size] = np.asarray(so_far)[row_valid]
    return inside


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = NEIGHBOURHOOD,
                     block: int = BLOCK) -> tuple[float, float]:
    """``(precision, recall)`` of ``generated [M, D]`` against ``real [N, D]`` features, each in [0, 1]."""
    real, generated = _as_features(real, "real features"), _as_features(generated, "generated features")
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"precision_recall: {real.shape[1]}-d real and {generated.shape[1]}-d generated features")
    precision = within_manifold(real, manifold_radii(real, k, block), generated, block).mean()
    recall = within_manifold(generated, manifold_radii(generated, k, block), real, block).mean()
    return float(precision), float(recall)


def save_features(path: storage.PathLike, features: np.ndarray) -> None:
    """Writes ``features [N, D]`` (float32) to the ``.npz`` file ``path`` (local or a URL), exactly
    that name."""
    storage.write_npz(path, features=_as_features(features, str(path)))


def _read_npz(path: storage.PathLike, what: str, read):
    """``read(npz)`` of the file at ``path``; any failure is one ValueError line naming the file."""
    if not storage.path(path).is_file():
        raise ValueError(f"{what} not found: {path}")
    try:
        with np.load(io.BytesIO(storage.path(path).read_bytes()), allow_pickle=False) as data:
            return read(data)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not {what}: {first_line}") from e


def _require_arrays(data, names: tuple[str, ...]) -> None:
    missing = [name for name in names if name not in data.files]
    if missing:
        raise ValueError(f"no {' or '.join(repr(n) for n in missing)} array (it has {sorted(data.files)})")


def load_features(path: storage.PathLike) -> np.ndarray:
    """``features [N, D]`` float32 from a file written by :func:`save_features`; ValueError naming the file."""
    def read(data):
        _require_arrays(data, ("features",))
        return _as_features(data["features"], path)
    return _read_npz(path, "a features file", read)


def read_adm_reference_batch(path: str) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """ADM's reference batch: uint8 images ``arr_0 [N, H, W, 3]`` and its ``(mu, sigma)`` if present.

    ADM's statistics come from TensorFlow's FID Inception (the network whose converted weights
    ``python -m nativetok_jax.convert inception`` reads) fed as TensorFlow's graph feeds it, so
    they serve our gFID with the samples entering the network the same way
    (``InceptionV3.input_convention="tensorflow"``, recorded in the converted statistics); the
    images give the real features for precision and recall.

    Raises:
      ValueError: not an npz, or no uint8 ``arr_0`` of shape ``[N, H, W, 3]``.
    """
    def read(data):
        _require_arrays(data, ("arr_0",))
        statistics = (data["mu"], data["sigma"]) if {"mu", "sigma"} <= set(data.files) else None
        return data["arr_0"], statistics

    images, statistics = _read_npz(path, "an ADM reference batch", read)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    return images, statistics
