"""D²iT through the project's entry points (task="d2it"): one tiny trained workdir shared by the
tests: its losses fall, stopping at step k and resuming equals the uninterrupted run (the shared
loop's SIGKILL test covers the kill), ``sample`` writes its files for every ``--grain_maps`` source,
bad input stops with one line, and the dynamic-grain experiment's report has its schema."""

import json
import os

import numpy as np
import pytest

import conftest  # 8 fake devices; assert_same_checkpoint
from nativetok_jax import checkpoints
from nativetok_jax.config import ConfigError, load_config_file, validate_d2it
from test_dvae_training import _scalars, dvae_train_config

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
STEPS = 24


def tiny_d2it_config(dvae_dir: str, num_steps: int = STEPS, **train):
    """configs/d2it_demo.py's structure on a 16 px DVAE (latent 8 x 8 x 4, grain map 4 x 4)."""
    config = load_config_file(os.path.join(ROOT, "configs", "d2it_demo.py"))
    m = config.model
    m.image_size, m.fine_factor, m.latent_channels = 16, 2, 4
    m.width, m.depth, m.refine_depth, m.num_heads = 32, 1, 1, 2
    config.grain_transformer.update(width=16, depth=1, num_heads=2)
    config.dvae.workdir = dvae_dir
    config.data.update(num_eval_images=8, num_threads=1)
    config.latents.update(num_train_examples=64, batch_size=16)
    defaults = dict(batch_size=8, learning_rate=3e-3, warmup_steps=2, log_every=1, eval_every=STEPS,
                    checkpoint_every=12, keep_checkpoints=5, ema_decay=0.9, eval_batch_size=8)
    config.train.update(num_steps=num_steps, **{**defaults, **train})
    config.train.preview.update(num_samples=4, respacing="ddim4")
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(dvae_dir, d2it_dir, summary)``: a 4-step random-routing DVAE and a 24-step D²iT on it."""
    from nativetok_jax.training.d2it_trainer import train_d2it
    from nativetok_jax.training.dvae_trainer import train_dvae

    root = tmp_path_factory.mktemp("d2it")
    dvae_dir, run_dir = str(root / "dvae"), str(root / "d2it")
    train_dvae(dvae_train_config(num_steps=4, eval_every=4, latent_scale_batches=1), dvae_dir)
    summary = train_d2it(tiny_d2it_config(dvae_dir), run_dir)
    return dvae_dir, run_dir, summary


@pytest.mark.slow
def test_tiny_d2it_trains_both_transformers_and_its_losses_fall(trained):
    dvae_dir, run_dir, summary = trained
    assert summary["step"] == STEPS and summary["num_train_examples"] == 64 and summary["num_eval_examples"] == 8
    for key in ("eps_mse_t100", "eps_mse_t500", "eps_mse_t900", "grain_nll"):
        assert np.isfinite(summary[key]), key
    assert 0 < summary["grain_nll"] < 2 and 0 <= summary["train_fine_fraction"] <= 1
    for name in ("content_loss", "grain_loss", "loss"):
        values = np.asarray(_scalars(run_dir, name))
        assert len(values) == STEPS and np.all(np.isfinite(values)), name
        assert values[-6:].mean() < values[:6].mean(), (name, values)
    assert set(os.listdir(os.path.join(run_dir, "images"))) == {f"samples_{STEPS:07d}.png"}
    assert json.loads(open(os.path.join(run_dir, "eval.json")).read())["step"] == STEPS
    assert summary["data"]["source"] == "photos"
    # The stores live in the DVAE's workdir (shared by every D²iT run on it).
    assert set(os.listdir(os.path.join(dvae_dir, "grain_latents"))) == {"train", "eval"}
    params, _ = checkpoints.load_params(run_dir)
    assert set(params) == {"content", "grain"}  # one state, both transformers


@pytest.mark.slow
def test_stopping_at_step_k_then_resuming_equals_the_uninterrupted_run(trained, tmp_path):
    from nativetok_jax.training.d2it_trainer import train_d2it

    dvae_dir, run_dir, _ = trained
    resumed = str(tmp_path / "resumed")
    assert train_d2it(tiny_d2it_config(dvae_dir, num_steps=12, eval_every=12), resumed)["step"] == 12
    assert train_d2it(tiny_d2it_config(dvae_dir), resumed)["step"] == STEPS
    conftest.assert_same_checkpoint(run_dir, resumed, STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["model", "ground_truth", "random"])
def test_sample_writes_images_grids_and_grain_maps(trained, tmp_path, mode):
    from PIL import Image

    from nativetok_jax.sample import sample_d2it

    _, run_dir, _ = trained
    out = str(tmp_path / mode)
    images, grains = sample_d2it(run_dir, out, grain_maps=mode, sampler="ddim", num_steps=3, num_samples=5,
                                 batch_size=4, guidance_scale=2.0)
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    assert grains.shape == (5, 4, 4) and set(np.unique(grains)) <= {0, 1}
    assert sorted(os.listdir(out)) == ["grid.png"] + [f"sample_{i:05d}.png" for i in range(5)] + ["samples.npz"]
    stored = np.load(os.path.join(out, "samples.npz"))
    np.testing.assert_array_equal(stored["arr_0"], images)
    np.testing.assert_array_equal(stored["grains"], grains)
    # Each sample beside its grain-map picture: one row of min(11 classes, 5) = 5 pairs, 2 px gaps,
    # upscaled 96 // 16 = 6 times.
    assert Image.open(os.path.join(out, "grid.png")).size == (6 * (10 * 18 + 2), 6 * (18 + 2))
    if mode == "ground_truth":  # the held-out store's maps and labels, example i mod 8
        from nativetok_jax.data.grain_latent_store import GrainLatentSource

        held_out = GrainLatentSource(os.path.join(trained[0], "grain_latents", "eval"))
        np.testing.assert_array_equal(grains, np.stack([held_out[i]["grains"][0] for i in range(5)]))
        np.testing.assert_array_equal(stored["arr_1"], [held_out[i]["label"] for i in range(5)])
    else:
        np.testing.assert_array_equal(stored["arr_1"], np.arange(5))  # labels cycle the classes
    if mode == "ground_truth":  # fixed maps: the latents' determinism alone (one more compile, so once)
        again, _ = sample_d2it(run_dir, str(tmp_path / "again"), grain_maps=mode, sampler="ddim", num_steps=3,
                               num_samples=5, batch_size=2, guidance_scale=2.0)
        # The same seed gives the same images whatever the batch (up to a rounding of the last uint8
        # level: programs for other batch sizes may round float32 differently).
        assert np.abs(again.astype(int) - images).max() <= 1


@pytest.mark.slow
def test_bad_input_is_one_line(trained, tmp_path):
    from nativetok_jax.sample import sample_d2it

    dvae_dir, run_dir, _ = trained
    with pytest.raises(ConfigError, match=r"^--grain_maps: must be one of"):
        sample_d2it(run_dir, str(tmp_path), grain_maps="learned")
    with pytest.raises(ConfigError, match=r"^--labels: ground-truth grain maps come with their own labels"):
        sample_d2it(run_dir, str(tmp_path), grain_maps="ground_truth", labels=[1])
    config = tiny_d2it_config("")
    with pytest.raises(ConfigError, match=r"^config.dvae.workdir: names no Dynamic VAE run"):
        validate_d2it(config)
    config = tiny_d2it_config(dvae_dir)
    config.train.grain_loss_weight = -1.0
    with pytest.raises(ConfigError, match=r"^config.train.grain_loss_weight: must be a number >= 0"):
        validate_d2it(config)
    from nativetok_jax.training.grain_latent_extraction import open_dvae

    config = tiny_d2it_config(dvae_dir)
    config.model.latent_channels = 8
    with pytest.raises(ConfigError, match=r"^config.model: the content transformer diffuses \(8, 8, 8\) latents"):
        open_dvae(config)
    config = tiny_d2it_config(run_dir)  # a D²iT workdir is no DVAE
    with pytest.raises(ConfigError, match=r"^config.dvae.workdir: .* not a Dynamic VAE"):
        open_dvae(config)


@pytest.mark.slow
def test_dynamic_grain_experiment_reports_both_arms_and_every_grain_map_row(trained, tmp_path):
    """Includes the ``--inception`` path, on a FID Inception file in the converter's format."""
    import ml_collections
    from flax import nnx

    from nativetok_jax.experiments import dynamic_grain
    from nativetok_jax.models.frozen.inception import InceptionV3
    from test_evaluate import random_weights

    dvae_dir, _, _ = trained
    routing = tmp_path / "routing"  # a routing experiment's layout; one DVAE stands for both arms here
    routing.mkdir()
    for arm in ("entropy", "single_grain"):
        os.symlink(dvae_dir, routing / arm)
    config = ml_collections.ConfigDict()
    config.d2it = tiny_d2it_config("")
    config.evaluation = ml_collections.ConfigDict(dict(num_samples=8, sampler="ddim", num_steps=2,
                                                       guidance_scale=1.0, seed=0, batch_size=8, bound_terms=2))
    inception = str(tmp_path / "inception.npz")
    random_weights(inception, nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), image_size=None)), "fid_inception")
    report = dynamic_grain.run(config, str(tmp_path / "run"), steps=2, routing_dir=str(routing), inception_path=inception)
    assert set(report["arms"]) == {"dit_fixed_grain", "d2it"} and report["budget"]["num_steps"] == 2
    for name, arm in report["arms"].items():
        assert arm["step"] == 2
        for key in ("eps_mse_t100", "eps_mse_t500", "eps_mse_t900", "grain_nll", "bound_total_bpd",
                    "bound_prior_bpd", "bound_kl_bpd", "bound_decoder_bpd"):
            assert np.isfinite(arm[key]), (name, key)
        assert arm["bound_total_bpd"] == pytest.approx(arm["bound_prior_bpd"] + arm["bound_kl_bpd"]
                                                       + arm["bound_decoder_bpd"], rel=1e-5)
        assert len(arm["data_fine_fraction_by_class"]) == 11
    assert set(report["arms"]["d2it"]["samples"]) == {"model", "ground_truth", "random"}
    assert set(report["arms"]["dit_fixed_grain"]["samples"]) == {"ground_truth"}
    for arm in report["arms"].values():
        for row in arm["samples"].values():
            assert 0 <= row["fine_fraction"] <= 1 and len(row["fine_fraction_by_class"]) == 11
            assert row["gfid"] > 0 and row["inception_score"] >= 1.0 - 1e-6, row
            assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1, row
    out = tmp_path / "run"
    assert json.loads((out / "dynamic_grain.json").read_text()) == json.loads(json.dumps(report))
    assert (out / "dynamic_grain.png").stat().st_size > 0
    assert (out / "dynamic_grain.md").read_text().startswith("| arm | grain maps | eps-MSE t=100 |")


@pytest.mark.slow
def test_resume_check_names_the_changed_fields_of_either_transformer(trained):
    from nativetok_jax.workdir import check_resume

    dvae_dir, run_dir, _ = trained
    check_resume(tiny_d2it_config(dvae_dir, num_steps=48), run_dir)  # more steps: fine
    for field, value in (("model.width", 64), ("grain_transformer.width", 32)):
        config = tiny_d2it_config(dvae_dir)
        section, name = field.split(".")
        config[section][name] = value
        expected = rf"holds checkpoints \(step {STEPS}\) of another model: config.{field} is"
        with pytest.raises(ConfigError, match=expected):
            check_resume(config, run_dir)


@pytest.mark.slow
def test_sampling_refuses_a_dvae_that_changed_since_the_run_trained(trained, tmp_path):
    """The run records its DVAE's step and latent scale; a DVAE trained further or rescaled since
    (here: the record says otherwise) would encode and scale latents otherwise: refused in one line."""
    import json
    import shutil

    from nativetok_jax.dvae import DVAE
    from nativetok_jax.sample import sample_d2it
    from nativetok_jax.workdir import UPSTREAM_FILE

    dvae_dir, run_dir, _ = trained
    with open(os.path.join(run_dir, UPSTREAM_FILE)) as f:
        recorded = json.load(f)
    assert recorded == {"dvae step": 4, "dvae latent_scale": DVAE.from_checkpoint(dvae_dir).latent_scale}
    changed = str(tmp_path / "run")
    shutil.copytree(run_dir, changed)
    with open(os.path.join(changed, UPSTREAM_FILE), "w") as f:
        json.dump(dict(recorded, **{"dvae step": 2}), f)
    with pytest.raises(ConfigError, match=r"was trained on other upstream models \(dvae step: 2 when it trained, 4 "
                                          r"now\); sampling would silently use the new ones"):
        sample_d2it(changed, str(tmp_path / "out"), num_samples=1, num_steps=2, sampler="ddim")


TWO_PROCESS_STORES = """
import sys
import jax

jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
sys.path.insert(0, sys.argv[3])
from test_d2it_training import tiny_d2it_config
from test_diffusion_training import tiny_dit_config
from nativetok_jax.training.d2it_trainer import train_d2it
from nativetok_jax.training.diffusion_trainer import train_diffusion

root, dvae_dir = sys.argv[4], sys.argv[5]
train_diffusion(tiny_dit_config(num_steps=1, checkpoint_every=1), root + "/dit")
config = tiny_d2it_config(dvae_dir, num_steps=1, eval_every=1, checkpoint_every=1)
config.latents.directory = root + "/grain_latents"
train_d2it(config, root + "/d2it")
"""


@pytest.mark.slow
def test_two_processes_share_the_latent_and_grain_latent_stores(trained, tmp_path):
    """One process pair trains DiT and D²iT for a step each: the stores each trainer writes are
    split between the processes (one shard each) and hold what one process writes alone."""
    import subprocess
    import sys

    from nativetok_jax.data.grain_latent_store import GrainLatentSource
    from nativetok_jax.data.latent_store import LatentSource
    from nativetok_jax.data.token_store import read_meta
    from nativetok_jax.models.dit.kl_autoencoder import PixelSpace
    from nativetok_jax.training.diffusion_trainer import latent_stores
    from test_diffusion_training import tiny_dit_config
    from test_generator_training import free_port

    dvae_dir = trained[0]
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4"))
    tests = os.path.dirname(os.path.abspath(__file__))
    processes = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_STORES, f"localhost:{port}", str(i), tests,
                                   str(tmp_path), dvae_dir], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
    for process in processes:
        _, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-3000:]

    # 64 training examples over 2 processes: two shards of 32 (whole batches of 16), one each.
    for store in (tmp_path / "dit" / "latents" / "train", tmp_path / "grain_latents" / "train"):
        meta = read_meta(store)
        assert meta["complete"] and meta["num_written"] == 64 and meta["shard_size"] == 32, store
        assert sorted(p.name for p in store.glob("labels-*.npy")) == ["labels-00000.npy", "labels-00001.npy"]
    alone = latent_stores(tiny_dit_config(), PixelSpace(), str(tmp_path / "alone"))
    for mine, together in zip(alone, (LatentSource(tmp_path / "dit" / "latents" / split) for split in ("train", "eval"))):
        for name, value in mine.columns().items():
            np.testing.assert_array_equal(together.columns()[name], value)
    for split in ("train", "eval"):  # the fixture's stores were written by one process
        mine = GrainLatentSource(os.path.join(dvae_dir, "grain_latents", split)).columns()
        together = GrainLatentSource(tmp_path / "grain_latents" / split).columns()
        for name in ("grains", "label"):
            np.testing.assert_array_equal(together[name], mine[name])
        for name in ("mean", "logvar"):
            np.testing.assert_allclose(together[name], mine[name], rtol=1e-5, atol=1e-5)
    for run in ("dit", "d2it"):
        assert json.loads((tmp_path / run / "eval.json").read_text())["step"] == 1


def test_dynamic_grain_checks_both_arms_and_the_evaluation_before_anything_trains(monkeypatch):
    """The D²iT arm's fields were first checked after both VAEs and the fixed-grain arm had
    trained; a bound of fewer than 2 terms failed in the middle of the first arm's judging."""
    from nativetok_jax.experiments import dynamic_grain

    monkeypatch.setattr(dynamic_grain, "train_dvae", lambda *a, **k: pytest.fail("a VAE trained first"))
    for field, value, message in (
            ("d2it.model.refine_depth", -1, r"^config.model.refine_depth: must be an integer >= 0, got -1$"),
            ("evaluation.sampler", "euler", r"^evaluation.sampler: must be one of \('ddpm', 'ddim'\), got 'euler'$"),
            ("evaluation.bound_terms", 1, r"^evaluation.bound_terms: must be None \(every step\) or an integer >= 2, "
                                          r"got 1$")):
        config = load_config_file(os.path.join(ROOT, "configs", "dynamic_grain.py"))
        *parents, name = field.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[name] = value
        with pytest.raises(ConfigError, match=message):
            dynamic_grain.run(config, "unused", steps=2)
