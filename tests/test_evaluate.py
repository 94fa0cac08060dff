"""Reconstruction evaluation: SSIM equals scikit-image's, and ``python -m nativetok_jax.evaluate``
writes every metric for all tokens and every prefix, the plot, and reusable reference statistics."""

import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from skimage.metrics import structural_similarity

from nativetok_jax import evaluate
from nativetok_jax.data.images import center_crop
from nativetok_jax.data.photos import load_photos
from nativetok_jax.evaluation import fid, tokenizer_metrics
from nativetok_jax.evaluation.ssim import ssim
from nativetok_jax.models.frozen.inception import InceptionV3
from nativetok_jax.models.frozen.lpips import LPIPS
from nativetok_jax.pretrained import files
from nativetok_jax.tokenizer import Tokenizer, preview_lengths
from nativetok_jax.training.trainer import train_and_evaluate
from conftest import tiny_config
from test_training import train_config

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
REQUIRED = ("psnr", "ssim", "codebook_usage", "perplexity", "lpips", "rfid", "inception_score")


def skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=255, channel_axis=-1)


def test_ssim_equals_scikit_image_on_random_and_real_images():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (3, 11, 13, 3), dtype=np.uint8)  # the smallest size, not square
    noisy = np.clip(noise + rng.normal(0, 30, noise.shape), 0, 255).astype(np.uint8)
    photos = np.stack([center_crop(photo, 64) for photo in load_photos("heldout")])
    blurred = np.stack([np.asarray(Image.fromarray(p).resize((16, 16)).resize((64, 64))) for p in photos])
    for first, second in ((noise, noisy), (noise, noise[::-1]), (photos, blurred), (photos, photos[::-1]),
                          (photos, photos)):
        got = np.asarray(ssim(jnp.asarray(first), jnp.asarray(second)))
        expected = [skimage_ssim(a, b) for a, b in zip(first, second)]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_ssim_refuses_images_smaller_than_its_window():
    small = np.zeros((1, 10, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="at least 11 x 11 pixels"):
        ssim(small, small)


def random_weights(path: str, module: nnx.Module, kind: str) -> None:
    """A weights file for ``module``'s (abstract) parameters: scaled normal kernels, identity norms.

    Filled with numpy because running the modules' own initialisers takes ~15 s on CPU here.
    """
    rng = np.random.default_rng(0)
    flat = {}
    state = nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))
    for key_path, variable in nnx.to_flat_state(state):
        key, shape = "/".join(map(str, key_path)), tuple(variable.shape)
        if key_path[-1] in ("scale", "var"):
            flat[key] = np.ones(shape, np.float32)
        elif key_path[-1] in ("bias", "mean"):
            flat[key] = np.zeros(shape, np.float32)
        else:
            flat[key] = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / math.prod(shape[:-1])))
    files.save_weights(path, flat, kind=kind, source="random (tests)")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    directory = tmp_path_factory.mktemp("weights")
    lpips, inception = str(directory / "lpips.npz"), str(directory / "inception.npz")
    random_weights(lpips, nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0))), "lpips")
    random_weights(inception, nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), image_size=None)),
                   "fid_inception")
    return lpips, inception


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("run"))
    train_and_evaluate(train_config(num_steps=4), directory)
    return directory


@pytest.fixture
def quick_frechet_distance(monkeypatch):
    """rFID without its matrix square root, recording what it compared: scipy's ``sqrtm`` of a
    2048 x 2048 matrix takes 10-30 s a call on this CPU, and tests/test_fid.py checks the full
    distance. Here only the plumbing matters: which statistics reach it."""
    calls = []

    def distance(mu1, sigma1, mu2, sigma2):
        calls.append((mu1, sigma1, mu2, sigma2))
        return float(np.sum(np.square(mu1 - mu2)) + np.trace(sigma1) + np.trace(sigma2))

    monkeypatch.setattr(tokenizer_metrics, "frechet_distance", distance)
    return calls


def run_entry_point(*args: str):
    """``python -m nativetok_jax.evaluate ARGS`` in this process; its exit code (0, or the message)."""
    evaluate.FLAGS.unparse_flags()
    argv = evaluate.FLAGS(["evaluate", *args])
    try:
        evaluate.main(argv)
    except SystemExit as stop:
        return stop.code
    return 0


@pytest.mark.slow
def test_entry_point_writes_every_metric_the_plot_and_reusable_reference_stats(
        workdir, weights, tmp_path, quick_frechet_distance, caplog):
    lpips, inception = weights
    stats = str(tmp_path / "reference.npz")
    common = ["--workdir", workdir, "--data", "photos", "--inception", inception, "--reference_stats", stats]
    out = str(tmp_path / "eval.json")
    with caplog.at_level("INFO"):
        assert run_entry_point(*common, "--out", out, "--lpips", lpips) == 0
    assert f"wrote the reference statistics to {stats}" in caplog.text
    mu, sigma = fid.load_statistics(stats)
    assert mu.shape == (2048,) and len(quick_frechet_distance) == 4  # one rFID per prefix length
    for _, _, reference_mu, reference_sigma in quick_frechet_distance:
        np.testing.assert_array_equal(reference_mu, mu)
        np.testing.assert_array_equal(reference_sigma, sigma)
    with open(out) as f:
        report = json.load(f)

    for key in REQUIRED + ("num_images", "protocol", "prefix"):
        assert key in report, key
    assert all(np.isfinite(report[key]) for key in REQUIRED)
    # The run trained on the bundled photographs: judged on its trainer's own held-out crops (8 of
    # them at its crop scale), so evaluate repeats the PSNR its last evaluation logged.
    assert report["num_images"] == 8
    with open(os.path.join(workdir, "eval.json")) as f:
        assert report["psnr"] == pytest.approx(json.load(f)["psnr"], abs=1e-3)
    assert 0 < report["codebook_usage"] <= 1 and report["perplexity"] >= 1
    rows = report["prefix"]
    assert [row["num_tokens"] for row in rows] == preview_lengths(8, ratio=2) == [1, 2, 4, 8]
    for row in rows:
        assert all(np.isfinite(row[key]) for key in REQUIRED), row
    assert {k: v for k, v in rows[-1].items() if k != "num_tokens"} == {
        k: v for k, v in report.items() if k in rows[-1]}
    protocol = report["protocol"]
    assert protocol["image_size"] == 16 and protocol["batch_size"] == 64 and protocol["num_images"] == 8
    assert protocol["preprocessing"].startswith("the run's own held-out set") and "0.2-0.6" in protocol["preprocessing"]
    assert protocol["inception"]["weights"]["source"] == "random (tests)"
    assert protocol["lpips"]["weights"]["file"] == os.path.abspath(lpips)
    assert protocol["inception"]["reference_stats"]["action"] == "written"
    assert (protocol["inception"]["inception_score_splits"], protocol["inception"]["inception_score_split_size"]) == (8, 1)
    assert protocol["inception"]["warnings"][0].startswith("FID on 8 images (fewer than 2,048")
    assert "FID on 8 images" in caplog.text
    # The tokenizer as a codec: 64 codes (6 bits a token) give 6, 12, 24 and 48 bits.
    codec = report["rate_distortion"]
    assert [(row["tokens"], row["bits"]) for row in codec] == [(1, 6.0), (2, 12.0), (4, 24.0), (8, 48.0)]
    assert [row["same_bits_codec"] for row in codec] == ["mean_colour_2bit", "mean_colour_4bit", "thumbnail_1x1",
                                                         "thumbnail_1x1"]
    for row, prefix in zip(codec, rows):
        for key in ("psnr", "ssim", "lpips"):
            assert row[key] == prefix[key], key
        for key in ("thumbnail_psnr", "thumbnail_ssim", "thumbnail_lpips", "mean_colour_psnr", "thumbnail_side"):
            assert np.isfinite(row[key]), (key, row)
    assert protocol["rate_distortion"].startswith("bits = tokens x log2(codebook_size)")
    for name in ("eval.png", "eval_rate_distortion.png"):
        with Image.open(str(tmp_path / name)) as plot:
            plot.verify()
            assert plot.format == "PNG" and min(plot.size) > 100

    again = str(tmp_path / "again.json")
    caplog.clear()
    with caplog.at_level("INFO"):
        assert run_entry_point(*common, "--out", again, "--noprefix") == 0
    assert f"reading statistics from {stats}" in caplog.text
    np.testing.assert_array_equal(quick_frechet_distance[-1][2], mu)
    with open(again) as f:
        second = json.load(f)
    assert second["protocol"]["inception"]["reference_stats"]["action"] == "read"
    assert second["rfid"] == pytest.approx(report["rfid"], rel=1e-6)
    assert "prefix" not in second and "rate_distortion" not in second and "lpips" not in second
    assert not any(os.path.exists(str(tmp_path / name)) for name in ("again.png", "again_rate_distortion.png"))


def test_folder_images_are_centre_cropped_padded_to_the_batch_and_unreadable_ones_skipped(workdir, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    photos = load_photos("heldout")[:3]
    for index, photo in enumerate(photos):
        Image.fromarray(photo).save(folder / f"{index}.png")
    (folder / "3_broken.png").write_bytes(b"not a png")
    out = str(tmp_path / "folder.json")
    # Batches of 2 and 1: the last is padded to 2 and the copy left out of every average.
    assert run_entry_point("--workdir", workdir, "--data", str(folder), "--out", out, "--batch_size", "2",
                           "--noprefix") == 0
    with open(out) as f:
        report = json.load(f)
    assert report["num_images"] == 3
    assert report["protocol"]["skipped_images"] == 1 and "3_broken.png" in report["protocol"]["skipped_examples"][0]

    tokenizer = Tokenizer.from_checkpoint(workdir)
    images = np.stack([center_crop(photo, tokenizer.image_size) for photo in photos])
    whole, _ = tokenizer_metrics.evaluate_tokenizer(tokenizer, [images], prefix=False)
    for key in ("psnr", "ssim", "codebook_usage", "perplexity"):
        assert report[key] == pytest.approx(whole[key], rel=1e-6), key


@pytest.mark.parametrize("flags, message", [
    (["--data", "/no/such/images"], "error: --data: '/no/such/images' is not an image folder"),
    (["--data", "photos", "--batch_size", "0"], "error: --batch_size: must be positive, got 0"),
    (["--data", "photos", "--reference_stats", "x.npz"], "error: --reference_stats: rFID statistics need --inception"),
])
def test_bad_input_is_one_line_error(workdir, tmp_path, flags, message):
    code = run_entry_point("--workdir", workdir, "--out", str(tmp_path / "e.json"), *flags)
    assert isinstance(code, str) and code.startswith(message) and "\n" not in code, code


def test_a_folder_without_readable_images_is_one_line_error(workdir, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    code = run_entry_point("--workdir", workdir, "--data", str(tmp_path), "--out", str(tmp_path / "e.json"))
    assert code == f"error: --data {tmp_path}: no images to evaluate (1 unreadable)"


@pytest.mark.slow
def test_command_line_reports_bad_input_in_one_line_and_exit_code_1(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "nativetok_jax.evaluate", "--workdir", str(tmp_path), "--data", "/no/such/images",
         "--out", str(tmp_path / "e.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --data: '/no/such/images' is not an image folder, tfds:NAME:SPLIT or 'photos'")


def test_bad_workdir_is_one_line_error(tmp_path):
    code = run_entry_point("--workdir", str(tmp_path), "--data", "photos", "--out", str(tmp_path / "e.json"))
    assert isinstance(code, str) and code.startswith("error: no config.json") and "\n" not in code, code


@pytest.mark.slow
def test_generated_samples_get_gfid_and_inception_score(weights, tmp_path):
    """``--samples``: gFID of a folder of images against reference statistics made from --data."""
    _, inception = weights
    samples = tmp_path / "samples"
    samples.mkdir()
    for i, photo in enumerate(load_photos("heldout")):
        Image.fromarray(center_crop(photo, 16)[::-1]).save(samples / f"sample_{i:05d}.png")  # flipped "samples"
    stats, out = str(tmp_path / "reference.npz"), str(tmp_path / "gen.json")
    common = ["--samples", str(samples), "--inception", inception, "--reference_stats", stats, "--out", out]
    assert run_entry_point(*common, "--data", "photos") == 0
    with open(out) as f:
        report = json.load(f)
    assert report["num_samples"] == 4 and report["protocol"]["reference_stats"]["action"] == "written"
    assert report["protocol"]["inception_score_split_size"] == 1 and "FID on 4 images" in report["protocol"]["warnings"][0]
    assert np.isfinite(report["gfid"]) and report["gfid"] > 0 and report["inception_score"] >= 1.0 - 1e-6
    assert run_entry_point(*common) == 0  # the statistics are read back: no --data needed now
    with open(out) as f:
        again = json.load(f)
    assert again["gfid"] == pytest.approx(report["gfid"], rel=1e-9)
    assert again["protocol"]["reference_stats"]["action"] == "read"
    assert run_entry_point("--samples", str(samples), "--out", out) == (
        "error: --inception: gFID and IS need the FID Inception weights file, got None")


def write_sample_folder(directory, images: np.ndarray) -> None:
    """What ``python -m nativetok_jax.sample`` writes: the samples, a large grid.png and ids.npz."""
    directory.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(directory / f"sample_{i:05d}.png")
    Image.fromarray(np.zeros((414, 414, 3), np.uint8)).save(directory / "grid.png")
    np.savez(directory / "ids.npz", ids=np.zeros((len(images), 8), np.int32), labels=np.zeros(len(images), np.int32),
             image_size=images.shape[1])


def test_samples_scored_against_themselves_give_gfid_zero_at_the_samples_size(weights, tmp_path):
    """Issue 17, case 5: ``--samples`` on ``sample``'s folder reads only the samples (not grid.png),
    at their size (not the grid's 414 px), and records that size in the statistics it writes."""
    _, inception = weights
    images = np.stack([center_crop(photo, 16) for photo in load_photos("heldout")])
    write_sample_folder(tmp_path / "samples", images)
    data = tmp_path / "real"
    data.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(data / f"{i}.png")
    stats, out = str(tmp_path / "reference.npz"), str(tmp_path / "gen.json")
    assert run_entry_point("--samples", str(tmp_path / "samples"), "--inception", inception, "--reference_stats",
                           stats, "--out", out, "--data", str(data)) == 0
    with open(out) as f:
        report = json.load(f)
    assert report["num_samples"] == 4 and report["protocol"]["image_size"] == 16
    assert abs(report["gfid"]) < 1e-3  # the same images: distance zero up to rounding (was 4.7-6.3)
    assert fid.recorded_image_size(stats) == 16


def test_reference_statistics_of_another_image_size_are_refused(weights, tmp_path):
    _, inception = weights
    images = np.stack([center_crop(photo, 16) for photo in load_photos("heldout")[:2]])
    write_sample_folder(tmp_path / "samples", images)
    stats = str(tmp_path / "reference_414.npz")
    fid.save_statistics(stats, np.zeros(2048), np.eye(2048), image_size=414)
    code = run_entry_point("--samples", str(tmp_path / "samples"), "--inception", inception, "--reference_stats",
                           stats, "--out", str(tmp_path / "gen.json"))
    assert code == (f"error: --reference_stats: {stats} holds statistics of 414 x 414 px images, these are 16 x 16 "
                    f"px: use (or write) statistics made at 16 px")


def test_samples_of_another_size_than_the_model_are_refused(weights, tmp_path):
    _, inception = weights
    images = np.stack([center_crop(photo, 16) for photo in load_photos("heldout")[:2]])
    write_sample_folder(tmp_path / "samples", images)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "samples" / "sample_00002.png")
    stats = str(tmp_path / "reference.npz")
    fid.save_statistics(stats, np.zeros(2048), np.eye(2048), image_size=16)
    code = run_entry_point("--samples", str(tmp_path / "samples"), "--inception", inception, "--reference_stats",
                           stats, "--out", str(tmp_path / "gen.json"))
    assert code == f"error: --samples: {tmp_path / 'samples' / 'sample_00002.png'} is 32 x 32 px, expected 16 x 16 px"


def test_training_and_evaluate_report_the_per_image_mean_psnr(workdir, tmp_path):
    """Two images the tokenizer reconstructs with different errors: the mean of their PSNRs is
    what the trainer's held-out evaluation and the command report, not the pooled-MSE figure."""
    from nativetok_jax.evaluation.metrics import psnr
    from nativetok_jax.evaluation.reconstruction import evaluate_reconstruction

    tokenizer = Tokenizer.from_checkpoint(workdir)
    size = tokenizer.image_size
    photo = center_crop(load_photos("heldout")[0], size)
    images = np.stack([photo, np.full_like(photo, 255)])
    reconstructions = np.asarray(tokenizer.reconstruct(images), np.float64)
    mse = np.mean(np.square(images.astype(np.float64) - reconstructions), axis=(1, 2, 3))
    per_image = float(np.mean(10 * np.log10(255.0**2 / mse)))
    pooled = float(10 * np.log10(255.0**2 / mse.mean()))
    assert per_image - pooled > 0.1, (per_image, pooled)  # the two conventions really differ here

    for batch_size in (1, 2):  # batching cannot change a per-image mean
        metrics, rows = evaluate_reconstruction(tokenizer, images, batch_size=batch_size)
        assert metrics["psnr"] == pytest.approx(per_image, abs=1e-3)
        assert metrics[f"psnr_first_{tokenizer.num_tokens}"] == metrics["psnr"]
        assert len(rows) == 1 + len(preview_lengths(tokenizer.num_tokens)) and len(rows[0]) == 2
    assert psnr(images, reconstructions.astype(np.uint8)) == pytest.approx(per_image, abs=1e-3)

    folder = tmp_path / "two"
    folder.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index}.png")
    out = str(tmp_path / "two.json")
    assert run_entry_point("--workdir", workdir, "--data", str(folder), "--out", out, "--noprefix") == 0
    with open(out) as f:
        assert json.load(f)["psnr"] == pytest.approx(per_image, abs=1e-3)


@pytest.mark.parametrize("num_images, splits, split_size, warns", [
    (4, 4, 1, True), (2047, 10, 204, True), (2048, 10, 204, False), (50_000, 10, 5_000, False)])
def test_inception_protocol_names_the_split_size_and_warns_below_2048_images(num_images, splits, split_size, warns):
    protocol = {}
    evaluate.inception_caveats(num_images, protocol)
    assert (protocol["inception_score_splits"], protocol["inception_score_split_size"]) == (splits, split_size)
    assert ("warnings" in protocol) == warns


@pytest.mark.parametrize("step,refused", [(800, True), (600, True), (801, False)])
def test_a_checkpoint_from_inside_the_quantisers_warm_up_is_refused_in_one_line(tmp_path, step, refused):
    """The codebook is fitted after step ``warm-up`` (training/trainer.py), so a checkpoint saved up to
    that step decodes its codes with a codebook that was never fitted: noise, not a measurement."""
    from nativetok_jax import checkpoints
    from nativetok_jax.evaluate import EvaluationError, _checkpoint_record, _require_fitted_codebook

    config = tiny_config()
    config.train.update(num_steps=3200, quantizer_warmup_fraction=0.25)  # the demo's: fitted after step 800
    checkpoints.write_config(tmp_path, config)
    (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
    if refused:
        with pytest.raises(EvaluationError, match=rf"newest checkpoint \(step {step}\) comes before the end of the "
                                                  r"quantiser warm-up \(the codebook is fitted after step 800\)"):
            _require_fitted_codebook(_checkpoint_record(str(tmp_path), use_ema=True))
    else:
        _require_fitted_codebook(_checkpoint_record(str(tmp_path), use_ema=True))


def test_without_a_warm_up_even_a_step_0_checkpoint_is_judged(tmp_path):
    """A converted model (pretrained.titok) is saved at step 0 and has no warm-up: nothing to refuse."""
    from nativetok_jax import checkpoints
    from nativetok_jax.evaluate import _checkpoint_record, _require_fitted_codebook

    checkpoints.write_config(tmp_path, tiny_config())
    (tmp_path / "checkpoints" / "0").mkdir(parents=True)
    _require_fitted_codebook(_checkpoint_record(str(tmp_path), use_ema=True))


@pytest.mark.slow
def test_the_flags_files_are_refused_before_the_checkpoint_is_restored(workdir, weights, tmp_path, monkeypatch):
    """A weights file of another kind, or reference statistics of another image size, is one line
    before the run's checkpoint is restored (it was read after the restore)."""
    lpips, inception = weights

    def restored(*args, **kwargs):
        raise AssertionError("the checkpoint was restored before the flags' files were checked")

    monkeypatch.setattr(Tokenizer, "from_checkpoint", restored)
    out = str(tmp_path / "eval.json")
    code = run_entry_point("--workdir", workdir, "--data", "photos", "--lpips", inception, "--out", out)
    assert isinstance(code, str) and code.startswith("error: ") and "lpips" in code and "\n" not in code
    stats = str(tmp_path / "reference_414.npz")
    fid.save_statistics(stats, np.zeros(2048), np.eye(2048), image_size=414)
    code = run_entry_point("--workdir", workdir, "--data", "photos", "--inception", inception, "--reference_stats",
                           stats, "--out", out)
    assert code == (f"error: --reference_stats: {stats} holds statistics of 414 x 414 px images, these are 16 x 16 "
                    f"px: use (or write) statistics made at 16 px")


def test_sample_evaluation_refuses_a_batch_size_or_image_count_below_one(tmp_path):
    """A batch size of 0 never closed a batch: every image went through Inception as one."""
    for flags, message in ((("--batch_size", "0"), "error: --batch_size: must be positive, got 0"),
                           (("--num_images", "-1"), "error: --num_images: must be positive, got -1")):
        code = run_entry_point("--samples", str(tmp_path), "--inception", "missing.npz", "--reference_stats",
                               "r.npz", "--out", str(tmp_path / "gen.json"), *flags)
        assert code == message
