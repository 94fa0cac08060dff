"""The diffusion trainer (task="diffusion"): the latent store, the loss falling, exact resume after
SIGKILL, the sample CLI's files, the diffusion benchmark, and the configs' one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

import conftest
from nativetok_jax import sharding
from nativetok_jax.config import ConfigError, dit_config, load_config_file, validate_dit
from nativetok_jax.data import token_store
from nativetok_jax.data.latent_store import LatentSource
from nativetok_jax.data.pipeline import SkippedImages
from nativetok_jax.data.sources import PhotoSource
from nativetok_jax.diffusion.gaussian import build_diffusion
from nativetok_jax.models.dit.kl_autoencoder import PixelSpace
from nativetok_jax.sample import diffusion_settings, sample_diffusion
from nativetok_jax.training.diffusion_trainer import (build_dit_state, diffusion_batch_shardings, diffusion_objective,
                                                      draw_latents, latent_encoder, latent_stores, train_diffusion)
from nativetok_jax.training.step import make_train_step
from nativetok_jax.training.token_extraction import encode_into_store, example_image
from nativetok_jax.workdir import check_resume

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def tiny_dit_config(num_steps: int = 8, **train):
    """The demo's structure at 8 px: pixel space, photographs labelled by photograph."""
    config = load_config_file(os.path.join(ROOT, "configs", "dit_demo.py"))
    m = config.model
    m.image_size, m.patch_size = 8, 2
    m.width, m.depth, m.num_heads = 32, 2, 2
    config.data.update(num_eval_images=8, num_threads=1)
    config.latents.update(num_train_examples=64, batch_size=16)
    defaults = dict(batch_size=8, learning_rate=2e-3, warmup_steps=2, log_every=2, eval_every=1000,
                    checkpoint_every=4, keep_checkpoints=5, ema_decay=0.9, eval_batch_size=8)
    config.train.update(num_steps=num_steps, **{**defaults, **train})
    config.train.preview.update(num_samples=4, respacing="ddim4")
    return config


def test_latent_store_holds_both_flips_exactly_resumes_and_refuses_other_settings(tmp_path):
    config = tiny_dit_config()
    train, held_out = latent_stores(config, PixelSpace(), str(tmp_path))
    assert isinstance(train, LatentSource) and len(train) == 64 and len(held_out) == 8
    assert train.moments_shape == (2, 1, 8, 8, 3) and train.deterministic  # pixels: the mean only
    moments, labels = train.arrays()
    data = config.data.copy_and_resolve_references()
    data.flip = False
    source = PhotoSource("train", labelled=True)
    images = np.stack([example_image(source, i, data, 8, config.train.seed, SkippedImages())[0] for i in range(64)])
    exact = (images.astype(np.float32) * 2 - 255) / np.float32(255)  # the float32 nearest to v / 127.5 - 1
    np.testing.assert_array_equal(moments[:, 0, 0], exact)
    np.testing.assert_array_equal(moments[:, 1, 0], moments[:, 0, 0, :, ::-1])  # the flip
    assert labels.tolist() == [i % 11 for i in range(64)]  # one class per photograph
    # A step's x0 is one of the two flips, never noised in pixel space.
    x0 = np.asarray(draw_latents(moments[:8], jax.random.key(0)))
    for i in range(8):
        assert any(np.array_equal(x0[i], moments[i, f, 0]) for f in (0, 1))

    # Shards: an interrupted encoding redoes only what is missing; other settings are refused.
    encode = latent_encoder(PixelSpace(), deterministic=True)
    kwargs = dict(data=data, image_size=8, num_examples=40, seed=3, description={"test": 1},
                  value_shapes=(2, 1, 8, 8, 3), store=LatentSource, batch_size=16,
                  shard_size=16)
    directory = str(tmp_path / "store")
    first = encode_into_store(encode, source, directory, **kwargs).arrays()[0]
    os.remove(token_store.shard_paths(directory, 1, "moments")[0])
    token_store.write_meta(directory, dict(token_store.read_meta(directory), complete=False))
    before = os.path.getmtime(token_store.shard_paths(directory, 0, "moments")[0])
    np.testing.assert_array_equal(encode_into_store(encode, source, directory, **kwargs).arrays()[0], first)
    assert os.path.getmtime(token_store.shard_paths(directory, 0, "moments")[0]) == before
    with pytest.raises(token_store.TokenStoreError, match="other settings .*seed"):
        encode_into_store(encode, source, directory, **dict(kwargs, seed=4))
    config.latents.num_train_examples = 32  # the trainer's stores are refused the same way
    with pytest.raises(token_store.TokenStoreError, match="num_examples"):
        latent_stores(config, PixelSpace(), str(tmp_path))


def test_tiny_dit_loss_falls(tmp_path):
    config = tiny_dit_config()
    train, _ = latent_stores(config, PixelSpace(), str(tmp_path))
    moments, labels = train.arrays()
    mesh = sharding.make_mesh(config.mesh)
    built = build_dit_state(config, mesh, sharding.rules_of(config))
    shardings = diffusion_batch_shardings(mesh, config.model, 16)
    step = make_train_step(diffusion_objective(built.graphdef, build_diffusion(), 0.1), built, shardings,
                           seed=0, ema_decay=0.9)
    batch = {"moments": jax.device_put(moments[:16], shardings["moments"]),
             "label": jax.device_put(labels[:16], shardings["label"])}
    state, losses = built.state, []
    for _ in range(40):
        state, metrics = step(state, batch)
        losses.append(float(metrics["mse"]))
    assert losses[0] == pytest.approx(1.0, abs=0.3)  # a zero output at initialisation: MSE of unit noise
    assert np.mean(losses[-8:]) < 0.6 * np.mean(losses[:8])


def start_main(config_file: str, workdir: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nativetok_jax.main", "--config", config_file, "--workdir", workdir,
                             *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run_and_samples(tmp_path):
    config_file = conftest.write_config_file(str(tmp_path), "test_diffusion_training.tiny_dit_config",
                                             num_steps=10, checkpoint_every=2, eval_every=10)
    runs = {name: str(tmp_path / name) for name in ("straight", "killed")}
    straight = start_main(config_file, runs["straight"])
    _, stderr = straight.communicate(timeout=600)
    assert straight.returncode == 0, stderr[-3000:]
    killed = start_main(config_file, runs["killed"])  # loads the first run's programs from the cache
    deadline = time.time() + 300
    while time.time() < deadline and not os.path.isdir(os.path.join(runs["killed"], "checkpoints", "2")):
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    saved = sorted(int(s) for s in os.listdir(os.path.join(runs["killed"], "checkpoints")) if s.isdigit())
    assert saved and saved[-1] < 10
    resumed = start_main(config_file, runs["killed"])
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    conftest.assert_same_checkpoint(runs["straight"], runs["killed"], 10)
    summary = json.loads(open(os.path.join(runs["straight"], "eval.json")).read())
    assert {"eps_mse_t100", "eps_mse_t500", "eps_mse_t900"} <= set(summary) and summary["step"] == 10
    assert summary["data"]["held_out_from"] == "other crops of the training photographs (data.photo_labels)"
    assert os.listdir(os.path.join(runs["straight"], "images")) == ["samples_0000010.png"]
    wider = tiny_dit_config(num_steps=10)
    wider.model.width = 64  # other parameter shapes: refused in one line before anything is written
    with pytest.raises(ConfigError, match=r"config\.model\.width is 64, config\.json has 32"):
        check_resume(wider, runs["straight"])

    # The sample CLI on the finished run: a grid, one PNG per sample, ADM's npz; batch-independent.
    out = str(tmp_path / "samples")
    images = sample_diffusion(runs["straight"], out, sampler="ddim", num_steps=3, guidance_scale=2.0, seed=1,
                              num_samples=5, batch_size=2, labels=[3, 4])
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
    assert sorted(os.listdir(out)) == ["grid.png"] + [f"sample_{i:05d}.png" for i in range(5)] + ["samples.npz"]
    with np.load(os.path.join(out, "samples.npz")) as npz:
        np.testing.assert_array_equal(npz["arr_0"], images)
        assert npz["arr_1"].tolist() == [3, 4, 3, 4, 3]
    np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(out, "sample_00002.png"))), images[2])
    again = sample_diffusion(runs["straight"], str(tmp_path / "again"), sampler="ddim", num_steps=3,
                             guidance_scale=2.0, seed=1, num_samples=5, batch_size=5, labels=[3, 4])
    np.testing.assert_array_equal(again, images)


def test_sample_flags_give_one_line_errors(tmp_path):
    model = tiny_dit_config().model
    cases = {"--sampler": dict(sampler="euler"), "--num_steps": dict(num_steps=0),
             "--guidance_scale": dict(guidance_scale=-1.0), "--num_samples": dict(num_samples=0),
             "--batch_size": dict(batch_size=0), "--top_k": dict(unused={"top_k": 3})}
    for flag, kwargs in cases.items():
        with pytest.raises(ConfigError, match=f"^{flag}: ") as error:
            diffusion_settings(model, **kwargs)
        assert "\n" not in str(error.value)
    assert diffusion_settings(model, sampler="ddpm")["respacing"] == "250"  # the config's ddim50 does not suit
    assert diffusion_settings(model, sampler="ddim", num_steps=25)["respacing"] == "ddim25"


def test_configs_build_and_validate(tmp_path):
    demo = load_config_file(os.path.join(ROOT, "configs", "dit_demo.py"))
    validate_dit(demo)
    assert demo.task == "diffusion" and demo.model.autoencoder.kind == "pixels" and demo.data.photo_labels
    b = load_config_file(os.path.join(ROOT, "configs", "dit.py") + ":B")
    assert (b.model.width, b.model.depth, b.model.patch_size, b.train.batch_size) == (768, 12, 2, 256)
    assert (b.train.learning_rate, b.train.weight_decay, b.train.ema_decay, b.train.beta2) == (1e-4, 0.0, 0.9999, 0.999)
    assert b.train.warmup_steps == 0 and b.train.final_learning_rate_ratio == 1.0 and b.model.label_drop_probability == 0.1
    with pytest.raises(ConfigError, match=r"^config\.model\.autoencoder\.weights: names no file"):
        validate_dit(b)
    weights = tmp_path / "sd_vae.npz"
    weights.write_bytes(b"")
    b.model.autoencoder.weights = str(weights)
    validate_dit(b)
    bad = {("train", "eval_timesteps", (100, 1000)): r"config\.train\.eval_timesteps",
           ("train", "ema_decay", 1.0): r"config\.train\.ema_decay", ("latents", "batch_size", 0): r"config\.latents\.batch_size",
           ("train", "eval_batch_size", 0): r"config\.train\.eval_batch_size"}
    for (section, name, value), field in bad.items():
        config = dit_config()
        config.model.autoencoder.update(kind="pixels")
        config[section][name] = value
        with pytest.raises(ConfigError, match=f"^{field}: ") as error:
            validate_dit(config)
        assert "\n" not in str(error.value)
    config = dit_config()
    config.train.preview.respacing = "ddim7x"
    config.model.autoencoder.update(kind="pixels")
    with pytest.raises(ConfigError, match=r"^config\.train\.preview\.respacing: "):
        validate_dit(config)
    few = tiny_dit_config()
    few.model.num_classes = 3  # fewer than the 11 photographs
    with pytest.raises(ConfigError, match=r"^config\.model\.num_classes: 3, but the data has 11 classes"):
        train_diffusion(few, str(tmp_path / "few"))


@pytest.mark.slow
def test_bench_diffusion_report_equals_its_json(tmp_path, capsys):
    from nativetok_jax.bench import diffusion as bench

    config_file = conftest.write_config_file(str(tmp_path), "test_diffusion_training.tiny_dit_config")
    out = str(tmp_path / "bench.json")
    report = bench.run(["--configs", config_file, "--batch_sizes", "8", "--sample_images", "2", "--sampler_steps", "2",
                        "--steps", "1", "--out", out])
    printed = capsys.readouterr().out
    assert json.loads(open(out).read()) == json.loads(json.dumps(report))
    (row,) = report["train"]
    assert row["batch_size"] == 8 and row["step_gflops"] > 0 and row["latent"] == "8x8x3"
    assert f"{row['step_s'] * 1e3:.1f}" in printed and f"{row['step_gflops']:.1f}" in printed
    assert [(s["sampler"], s["steps"], s["timed_steps"], s["guidance_scale"]) for s in report["samplers"]] == [
        ("ddpm", 250, 2, 1.0), ("ddpm", 250, 2, 4.0), ("ddim", 50, 2, 1.0), ("ddim", 50, 2, 4.0)]
    for s in report["samplers"]:
        assert f"{s['images_per_s']:.3g}" in printed


def test_bench_diffusion_sizes_belong_to_the_configs_they_name():
    """The default sizes are the default configs'; with --configs every size is given (one value
    per config or one for all), so no default lands on a config it was not sized for."""
    from nativetok_jax.bench import diffusion as bench

    two = "configs/d2it.py:B,configs/dit.py:B"
    with pytest.raises(SystemExit, match=r"^error: --sample_images: give one value per config \(or one for all\) with --configs$"):
        bench.run(["--configs", two, "--batch_sizes", "2", "--sampler_steps", "4"])
    with pytest.raises(SystemExit, match=r"^error: --batch_sizes needs one value per config \(2\) or one for all, got '2,2,2'$"):
        bench.run(["--configs", two, "--batch_sizes", "2,2,2", "--sample_images", "8", "--sampler_steps", "4"])
    assert set(bench.DEFAULTS) == {"configs/dit.py:B", "configs/dit_demo.py"}
