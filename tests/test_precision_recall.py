"""Improved precision and recall (k = 3, as ADM's evaluator) on features with known answers."""

import numpy as np
import pytest

from nativetok_jax.evaluation.precision_recall import (
    load_features, manifold_radii, precision_recall, read_adm_reference_batch, save_features, within_manifold,
)


def _brute_force(real, fake, k=3):
    """ADM's definition written directly: radii = sorted squared distances[k] (self at index 0)."""
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]

    def inside(centres, r, queries):
        d = ((queries[:, None] - centres[None]) ** 2).sum(-1)
        return (d <= r[None]).any(1)
    return inside(real, radii(real), fake).mean(), inside(fake, radii(fake), real).mean()


def test_a_line_of_points_by_hand():
    real = np.arange(10, dtype=np.float32)[:, None]  # 0 .. 9
    radii = manifold_radii(real)
    # Point 5: neighbours at distance 1, 1, 2 -> radius 2^2; point 0: 1, 2, 3 -> 9.
    assert radii[5] == 4.0 and radii[0] == 9.0
    np.testing.assert_array_equal(within_manifold(real, radii, np.array([[4.5], [20.0], [-3.0], [-3.5]])),
                                  [True, False, True, False])


def test_identical_disjoint_and_half_overlapping_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 8)).astype(np.float32)
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    # Half the samples are real points, half far away: precision 1/2; the far half's balls are
    # tiny and distant, so recall is the real-point half's coverage of the real set.
    fake = np.concatenate([real[:150], rng.normal(size=(150, 8)).astype(np.float32) + 100.0])
    precision, recall = precision_recall(real, fake)
    assert precision == pytest.approx(0.5)
    assert recall == pytest.approx(_brute_force(real, fake)[1])


def test_blocks_give_the_brute_force_answer():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(257, 5)).astype(np.float32)
    fake = (1.3 * rng.normal(size=(190, 5)) + 0.4).astype(np.float32)
    expected = _brute_force(real, fake)
    np.testing.assert_allclose(precision_recall(real, fake, block=64), expected, atol=1e-9)
    np.testing.assert_allclose(precision_recall(real, fake), expected, atol=1e-9)


def test_feature_and_reference_batch_files(tmp_path):
    features = np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32)
    save_features(str(tmp_path / "f.npz"), features)
    np.testing.assert_array_equal(load_features(str(tmp_path / "f.npz")), features)
    with pytest.raises(ValueError, match="not a features file"):
        np.savez(tmp_path / "other.npz", mu=np.zeros(3))
        load_features(str(tmp_path / "other.npz"))
    images = np.zeros((3, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=images, mu=np.zeros(4), sigma=np.eye(4))
    read, stats = read_adm_reference_batch(str(tmp_path / "VIRTUAL_ref.npz"))
    assert read.shape == (3, 8, 8, 3) and stats[1].shape == (4, 4)
    np.savez(tmp_path / "bad.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match="arr_0 must be uint8"):
        read_adm_reference_batch(str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="cannot have 3 nearest neighbours"):
        manifold_radii(features[:3])


@pytest.mark.slow
def test_evaluate_samples_reports_precision_and_recall_from_an_adm_reference_batch(tmp_path):
    """``evaluate --samples --reference_batch --reference_features``: ADM's mu/sigma converted into
    --reference_stats, the batch's images give the real features, written once and read back."""
    from flax import nnx
    from PIL import Image

    from nativetok_jax.data.images import center_crop
    from nativetok_jax.data.photos import load_photos
    from nativetok_jax.models.frozen.inception import InceptionV3
    from test_evaluate import random_weights, run_entry_point

    inception = str(tmp_path / "inception.npz")
    random_weights(inception, nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), image_size=None)), "fid_inception")
    images = np.stack([center_crop(photo, 16) for photo in load_photos("heldout")])
    samples = tmp_path / "samples"
    samples.mkdir()
    for i, image in enumerate(images):  # the samples ARE the reference images: precision = recall = 1
        Image.fromarray(image).save(samples / f"sample_{i:05d}.png")
    adm = tmp_path / "VIRTUAL_test_labeled.npz"
    np.savez(adm, arr_0=images, mu=np.zeros(2048), sigma=np.eye(2048))
    stats, features, out = (str(tmp_path / name) for name in ("ref_stats.npz", "ref_features.npz", "gen.json"))
    common = ["--samples", str(samples), "--inception", inception, "--reference_stats", stats,
              "--reference_features", features, "--out", out]
    assert run_entry_point(*common, "--reference_batch", str(adm)) == 0
    import json

    with open(out) as f:
        report = json.load(f)
    assert report["precision"] == 1.0 and report["recall"] == 1.0
    assert report["protocol"]["reference_stats"]["action"] == "converted"
    # ADM's statistics came from TensorFlow's FID graph: the samples enter Inception as they did there.
    from nativetok_jax.evaluation import fid

    assert fid.recorded_input_convention(stats) == "tensorflow"
    assert "ResizeBilinear" in report["protocol"]["inception"]["input"]
    assert report["protocol"]["reference_features"]["action"] == "written"
    assert load_features(features).shape == (len(images), 2048)
    protocol = {}  # read back without recomputing (and without --reference_batch or --data)
    from nativetok_jax import evaluate

    read = evaluate._reference_features(features, None, None, None, None, None, 16, 64, None, protocol)
    np.testing.assert_array_equal(read, load_features(features))
    assert protocol["reference_features"]["action"] == "read"
