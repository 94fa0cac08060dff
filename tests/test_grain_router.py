"""D²iT's router: region entropy, grain maps, thresholds, neighbour copying, the thresholds tool and
the model-free routing experiment (docs/d2it.md "Stage 1")."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from nativetok_jax.config import dvae_config
from nativetok_jax.evaluation.block_mean_routing import block_mean_routing, block_means, shuffled_grains
from nativetok_jax.models.d2it import grain_router
from nativetok_jax.models.d2it.grain_router import EntropySettings, GrainError, GrainThresholds

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def to_images(gray: np.ndarray) -> np.ndarray:
    """Gray levels in [0, 1] ``[..., H, W]`` -> uint8 RGB with R = G = B."""
    return np.repeat(np.round(np.clip(gray, 0, 1) * 255)[..., None], 3, axis=-1).astype(np.uint8)


def varied_images(rng: np.random.Generator, count: int, size: int, region: int) -> np.ndarray:
    """Images whose regions are flat, two-tone, Gaussian noise or uniform noise, at random levels and spreads."""
    n = size // region
    grays = np.empty((count, size, size))
    for b in range(count):
        for i in range(n):
            for j in range(n):
                level, spread = rng.uniform(0.1, 0.9), rng.uniform(0.01, 0.4)
                kind = rng.integers(4)
                shape = (region, region)
                block = {0: lambda: np.full(shape, level),
                         1: lambda: np.where(rng.random(shape) < 0.5, level - spread / 2, level + spread / 2),
                         2: lambda: level + spread / 3 * rng.standard_normal(shape),
                         3: lambda: rng.uniform(level - spread, level + spread, shape)}[int(kind)]()
                grays[b, i * region:(i + 1) * region, j * region:(j + 1) * region] = block
    return to_images(grays)


def numpy_entropy(images: np.ndarray, settings: EntropySettings) -> np.ndarray:
    """The formula written out in float64, region by region and bin by bin."""
    s = settings.region_size
    gray = images.astype(np.float64) / 255.0 @ np.array([0.2989, 0.5870, 0.1140])
    bins = np.linspace(settings.low, settings.high, settings.num_bins)
    b, h, w = gray.shape
    out = np.zeros((b, h // s, w // s))
    for n in range(b):
        for i in range(h // s):
            for j in range(w // s):
                values = gray[n, i * s:(i + 1) * s, j * s:(j + 1) * s].reshape(-1)
                density = np.array([np.mean(np.exp(-0.5 * ((values - c) / settings.sigma) ** 2)) for c in bins])
                p = density / density.sum()
                p = p[p > 0]
                out[n, i, j] = -np.sum(p * np.log(p))
    return out


# ------------------------------------------------------------------------------------- entropy


@pytest.mark.parametrize("region", [8, 16])
def test_entropy_ranks_flat_two_tone_gaussian_uniform_at_every_gray_level(region):
    rng = np.random.default_rng(0)
    settings = EntropySettings(region)
    shape = (region, region)
    for level in (0.1, 0.3, 0.5, 0.7, 0.9):
        grays = np.stack([
            np.full(shape, level),
            np.where(rng.random(shape) < 0.5, level - 0.08, level + 0.08),
            level + 0.05 * rng.standard_normal(shape),
            rng.uniform(level - 0.35, level + 0.35, shape),
        ])
        entropy = np.asarray(grain_router.region_entropy(to_images(grays), settings))[:, 0, 0]
        assert np.all(np.diff(entropy) > 0.2), (level, entropy)


def test_entropy_is_exactly_invariant_to_permuting_a_regions_pixels():
    rng = np.random.default_rng(1)
    settings = EntropySettings(8)
    images = varied_images(rng, 4, 16, 8)
    permuted = images.copy()
    for b in range(4):
        for i in (0, 8):
            for j in (0, 8):
                block = permuted[b, i:i + 8, j:j + 8].reshape(64, 3)
                permuted[b, i:i + 8, j:j + 8] = block[rng.permutation(64)].reshape(8, 8, 3)
    assert not np.array_equal(images, permuted)
    np.testing.assert_array_equal(grain_router.region_entropy(images, settings), grain_router.region_entropy(permuted, settings))


@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
def test_k_equal_mass_levels_with_a_tiny_sigma_give_ln_k(k):
    settings = EntropySettings(8, sigma=1e-4)  # 64 bins on [0, 1]; every level sits on a bin
    bins = np.linspace(0, 1, 64)
    levels = bins[np.linspace(3, 60, k).astype(int)]
    gray = np.repeat(levels, 64 // k)[None].reshape(1, 8, 8)
    entropy = grain_router.gray_region_entropy(jnp.asarray(gray), settings)
    np.testing.assert_allclose(np.asarray(entropy)[0, 0, 0], math.log(k), atol=1e-5)


def test_entropy_equals_an_independent_numpy_computation():
    rng = np.random.default_rng(2)
    for settings in (EntropySettings(8), EntropySettings(8, num_bins=32, sigma=0.02, low=-1.0, high=1.0)):
        images = varied_images(rng, 3, 16, 8)
        np.testing.assert_allclose(grain_router.region_entropy(images, settings), numpy_entropy(images, settings),
                                   rtol=1e-5, atol=1e-5)


def test_entropy_in_many_small_steps_equals_the_independent_computation(monkeypatch):
    """A budget of one region position per step of the loop (as 256 px batches get): same values."""
    settings = EntropySettings(8, num_bins=16, sigma=0.03)
    images = varied_images(np.random.default_rng(3), 4, 24, 8)
    monkeypatch.setattr(grain_router, "KERNEL_BUDGET", 4 * 64 * 16)  # one position of 4 images
    np.testing.assert_allclose(grain_router.gray_region_entropy(grain_router.gray_of(jnp.asarray(images)), settings),
                               numpy_entropy(images, settings), rtol=1e-5, atol=1e-5)


def test_entropy_of_a_batch_sharded_over_devices_moves_no_data_between_them(monkeypatch):
    """The loop over the batch axis that the mesh shards made XLA all-gather every image onto every
    device (8 GiB per chip and step for the 256 px DVAE on v5e:16x16); the loop over region
    positions keeps each device on its own images."""
    monkeypatch.setattr(grain_router, "KERNEL_BUDGET", 8 * 64 * 16)  # several steps of the loop
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    gray = jax.ShapeDtypeStruct((8, 32, 32), jnp.float32, sharding=sharded)
    settings = EntropySettings(8, num_bins=16, sigma=0.03)
    hlo = grain_router.gray_region_entropy.lower(gray, settings).compile().as_text()
    assert not any(op in hlo for op in ("all-gather", "all-to-all", "all-reduce", "collective-permute")), hlo


def test_default_bins_are_region_size_squared():
    assert EntropySettings(16).num_bins == 256 and EntropySettings(8, num_bins=32).num_bins == 32


# ------------------------------------------------------------------------------------- grain map


def test_grain_map_commutes_with_flips():
    rng = np.random.default_rng(3)
    settings = EntropySettings(8)
    images = varied_images(rng, 6, 32, 8)
    # Median of these very images: many regions sit near the threshold.
    threshold = float(np.median(np.asarray(grain_router.region_entropy(images, settings))))
    grains = np.asarray(grain_router.grain_map(images, [threshold], settings))
    assert 0 < grains.mean() < 1
    for axis in (1, 2):
        flipped = np.asarray(grain_router.grain_map(np.flip(images, axis), [threshold], settings))
        np.testing.assert_array_equal(flipped, np.flip(grains, axis))


def test_flat_left_half_is_coarse_and_noisy_right_half_is_fine():
    rng = np.random.default_rng(4)
    settings = EntropySettings(8)
    thresholds = GrainThresholds.from_entropies(grain_router.region_entropy(varied_images(rng, 8, 32, 8), settings), settings)
    gray = np.concatenate([np.full((16, 16), 0.4), rng.uniform(0, 1, (16, 16))], axis=1)[None]
    grains = np.asarray(grain_router.grain_map(to_images(gray), thresholds.thresholds(0.5), settings))
    np.testing.assert_array_equal(grains[0], [[0, 0, 1, 1], [0, 0, 1, 1]])


def test_a_percentile_leaves_about_the_rest_of_distinct_entropies_above_it():
    rng = np.random.default_rng(5)
    settings = EntropySettings(8)
    entropy = np.unique(np.asarray(grain_router.region_entropy(varied_images(rng, 64, 32, 8), settings)))
    assert entropy.size > 800
    thresholds = GrainThresholds.from_entropies(entropy, settings)
    for ratio in (0.1, 0.25, 0.5, 0.75, 0.9):
        (threshold,) = thresholds.thresholds(ratio)
        fraction = np.mean(np.asarray(grain_router.grains_of(jnp.asarray(entropy), [threshold])))
        assert abs(fraction - ratio) < 0.01, (ratio, fraction)


def test_an_all_flat_set_has_no_fine_region():
    settings = EntropySettings(8)
    flat = to_images(np.full((4, 16, 16), 0.37))
    thresholds = GrainThresholds.from_entropies(grain_router.region_entropy(flat, settings), settings)
    for ratio in (0.01, 0.5, 0.99):
        assert not np.asarray(grain_router.grain_map(flat, thresholds.thresholds(ratio), settings)).any()
    # Flat regions at any level stay coarse under thresholds measured on varied images.
    rng = np.random.default_rng(6)
    varied = GrainThresholds.from_entropies(grain_router.region_entropy(varied_images(rng, 16, 32, 8), settings), settings)
    levels = to_images(np.linspace(0, 1, 13)[:, None, None] * np.ones((13, 8, 8)))
    assert not np.asarray(grain_router.grain_map(levels, varied.thresholds(0.5), settings)).any()


def test_fine_needs_an_entropy_strictly_above_the_threshold():
    entropy = jnp.asarray([1.0, np.nextafter(np.float32(1.0), np.float32(2.0)), 0.5, 2.0])
    np.testing.assert_array_equal(grain_router.grains_of(entropy, [1.0]), [0, 1, 0, 1])
    # Three grains: the number of ascending thresholds strictly exceeded.
    np.testing.assert_array_equal(grain_router.grains_of(entropy, [0.5, 1.0]), [1, 2, 0, 2])


def test_random_grain_maps_realise_the_ratios():
    grains = np.asarray(grain_router.random_grain_map(jax.random.key(0), (64, 16, 16), (0.3, 0.2)))
    counts = np.bincount(grains.reshape(-1), minlength=3) / grains.size
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.01)


def test_ratios_pick_the_dqvae_percentile():
    settings = EntropySettings(8)
    thresholds = GrainThresholds(settings, tuple(float(p) for p in range(1, 100)), 99)  # percentile p -> p
    assert thresholds.thresholds(0.5) == (50.0,)
    assert thresholds.thresholds(0.3) == pytest.approx((70.0,))
    assert thresholds.thresholds(0.255) == pytest.approx((74.5,))  # between stored percentiles
    assert thresholds.thresholds((0.3, 0.3)) == pytest.approx((40.0, 70.0))


# ------------------------------------------------------------------------------------- neighbour copying


def test_neighbour_copying_holds_exact_copies_of_coarse_codes_and_the_fine_codes():
    rng = np.random.default_rng(7)
    coarse = rng.standard_normal((2, 3, 3, 5)).astype(np.float32)
    fine = rng.standard_normal((2, 6, 6, 5)).astype(np.float32)
    grains = rng.integers(0, 2, (2, 3, 3))
    out = np.asarray(grain_router.neighbour_copy([jnp.asarray(coarse), jnp.asarray(fine)], jnp.asarray(grains)))
    for b in range(2):
        for i in range(3):
            for j in range(3):
                cells = out[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
                expected = fine[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2] if grains[b, i, j] else np.broadcast_to(coarse[b, i, j], (2, 2, 5))
                np.testing.assert_array_equal(cells, expected)
    weights = np.asarray(grain_router.code_weights(jnp.asarray(grains), (16, 8)))
    np.testing.assert_array_equal(weights, np.where(np.repeat(np.repeat(grains, 2, 1), 2, 2) == 1, 1.0, 0.25))
    # The weights count each code once: 4 per fine region, 1 per coarse one.
    np.testing.assert_allclose(weights.sum(axis=(1, 2)), 4 * grains.sum(axis=(1, 2)) + (9 - grains.sum(axis=(1, 2))))


def test_three_grains_copy_onto_the_finest_grid():
    rng = np.random.default_rng(8)
    codes = [rng.standard_normal((1, n, n)).astype(np.float32) for n in (2, 4, 8)]
    grains = np.array([[[0, 1], [2, 0]]])
    out = np.asarray(grain_router.neighbour_copy([jnp.asarray(c) for c in codes], jnp.asarray(grains)))
    np.testing.assert_array_equal(out[0, :4, :4], np.full((4, 4), codes[0][0, 0, 0]))
    np.testing.assert_array_equal(out[0, :4, 4:], np.repeat(np.repeat(codes[1][0, :2, 2:], 2, 0), 2, 1))
    np.testing.assert_array_equal(out[0, 4:, :4], codes[2][0, 4:, :4])
    weights = np.asarray(grain_router.code_weights(jnp.asarray(grains), (32, 16, 8)))
    assert weights.sum() == 1 + 4 + 16 + 1


def test_gradients_reach_only_the_grain_each_region_chose():
    rng = np.random.default_rng(9)
    grains = jnp.asarray(rng.integers(0, 2, (2, 3, 3)))
    coarse, fine = jnp.asarray(rng.standard_normal((2, 3, 3, 4))), jnp.asarray(rng.standard_normal((2, 6, 6, 4)))
    g_coarse, g_fine = jax.grad(lambda c, f: jnp.sum(grain_router.neighbour_copy([c, f], grains)), argnums=(0, 1))(coarse, fine)
    chosen = np.asarray(grains)[..., None]
    np.testing.assert_array_equal(g_coarse, np.where(chosen == 0, 4.0, 0.0) * np.ones(4))
    fine_chosen = np.repeat(np.repeat(chosen, 2, 1), 2, 2)
    np.testing.assert_array_equal(g_fine, np.where(fine_chosen == 1, 1.0, 0.0) * np.ones(4))


def test_average_copies_leaves_copies_alone_and_projects_anything_onto_them():
    rng = np.random.default_rng(10)
    grains = jnp.asarray(rng.integers(0, 2, (2, 2, 2)))
    copied = grain_router.neighbour_copy([jnp.asarray(rng.standard_normal((2, 2, 2, 3))),
                                   jnp.asarray(rng.standard_normal((2, 4, 4, 3)))], grains)
    np.testing.assert_allclose(grain_router.average_copies(copied, grains, (8, 4)), copied, rtol=1e-6)
    anything = jnp.asarray(rng.standard_normal((2, 4, 4, 3)))
    projected = grain_router.average_copies(anything, grains, (8, 4))
    np.testing.assert_allclose(grain_router.average_copies(projected, grains, (8, 4)), projected, rtol=1e-6)


# ------------------------------------------------------------------------------------- router and errors


def test_fixed_grain_routers():
    settings = EntropySettings(8)
    images = np.zeros((2, 16, 24, 3), np.uint8)
    assert np.asarray(grain_router.GrainRouter((8, 4), settings, "fine")(images)).tolist() == [[[1] * 3] * 2] * 2
    assert not np.asarray(grain_router.GrainRouter((8, 4), settings, "coarse")(images)).any()
    random = grain_router.GrainRouter((8, 4), settings, "random", ratios=(0.5,))
    assert random(images, jax.random.key(0)).shape == (2, 2, 3)
    with pytest.raises(GrainError, match="needs a PRNG key"):
        random(images)


@pytest.mark.parametrize("shape, dtype, message", [
    ((1, 30, 32, 3), np.uint8, "30 x 32 px do not split into 8 x 8 px regions"),
    ((1, 32, 32), np.uint8, r"must be uint8 \[B, H, W, 3\]"),
    ((1, 32, 32, 3), np.float32, "must be uint8"),
])
def test_bad_images_give_one_line_errors(shape, dtype, message):
    with pytest.raises(GrainError, match=message) as info:
        grain_router.region_entropy(np.zeros(shape, dtype), EntropySettings(8))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_grain_ratios_outside_zero_one_give_one_line_errors(ratio):
    thresholds = GrainThresholds(EntropySettings(8), tuple(float(p) for p in range(1, 100)), 99)
    with pytest.raises(GrainError, match=r"grain ratio must lie in \(0, 1\)") as info:
        thresholds.thresholds(ratio)
    assert "\n" not in str(info.value)
    with pytest.raises(GrainError, match="outside the stored 1..99"):
        thresholds.thresholds(0.995)


def test_a_thresholds_file_of_other_settings_is_refused(tmp_path):
    path = str(tmp_path / "t.json")
    GrainThresholds(EntropySettings(8), tuple(float(p) for p in range(1, 100)), 99, {"source": "photos"}).save(path)
    loaded = GrainThresholds.load(path, EntropySettings(8))
    assert loaded.threshold_at(50) == 50.0 and loaded.data == {"source": "photos"}
    with pytest.raises(GrainError, match=r"other entropy settings: sigma 0.01 \(wanted 0.02\)") as info:
        GrainThresholds.load(path, EntropySettings(8, sigma=0.02))
    assert "\n" not in str(info.value)
    with pytest.raises(GrainError, match="does not exist"):
        GrainThresholds.load(str(tmp_path / "missing.json"), EntropySettings(8))


# ------------------------------------------------------------------------------------- the thresholds tool


def folder_config(tmp_path):
    """The demo's DVAE on a folder of 8 tiny images: 4 flat, 4 noisy."""
    rng = np.random.default_rng(11)
    folder = tmp_path / "images"
    folder.mkdir()
    for n in range(8):
        gray = np.full((40, 40), 0.1 * n) if n % 2 else rng.uniform(0, 1, (40, 40))
        Image.fromarray(to_images(gray)).save(folder / f"{n}.png")
    config = dvae_config()
    config.model.update(image_size=32, filters=16, channel_multipliers=(1, 2, 2, 4), num_groups=8)
    config.data.update(source="folder", path=str(folder), crop_min=1.0, crop_max=1.0, num_eval_images=2)
    return config


@pytest.mark.slow
def test_thresholds_tool_end_to_end_on_a_folder(tmp_path):
    config = folder_config(tmp_path)
    config_file = tmp_path / "dvae_folder.py"
    config_file.write_text(
        f"import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\nfrom test_grain_router import folder_config\n"
        f"import pathlib\n\ndef get_config():\n    return folder_config(pathlib.Path({str(tmp_path / 'cfg')!r}))\n")
    (tmp_path / "cfg").mkdir()
    out = tmp_path / "out" / "thresholds.json"
    result = subprocess.run([sys.executable, "-m", "nativetok_jax.grain_thresholds", f"--config={config_file}",
                             f"--out={out}", "--num_images=24", "--batch_size=8"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "percentiles 1..99 of 384 regions (24 crops)" in result.stdout
    content = json.loads(out.read_text())
    assert content["entropy"] == {"region_size": 8, "num_bins": 64, "sigma": 0.01, "low": 0.0, "high": 1.0,
                                  "gray_weights": [0.2989, 0.587, 0.114], "log": "natural"}
    assert content["data"]["source"] == "folder" and content["data"]["num_images"] == 24
    values = [content["percentiles"][str(p)] for p in range(1, 100)]
    assert values == sorted(values) and values[0] < values[-1]
    # Half the training images are flat, half noise: the median cut separates them.
    from nativetok_jax.models.d2it.dvae import DVAEConfig
    config.model.grain.thresholds = str(out)
    router = DVAEConfig.from_model_config(config.model).router()
    noise = to_images(np.random.default_rng(12).uniform(0, 1, (1, 32, 32)))
    assert np.asarray(router(noise)).all() and not np.asarray(router(to_images(np.full((1, 32, 32), 0.3)))).any()
    # Other entropy settings: refused with one line.
    config.model.grain.sigma = 0.05
    with pytest.raises(GrainError, match="other entropy settings: sigma"):
        DVAEConfig.from_model_config(config.model).router()
    # A bad flag: one line on stderr, exit status 1.
    bad = subprocess.run([sys.executable, "-m", "nativetok_jax.grain_thresholds", f"--config={config_file}",
                          f"--out={out}", "--num_images=0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: --num_images")


def test_the_thresholds_tool_refuses_a_config_it_cannot_measure_before_reading_data(tmp_path, monkeypatch):
    """A tokenizer's config, or a DVAE config whose crops cannot be cut, is one line before any image
    is read (it was measured, or failed deep in the pipeline)."""
    from conftest import tiny_config
    from nativetok_jax import grain_thresholds
    from nativetok_jax.config import ConfigError

    monkeypatch.setattr(grain_thresholds.sources, "open_sources", lambda *a, **k: pytest.fail("data was read"))
    with pytest.raises(ConfigError, match=r"^--config: its model routes no grains \(no model.grain\); grain_thresholds "
                                          r"measures the crops of a Dynamic VAE config \(configs/dvae_demo.py\), not of "
                                          r"a tokenizer run \(task 'tokenizer'\)$"):
        grain_thresholds.compute_thresholds(tiny_config(), 8)
    config = folder_config(tmp_path)
    config.data.update(crop_min=0.9, crop_max=0.5)
    with pytest.raises(ConfigError, match=r"data.crop"):
        grain_thresholds.compute_thresholds(config, 8)


# ------------------------------------------------------------------------------------- model-free experiment


def test_block_means_and_shuffled_grains():
    rng = np.random.default_rng(13)
    images = rng.integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    means = block_means(images, 4)
    np.testing.assert_array_equal(means[0, :4, :4, 1], np.round(images[0, :4, :4, 1].mean()))
    grains = rng.integers(0, 2, (5, 4, 4))
    shuffled = shuffled_grains(grains, 0)
    np.testing.assert_array_equal(shuffled.sum(axis=(1, 2)), grains.sum(axis=(1, 2)))
    assert not np.array_equal(shuffled, grains)


def test_model_free_routing_puts_the_fine_grain_where_it_pays():
    rng = np.random.default_rng(14)
    settings = EntropySettings(8)
    images = varied_images(rng, 16, 32, 8)
    thresholds = GrainThresholds.from_entropies(grain_router.region_entropy(images, settings), settings)
    router = grain_router.GrainRouter((8, 4), settings, "entropy", thresholds.thresholds(0.5))
    report = block_mean_routing(images, router, seed=0)
    arms = report["arms"]
    assert arms["entropy"]["fine_fraction"] == arms["random"]["fine_fraction"] == pytest.approx(0.5, abs=0.02)
    assert arms["entropy"]["codes_per_image"] == arms["random"]["codes_per_image"]
    assert arms["fine"]["codes_per_image"] == 64 and arms["coarse"]["codes_per_image"] == 16
    assert arms["coarse"]["psnr"] < arms["random"]["psnr"] < arms["entropy"]["psnr"] < arms["fine"]["psnr"]
    # Entropy routing sends the smooth regions coarse: they lose less there than random ones do.
    assert arms["entropy"]["psnr_coarse_regions"] > arms["random"]["psnr_coarse_regions"]
    assert arms["fine"]["psnr_coarse_regions"] is None and arms["coarse"]["psnr_fine_regions"] is None
    json.dumps(report)  # serialisable as the experiment's JSON


def test_three_grains_route_by_two_thresholds():
    rng = np.random.default_rng(15)
    settings = EntropySettings(16)
    gray = np.concatenate([np.full((16, 16), 0.5), np.where(rng.random((16, 16)) < 0.5, 0.3, 0.7),
                           rng.uniform(0, 1, (16, 16))], axis=1)[None]
    images = to_images(gray)
    flat, two_tone, noise = np.asarray(grain_router.region_entropy(images, settings))[0, 0]
    thresholds = ((flat + two_tone) / 2, (two_tone + noise) / 2)
    router = grain_router.GrainRouter((16, 8, 4), settings, "entropy", thresholds)
    np.testing.assert_array_equal(router(images), [[[0, 1, 2]]])
    with pytest.raises(GrainError, match="3 grains need 2 thresholds, got 1"):
        grain_router.GrainRouter((16, 8, 4), settings, "entropy", thresholds[:1])
    with pytest.raises(GrainError, match="region_size 8 must equal the coarsest factor 16"):
        grain_router.GrainRouter((16, 8), EntropySettings(8), "entropy", thresholds[:1])
    with pytest.raises(GrainError, match="thresholds must be ascending"):
        grain_router.GrainRouter((16, 8, 4), settings, "entropy", thresholds[::-1])
