"""Frechet (Inception) distance and Inception Score from InceptionV3 outputs, on the host.

The features and logits come from :class:`nativetok_jax.models.frozen.inception.InceptionV3`:
``features`` (2048-d pool3) for FID and rFID, ``logits_unbiased`` (1008 classes) for the
Inception Score. Everything here is float64 numpy/scipy, as in the reference tools, because the
matrix square root of two 2048 x 2048 covariances loses digits in float32.

Statistics files are ``.npz`` with ``mu`` [D] and ``sigma`` [D, D], the format of pytorch-fid's
``--save-stats`` and of the published reference statistics, so they can be exchanged both ways;
ours add ``image_size`` (the images' side before Inception's resize), checked when read back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.special
from absl import logging
from etils import epath

NEGATIVE_TOLERANCE = 1e-6  # relative to the covariance's scale
IMAGE_SIZE_KEY = "image_size"  # our addition to the pytorch-fid format; readers ignore extra arrays
INPUT_CONVENTION_KEY = "inception_input"


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))`` of two Gaussians, in float64.

    ``tr sqrt(sigma1 sigma2)`` equals ``tr sqrt(A sigma2 A)`` with ``A = sqrt(sigma1)``, and that
    matrix is symmetric positive semi-definite, so two symmetric eigendecompositions give the
    trace: 2-3x faster than the general ``scipy.linalg.sqrtm`` of the product at 2048-d, and
    finite for singular covariances (fewer samples than dimensions) with no offset. Eigenvalues
    below zero are rounding noise and count as zero; a clearly negative one means the statistics
    are not covariances, and is an error rather than a silently wrong distance.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"Frechet distance needs means [D] and covariances [D, D] of one size, got "
                         f"{mu1.shape}, {sigma1.shape} and {mu2.shape}, {sigma2.shape}")
    scale = max(1.0, float(np.abs(sigma1).max()), float(np.abs(sigma2).max()))
    values, vectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    product = root1 @ sigma2 @ root1
    cross = np.linalg.eigvalsh((product + product.T) / 2)
    if min(values.min(), cross.min() / scale) < -NEGATIVE_TOLERANCE * scale:
        raise ValueError("Frechet distance: the statistics are not positive semi-definite covariances")
    difference = mu1 - mu2
    cross_trace = np.sqrt(np.clip(cross, 0.0, None)).sum()
    return float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * cross_trace)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation over ``splits`` equal chunks of ``exp(E_x[KL(p(y|x) || p(y))])``.

    ``logits`` [N, C]: pass InceptionV3's ``logits_unbiased`` (pool3 times the classifier weights,
    no bias, all 1008 classes). That is what the original TensorFlow Inception Score computed the
    softmax of, and what torch-fidelity and torchmetrics use, so scores compare with published
    ones; dropping the bias or the 8 extra classes changes the score slightly. ``p(y)`` is each
    chunk's mean prediction. Chunks are taken in the given order (shuffle beforehand if the
    samples are sorted, e.g. by class).
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"inception_score takes logits [N, classes], got shape {logits.shape}")
    count = logits.shape[0]
    if not 1 <= splits <= count:
        raise ValueError(f"inception_score: {count} samples cannot make {splits} splits")
    log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        chunk = slice(i * count // splits, (i + 1) * count // splits)
        marginal = p[chunk].mean(axis=0)
        # 0 log 0 = 0: a class no sample in the chunk can have underflowed to p = 0 everywhere.
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = p[chunk] * (log_p[chunk] - np.log(marginal))
        kl = np.sum(np.where(p[chunk] > 0, terms, 0.0), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


class FeatureStatistics:
    """Running mean and covariance of feature vectors, added batch by batch.

    Keeps float64 sums of the features and of their outer products, taken about the first batch's
    mean so that large common offsets do not cancel away digits. ``sigma`` is the unbiased (N - 1)
    covariance, as ``np.cov(features, rowvar=False)``.
    """

    def __init__(self) -> None:
        self.count = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def add(self, features: np.ndarray) -> None:
        """Adds a batch ``[B, D]`` (any float dtype; a JAX array is copied to the host)."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"FeatureStatistics.add takes a non-empty batch [B, D], got shape {features.shape}")
        if self._shift is None:
            self._shift = features.mean(axis=0)
            self._sum = np.zeros_like(self._shift)
            self._outer = np.zeros((features.shape[1],) * 2)
        elif features.shape[1] != self._shift.shape[0]:
            raise ValueError(f"FeatureStatistics: batch of {features.shape[1]}-d features after "
                             f"{self._shift.shape[0]}-d ones")
        centred = features - self._shift
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred
        self.count += features.shape[0]

    @property
    def mu(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("FeatureStatistics: no features added")
        return self._shift + self._sum / self.count

    @property
    def sigma(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"FeatureStatistics: a covariance needs at least 2 samples, have {self.count}")
        mean = self._sum / self.count
        return (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)


def save_statistics(path: str | epath.PathLike, mu: np.ndarray, sigma: np.ndarray,
                    image_size: int | None = None, input_convention: str | None = None) -> None:
    """Writes ``mu`` and ``sigma`` (float64) to the ``.npz`` file ``path`` (local or ``gs://``),
    exactly that name, with ``image_size``: the side in pixels the images had before Inception's
    own resize, so a later reader can refuse images of another size; and ``input_convention``
    (``InceptionV3.input_convention``): how the images entered the network, which the features
    compared with these statistics must share."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    _check_shapes(str(path), mu, sigma)
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if image_size is None else {IMAGE_SIZE_KEY: np.int64(image_size)}
    if input_convention is not None:
        extra[INPUT_CONVENTION_KEY] = np.str_(input_convention)
    with path.open("wb") as f:  # a file object, so numpy does not append ".npz" to the name
        np.savez(f, mu=mu, sigma=sigma, **extra)


def recorded_input_convention(path: str | epath.PathLike) -> str | None:
    """The Inception input convention a statistics file records (``None`` for files written before
    it was recorded, and for other tools' files)."""
    _read_npz(path, ())  # the file's own one-line errors first
    with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as data:
        return str(data[INPUT_CONVENTION_KEY]) if INPUT_CONVENTION_KEY in data.files else None


def load_statistics(path: str | epath.PathLike, image_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` as float64 from an ``.npz`` with ``mu`` [D] and ``sigma`` [D, D].

    Raises ``ValueError`` (one line, naming the file) for a missing or malformed file, and when
    ``image_size`` is given and the file records statistics of images of another size. Files
    that record no size (pytorch-fid's, published ones) are accepted with a logged warning.
    """
    mu, sigma, recorded = _read_npz(path, ("mu", "sigma"))
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    _check_shapes(str(path), mu, sigma)
    if image_size is not None and recorded is None:
        logging.warning("%s records no image size: make sure it was computed from %d x %d px images", path,
                        image_size, image_size)
    if image_size is not None and recorded is not None and recorded != image_size:
        raise ValueError(f"{path} holds statistics of {recorded} x {recorded} px images, these are {image_size} x "
                         f"{image_size} px: use (or write) statistics made at {image_size} px")
    return mu, sigma


def recorded_image_size(path: str | epath.PathLike) -> int | None:
    """The image size a statistics file records (read without its arrays), or ``None``."""
    return _read_npz(path, ())[-1]


def _read_npz(path: str | epath.PathLike, keys: tuple[str, ...]) -> tuple[Any, ...]:
    """The arrays ``keys`` and the recorded image size (or ``None``); one-line ``ValueError``s."""
    if not epath.Path(path).is_file():
        raise ValueError(f"FID statistics file not found: {path}")
    try:
        with epath.Path(path).open("rb") as f:
            data = np.load(f, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("it holds a single array, not an .npz archive")
            with data:  # an archive member is read only when indexed
                missing = [key for key in ("mu", "sigma") if key not in data.files]
                if missing:
                    raise ValueError(f"no {' or '.join(repr(k) for k in missing)} array (it has {sorted(data.files)})")
                size = int(data[IMAGE_SIZE_KEY]) if IMAGE_SIZE_KEY in data.files else None
                return (*(data[key] for key in keys), size)
    except Exception as e:  # zipfile, pickle refusal, our own ValueErrors: one line each
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not an FID statistics file: {first_line}") from e


def _check_shapes(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise ValueError(f"{path}: FID statistics need mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
