"""Metrics on inputs whose answer is known in closed form, or computed by an independent
implementation (scikit-image), beside the existing checks: FID by scipy's matrix square roots and
on identical sets (test_fid.py), the Inception Score's formula and hand-made cases (test_fid.py),
precision/recall by hand and brute force (test_precision_recall.py), SSIM against scikit-image
(test_evaluate.py), LPIPS against the PyTorch network (test_lpips.py) and bits/dim against the
closed form of an oracle (test_variational_bound.py). What was missing: PSNR against an
independent implementation and closed forms, FID and SSIM on closed-form answers."""

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio

from nativetok_jax.evaluation.fid import frechet_distance
from nativetok_jax.evaluation.metrics import pooled_psnr, psnr, psnr_per_image
from nativetok_jax.evaluation.ssim import ssim

RNG = np.random.default_rng(0)


def test_psnr_equals_scikit_image_per_image_and_its_closed_form():
    reference = RNG.integers(0, 256, (4, 12, 10, 3), dtype=np.uint8)
    noisy = np.clip(reference + RNG.normal(0, 12, reference.shape), 0, 255).astype(np.uint8)
    expected = [peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(reference, noisy)]
    np.testing.assert_allclose(np.asarray(psnr_per_image(reference, noisy)), expected, rtol=1e-5)
    assert psnr(reference, noisy) == pytest.approx(np.mean(expected), rel=1e-5)
    # Every value off by e: MSE e^2, PSNR 20 log10(255 / e); pooled over all images the same.
    for error in (1, 5, 51):
        shifted = (reference.astype(np.int32) // 2 + error).astype(np.uint8)
        half = (reference.astype(np.int32) // 2).astype(np.uint8)
        closed = 20 * np.log10(255 / error)
        np.testing.assert_allclose(np.asarray(psnr_per_image(half, shifted)), closed, rtol=1e-6)
        assert pooled_psnr(half, shifted) == pytest.approx(closed, rel=1e-6)
    assert np.isinf(np.asarray(psnr_per_image(reference, reference))).all()


def test_frechet_distance_of_diagonal_gaussians_in_closed_form():
    """FID = |mu1 - mu2|^2 + sum_i (s1_i + s2_i - 2 sqrt(s1_i s2_i)) for diagonal covariances."""
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 9.0, 9.0])
    expected = 5.0 + (1 + 4 - 2 * 2) + (4 + 9 - 2 * 6) + 0.0  # = 7
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, abs=1e-9)
    # A rotation of both (the same orthogonal Q) leaves the distance unchanged.
    q, _ = np.linalg.qr(RNG.normal(size=(3, 3)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert rotated == pytest.approx(expected, abs=1e-6)


def test_ssim_of_flat_images_in_closed_form():
    """Flat images have no variance: SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1), C1 = (0.01 * 255)^2;
    an image against itself is 1."""
    c1 = (0.01 * 255) ** 2
    first = np.full((1, 16, 16, 3), 100, np.uint8)
    for level in (100, 120, 250):
        second = np.full((1, 16, 16, 3), level, np.uint8)
        expected = (2 * 100 * level + c1) / (100**2 + level**2 + c1)
        np.testing.assert_allclose(np.asarray(ssim(first, second)), [expected], rtol=0, atol=1e-4)  # float32
    image = RNG.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_allclose(np.asarray(ssim(image, image)), [1.0, 1.0], atol=1e-6)
