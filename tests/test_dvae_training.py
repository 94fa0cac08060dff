"""The Dynamic VAE trainer (task="dvae") on the shared loop: the loss falls, a SIGKILLed run
resumes to the uninterrupted run's parameters, the workdir loads back through
``DVAE.from_checkpoint`` with its latent scale, ``evaluate`` judges it, and bad input stops with
one line."""

import json
import os
import signal
import time

import jax
import numpy as np
import pytest

import conftest
from conftest import assert_same_checkpoint, flat
from nativetok_jax import checkpoints
from nativetok_jax.config import ConfigError, dvae_config
from nativetok_jax.dvae import DVAE
from nativetok_jax.models.d2it import grain_router
from test_training import finish, start_main


def dvae_train_config(num_steps: int = 8, routing: str = "random", thresholds: str = "", **train):
    """16 px photo crops, coarse f4 / fine f2, 8 fake devices sharing batches of 8."""
    config = dvae_config()
    config.model.update(image_size=16, filters=8, channel_multipliers=(1, 2, 2), num_res_blocks=1,
                        attention_resolutions=(), num_groups=4, latent_channels=4)
    config.model.grain.update(routing=routing, thresholds=thresholds)
    config.data.update(source="photos", crop_min=0.1, crop_max=0.3, num_eval_images=8, num_threads=1)
    config.train.losses.update(pixel="l1", perceptual_weight=0.0, adversarial_weight=0.0)
    defaults = dict(batch_size=8, learning_rate=3e-3, warmup_steps=2, log_every=2, eval_every=1000,
                    checkpoint_every=4, keep_checkpoints=5, ema_decay=0.9, latent_scale_batches=2)
    config.train.update(num_steps=num_steps, **{**defaults, **train})
    return config


@pytest.mark.slow
def test_dvae_loss_falls_and_the_run_loads_back_with_its_latent_scale(tmp_path):
    from nativetok_jax.training.dvae_trainer import train_dvae

    workdir = str(tmp_path / "run")
    config = dvae_train_config(num_steps=30, eval_every=30, log_every=1, ema_decay=0.0)
    summary = train_dvae(config, workdir)
    assert summary["step"] == 30 and np.isfinite(summary["psnr"])
    assert {"psnr_fine", "psnr_coarse", "fine_fraction", "latent_scale", "train_fine_fraction_per_class"} <= set(summary)
    assert 0.2 < summary["fine_fraction"] < 0.8  # random routing at r = 0.5 on 8 x 16 regions
    files = set(os.listdir(workdir))
    assert {"config.json", "eval.json", "latent_scale.json", "checkpoints", "images"} <= files
    assert summary["data"]["source"] == "photos" and summary["data"]["train_images"] > 0
    assert os.listdir(os.path.join(workdir, "images")) == ["reconstructions_0000030.png"]

    losses = _scalars(workdir, "l1_loss")
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5]), losses

    dvae = DVAE.from_checkpoint(workdir)
    stored = json.loads(open(os.path.join(workdir, "latent_scale.json")).read())
    assert dvae.latent_scale == pytest.approx(stored["latent_scale"]) and stored["latent_scale"] > 0
    # Extended with --config.train.num_steps, the run's newest checkpoint is no longer the one the
    # scale was measured on: until it finishes, the scale is 1.0 (as for any unfinished run).
    with open(os.path.join(workdir, "latent_scale.json"), "w") as f:
        json.dump(dict(stored, step=20), f)
    assert DVAE.from_checkpoint(workdir).latent_scale == 1.0
    with open(os.path.join(workdir, "latent_scale.json"), "w") as f:
        json.dump(stored, f)
    params, _ = checkpoints.load_params(workdir)
    for name, value in flat(params).items():
        np.testing.assert_array_equal(flat(jax.device_get(dvae.params))[name], value)
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), np.uint8)
    latents, grains = dvae.encode(images)
    assert latents.shape == (2, 8, 8, 4) and grains.shape == (2, 4, 4)
    assert dvae.decode(latents, grains).dtype == np.uint8

    from nativetok_jax.evaluate import run_evaluation  # the command's whole path, on the DVAE workdir

    out = str(tmp_path / "eval" / "dvae.json")
    report = run_evaluation(workdir, "photos", out, num_images=4, batch_size=3)
    assert report["num_images"] == 4 and np.isfinite(report["psnr"]) and 0 < report["ssim"] <= 1
    assert 0 <= report["fine_fraction"] <= 1 and set(report["fine_fraction_per_class"]) == {"0"}
    assert {"psnr_fine", "psnr_coarse"} <= set(report) and "codebook_usage" not in report
    # Beside the block means of its own routing: 16 regions of 4 px, a fine one 2 x 2 codes, a coarse one 1.
    assert np.isfinite(report["block_mean_psnr"]) and 0 < report["block_mean_ssim"] <= 1
    assert report["codes_per_image"] == pytest.approx(16 * (1 + 3 * report["fine_fraction"]))
    protocol = report["protocol"]
    assert protocol["routing"]["mode"] == "random" and protocol["latent_scale"] == dvae.latent_scale
    assert json.loads(open(out).read())["psnr"] == report["psnr"]


def _scalars(workdir: str, name: str) -> list[float]:
    """One logged scalar's values in step order, from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tensorboard.util.tensor_util import make_ndarray

    events = EventAccumulator(workdir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    if name in events.Tags()["scalars"]:
        return [e.value for e in events.Scalars(name)]
    return [float(make_ndarray(e.tensor_proto)) for e in events.Tensors(name)]  # clu writes tensors


def write_config_file(directory, **train) -> str:
    return conftest.write_config_file(directory, "test_dvae_training.dvae_train_config", **train)


@pytest.mark.slow
def test_a_sigkilled_dvae_run_resumes_to_the_uninterrupted_runs_parameters(tmp_path):
    config_file = write_config_file(str(tmp_path), checkpoint_every=2)
    runs = {name: str(tmp_path / name) for name in ("straight", "killed")}

    def wait_for_first_checkpoint(name):
        deadline = time.time() + 600
        while time.time() < deadline and not os.path.isdir(os.path.join(runs[name], "checkpoints", "2")):
            time.sleep(0.05)

    # The second run starts once the first has compiled, so it loads the programs from the cache.
    processes = {"straight": start_main(config_file, runs["straight"], "--config.train.num_steps=10")}
    wait_for_first_checkpoint("straight")
    processes["killed"] = start_main(config_file, runs["killed"], "--config.train.num_steps=10")
    wait_for_first_checkpoint("killed")
    processes["killed"].send_signal(signal.SIGKILL)
    code, stderr = finish(processes["straight"], timeout=900)
    assert code == 0, stderr[-3000:]
    assert finish(processes["killed"])[0] == -signal.SIGKILL
    saved = sorted(int(s) for s in os.listdir(os.path.join(runs["killed"], "checkpoints")) if s.isdigit())
    assert saved and saved[-1] < 10
    code, stderr = finish(start_main(config_file, runs["killed"], "--config.train.num_steps=10"), timeout=900)
    assert code == 0, stderr[-3000:]
    assert_same_checkpoint(runs["straight"], runs["killed"], 10)
    assert (json.loads(open(os.path.join(runs["killed"], "latent_scale.json")).read())
            == json.loads(open(os.path.join(runs["straight"], "latent_scale.json")).read()))


def test_bad_dvae_inputs_are_one_line_errors(tmp_path):
    from nativetok_jax.training.dvae_trainer import train_dvae

    with pytest.raises(ConfigError, match=r"train.losses.pixel"):
        config = dvae_train_config()
        config.train.losses.pixel = "l3"
        train_dvae(config, str(tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"model.grain.fine_ratio"):
        config = dvae_train_config()
        config.model.grain.fine_ratio = 1.5
        train_dvae(config, str(tmp_path / "b"))
    with pytest.raises(ConfigError, match=r"model.grain.thresholds"):
        train_dvae(dvae_train_config(routing="entropy"), str(tmp_path / "c"))
    other = tmp_path / "other.json"
    grain_router.GrainThresholds.from_entropies(np.linspace(0, 3, 100), grain_router.EntropySettings(8)).save(str(other))
    with pytest.raises(grain_router.GrainError, match="other"):
        train_dvae(dvae_train_config(routing="entropy", thresholds=str(other)), str(tmp_path / "d"))
    with pytest.raises(ValueError, match="not a Dynamic VAE"):
        os.makedirs(tmp_path / "e")
        checkpoints.write_config(str(tmp_path / "e"), conftest.tiny_config())
        DVAE.from_checkpoint(str(tmp_path / "e"))


def test_the_grain_latent_store_resumes_and_refuses_other_settings(tmp_path):
    from nativetok_jax.data.grain_latent_store import GrainLatentSource
    from nativetok_jax.data.sources import open_sources
    from nativetok_jax.data.token_store import TokenStoreError, read_meta, write_meta
    from nativetok_jax.training.grain_latent_extraction import extract_grain_latents

    config = dvae_train_config()
    dvae = DVAE.from_config(config, seed=0)
    source, _ = open_sources(config.data, 4)
    directory = str(tmp_path / "latents")

    def extract(seed=0):
        return extract_grain_latents(dvae, source, directory, data=config.data, num_examples=5, seed=seed,
                                     description={"dvae": "fresh"}, batch_size=2, shard_size=2)

    complete = extract()
    assert len(complete) == 5 and sorted(os.listdir(directory)).count("meta.json") == 1
    example = complete[4]
    assert example["mean"].shape == example["logvar"].shape == (2, 8, 8, 4)
    assert example["grains"].shape == (2, 4, 4) and example["label"] == 0
    expected = [complete[i] for i in range(5)]
    # The image and its flip are encoded on their own: the flip's latents are not flipped latents.
    images = np.stack([np.asarray(dvae.decode(e["mean"], e["grains"])) for e in expected[:1]])[0]
    assert images.shape == (2, 16, 16, 3)

    os.remove(os.path.join(directory, "mean-00001.npy"))  # killed while writing shard 1
    write_meta(directory, dict(read_meta(directory), complete=False))
    with pytest.raises(TokenStoreError, match="not a complete"):
        GrainLatentSource(directory)
    resumed = extract()
    for i in range(5):
        for name, value in expected[i].items():
            np.testing.assert_array_equal(resumed[i][name], value)
    with pytest.raises(TokenStoreError, match="seed"):
        extract(seed=1)


@pytest.mark.slow
def test_the_routing_experiment_reports_every_arm(tmp_path):
    from nativetok_jax.data.pipeline import eval_images
    from nativetok_jax.data.sources import open_sources
    from nativetok_jax.experiments.grain_routing import ARMS, arm_config, run, table

    settings = grain_router.EntropySettings(4)
    config = dvae_train_config(num_steps=2, checkpoint_every=2)
    source, _ = open_sources(config.data, 4)
    crops = eval_images(config.data, source, image_size=16, num_images=16, seed=3)
    thresholds = str(tmp_path / "thresholds.json")
    grain_router.GrainThresholds.from_entropies(np.asarray(grain_router.region_entropy(crops, settings)), settings).save(thresholds)
    config.model.grain.update(routing="entropy", thresholds=thresholds)
    assert arm_config(config, "single_grain").model.latent_channels == 10  # 4 (4 r + 1 - r) at r = 0.5

    report = run(config, str(tmp_path / "experiment"), steps=1)
    assert set(report["arms"]) == set(ARMS) and report["budget"]["num_steps"] == 1
    for arm, row in report["arms"].items():
        assert np.isfinite(row["psnr"]) and np.isfinite(row["psnr_entropy_fine_regions"] or 0.0), arm
    assert report["arms"]["fine"]["fine_fraction"] == 1 and report["arms"]["coarse"]["psnr_fine_regions"] is None
    floats = {arm: row["latent_floats_per_image"] for arm, row in report["arms"].items()}
    assert floats["single_grain"] == 16 * 10 and floats["fine"] == 16 * 4 * 4 and floats["coarse"] == 16 * 4
    assert set(report["model_free"]["arms"]) == {"entropy", "random", "fine", "coarse"}
    # Each trained arm beside the block means of its own routing: the model-free arms' figures for
    # the routings they share (the entropy arm routes as the entropy router, single_grain all coarse).
    free = report["model_free"]["arms"]
    for arm, model_free in (("entropy", "entropy"), ("fine", "fine"), ("coarse", "coarse"), ("single_grain", "coarse")):
        assert report["arms"][arm]["block_mean_psnr"] == pytest.approx(free[model_free]["psnr"], abs=1e-4), arm
    saved = json.loads(open(tmp_path / "experiment" / "grain_routing.json").read())
    assert saved["arms"]["entropy"]["psnr"] == report["arms"]["entropy"]["psnr"]
    assert os.path.getsize(tmp_path / "experiment" / "grain_routing.png") > 0
    assert "single_grain" in table(report)


@pytest.mark.slow
def test_a_trained_dvae_keeps_routing_with_the_thresholds_it_trained_with(tmp_path):
    """The run copies its thresholds file: regenerating the file at the same path neither re-routes
    the trained model nor passes unnoticed on resume; a file measured on other crops is refused."""
    from nativetok_jax.training.dvae_trainer import THRESHOLDS_FILE, train_dvae

    settings = grain_router.EntropySettings(4)
    measured_on = dict(source="photos", image_size=16, crop_min=0.1, crop_max=0.3)
    path = str(tmp_path / "thresholds.json")
    grain_router.GrainThresholds.from_entropies(np.linspace(0, 3, 100), settings, measured_on).save(path)
    config = dvae_train_config(num_steps=2, checkpoint_every=2, routing="entropy", thresholds=path)
    workdir = str(tmp_path / "run")
    train_dvae(config, workdir)
    trained = DVAE.from_checkpoint(workdir).router.thresholds
    assert trained == pytest.approx((1.5,), abs=0.02)
    assert checkpoints.read_config(workdir).model.grain.thresholds == os.path.join(workdir, THRESHOLDS_FILE)

    grain_router.GrainThresholds.from_entropies(np.linspace(0, 1, 100), settings, measured_on).save(path)  # regenerated
    assert DVAE.from_checkpoint(workdir).router.thresholds == trained
    with pytest.raises(ConfigError, match=r"^config\.model\.grain\.thresholds: .*thresholds\.json differs from the "
                                          r"thresholds this run trained with"):
        train_dvae(dvae_train_config(num_steps=4, routing="entropy", thresholds=path), workdir)

    for field, value in (("model.image_size", 64), ("data.crop_min", 0.5)):
        other = str(tmp_path / f"other_{field}.json")
        grain_router.GrainThresholds.from_entropies(np.linspace(0, 3, 100), settings,
                                             dict(measured_on, **{field.split(".")[1]: value})).save(other)
        with pytest.raises(ConfigError, match=rf"measured on other images: {field} {value} \(this run: "):
            train_dvae(dvae_train_config(routing="entropy", thresholds=other), str(tmp_path / field))
