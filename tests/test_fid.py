"""Frechet distance, Inception Score, running feature statistics and their files."""

import numpy as np
import pytest
import scipy.linalg

from nativetok_jax.evaluation.fid import (
    FeatureStatistics,
    frechet_distance,
    inception_score,
    load_statistics,
    save_statistics,
)


def _gaussian_samples(seed: int, count: int = 400, dim: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=(count, dim)) @ mixing + rng.normal(size=dim)


def test_frechet_distance_matches_direct_formula():
    a, b = _gaussian_samples(0), _gaussian_samples(1)
    mu1, sigma1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, sigma2 = b.mean(0), np.cov(b, rowvar=False)
    # The closed form via sqrt(s1) s2 sqrt(s1), which is symmetric PSD: another route to the trace.
    root1 = scipy.linalg.sqrtm(sigma1).real
    cross = scipy.linalg.sqrtm(root1 @ sigma2 @ root1).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * cross)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) > 1.0


def test_frechet_distance_of_a_set_with_itself_is_zero():
    a = _gaussian_samples(2)
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_survives_singular_covariances():
    # 5 samples in 16 dimensions: rank-deficient covariances, the case the epsilon offset is for.
    a, b = _gaussian_samples(3, count=5), _gaussian_samples(4, count=5)
    distance = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert np.isfinite(distance) and distance > 0


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one size"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_of_hand_made_predictions():
    # Identical predictions: p(y|x) = p(y), KL 0, score 1, whatever the prediction is.
    assert inception_score(np.zeros((20, 1008)), splits=2) == pytest.approx((1.0, 0.0))
    assert inception_score(np.tile(np.arange(10.0), (20, 1)), splits=4)[0] == pytest.approx(1.0)
    # Confident and spread evenly over k classes: KL = log k, score k.
    confident = np.full((24, 1008), -1e4)
    confident[np.arange(24), np.arange(24) % 6] = 0.0
    mean, std = inception_score(confident, splits=4)
    assert mean == pytest.approx(6.0) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_matches_the_formula():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(30, 7)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for chunk in np.split(probs, 3):
        marginal = chunk.mean(0)
        scores.append(np.exp(np.mean([np.sum(p * np.log(p / marginal)) for p in chunk])))
    mean, std = inception_score(logits, splits=3)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)
    with pytest.raises(ValueError, match="splits"):
        inception_score(logits, splits=31)


def test_feature_statistics_equal_numpy_mean_and_cov():
    features = _gaussian_samples(6, count=250) + 100.0  # a large offset must not cost digits
    stats = FeatureStatistics()
    for batch in np.array_split(features.astype(np.float32), [7, 100, 101]):
        stats.add(batch)
    exact = features.astype(np.float32).astype(np.float64)
    assert stats.count == 250
    np.testing.assert_allclose(stats.mu, exact.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(exact, rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="16-d"):
        stats.add(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="2 samples"):
        FeatureStatistics().sigma


def test_statistics_file_round_trip_and_bad_files(tmp_path):
    rng = np.random.default_rng(7)
    mu, sigma = rng.normal(size=5), np.cov(rng.normal(size=(20, 5)), rowvar=False)
    path = str(tmp_path / "stats.npz")
    save_statistics(path, mu, sigma)
    loaded_mu, loaded_sigma = load_statistics(path)
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)

    np.savez(tmp_path / "other.npz", mean=mu, sigma=sigma)
    np.savez(tmp_path / "shapes.npz", mu=mu, sigma=sigma[:4])
    (tmp_path / "text.npz").write_text("not an archive")
    for name, message in (("other.npz", "no 'mu'"), ("shapes.npz", r"sigma \[D, D\]"),
                          ("text.npz", "not an FID statistics file"), ("missing.npz", "not found")):
        with pytest.raises(ValueError, match=message) as error:
            load_statistics(str(tmp_path / name))
        assert "\n" not in str(error.value)


def test_frechet_distance_rejects_a_matrix_that_is_no_covariance():
    a = _gaussian_samples(7)
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(mu, sigma, mu, sigma - 10 * np.eye(16))
