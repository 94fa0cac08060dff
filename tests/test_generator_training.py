"""Generators on a tokenizer's ids: token extraction round-trips and resumes, a tiny generator
trains through the same entry point as the tokenizer, and `sample` writes seeded PNGs; on two
processes each encodes its own share of the tokens and a resumed run redoes only what is missing."""

import json
import os
import socket

import jax
import numpy as np
import pytest

import conftest
from test_training import finish, start_main, train_config
from nativetok_jax import Tokenizer, checkpoints, storage
from nativetok_jax.config import ConfigError, generator_config, validate_generator
from nativetok_jax.data import token_store
from nativetok_jax.data.pipeline import SkippedImages
from nativetok_jax.data.sources import PhotoSource
from nativetok_jax.sample import sample_images
from nativetok_jax.training.guards import NonFiniteLossError
from nativetok_jax.training.generator_trainer import train_generator
from nativetok_jax.training.token_extraction import example_image, extract_tokens
from nativetok_jax.training.trainer import train_and_evaluate


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("tokenizer"))
    train_and_evaluate(train_config(num_steps=2, checkpoint_every=2), workdir)
    return workdir


def tiny_generator_config(tokenizer_dir: str, kind: str = "ar"):
    config = generator_config()
    config.data = train_config().data
    g = config.generator
    g.update(kind=kind, tokenizer=tokenizer_dir, width=32, depth=2, num_heads=2, num_train_examples=96,
             num_eval_examples=16, extract_batch_size=16)
    g.sample.update(num_samples=4, guidance_scale=1.0)
    config.train.update(num_steps=30, batch_size=16, learning_rate=3e-3, warmup_steps=2, log_every=10,
                        eval_every=30, checkpoint_every=30)
    return config


def test_token_store_round_trips_and_resumes(tokenizer_dir, tmp_path):
    tokenizer = Tokenizer.from_checkpoint(tokenizer_dir)
    data = train_config().data
    source = PhotoSource("train")
    kwargs = dict(data=data, num_examples=40, num_classes=1, seed=3, description={"test": 1}, batch_size=16,
                  shard_size=16)
    store = extract_tokens(tokenizer, source, str(tmp_path), **kwargs)
    assert len(store) == 40 and store.num_tokens == tokenizer.num_tokens
    images = np.stack([example_image(source, i, data, tokenizer.image_size, 3, SkippedImages())[0] for i in range(40)])
    expected = np.asarray(tokenizer.encode(images))
    np.testing.assert_array_equal(store.arrays()[0], expected)
    assert store[17]["ids"].tolist() == expected[17].tolist()
    # An interrupted extraction (a shard missing, not marked complete) redoes only what is missing.
    os.remove(token_store.shard_paths(str(tmp_path), 1)[0])
    meta = token_store.read_meta(str(tmp_path))
    token_store.write_meta(str(tmp_path), dict(meta, complete=False))
    before = os.path.getmtime(token_store.shard_paths(str(tmp_path), 0)[0])
    resumed = extract_tokens(tokenizer, source, str(tmp_path), **kwargs)
    np.testing.assert_array_equal(resumed.arrays()[0], expected)
    assert os.path.getmtime(token_store.shard_paths(str(tmp_path), 0)[0]) == before
    with pytest.raises(token_store.TokenStoreError, match="other settings .*seed"):
        extract_tokens(tokenizer, source, str(tmp_path), **dict(kwargs, seed=4))


@pytest.mark.slow
def test_tiny_generator_trains_and_samples(tokenizer_dir, tmp_path):
    workdir = str(tmp_path / "generator")
    summary = train_generator(tiny_generator_config(tokenizer_dir), workdir)
    codebook_size = Tokenizer.from_checkpoint(tokenizer_dir).codebook_size
    # The head starts at zero (uniform predictions, log V nats); 30 steps learn the code statistics.
    assert summary["nll_per_token"] < np.log(codebook_size) - 0.5
    assert len(summary["nll_by_position"]) == 8 and os.path.isfile(os.path.join(workdir, "eval.json"))
    assert storage.read_json(os.path.join(workdir, "eval.json"))["data"]["source"] == summary["data"]["source"]
    assert os.path.isfile(os.path.join(workdir, "images", "samples_0000030.png"))
    # Rerunning with more steps resumes from the checkpoint and reuses the token stores.
    stores = [os.path.getmtime(os.path.join(workdir, "tokens", split, "ids-00000.npy")) for split in ("train", "eval")]
    config = tiny_generator_config(tokenizer_dir)
    config.train.update(num_steps=35, eval_every=35)
    assert train_generator(config, workdir)["step"] == 35
    assert stores == [os.path.getmtime(os.path.join(workdir, "tokens", split, "ids-00000.npy")) for split in ("train", "eval")]
    first = sample_images(workdir, str(tmp_path / "samples"), num_samples=3, seed=1)
    again = sample_images(workdir, str(tmp_path / "again"), num_samples=3, seed=1)
    assert first.shape == (3, 16, 16, 3) and np.array_equal(first, again)
    assert {"grid.png", "ids.npz", "sample_00002.png"} <= set(os.listdir(tmp_path / "samples"))


def test_a_non_finite_generator_is_never_saved_even_between_log_steps(tokenizer_dir, tmp_path):
    workdir = str(tmp_path / "nan")
    config = tiny_generator_config(tokenizer_dir)
    config.train.update(num_steps=20, log_every=1000, checkpoint_every=1, learning_rate=1e30, grad_clip_norm=0.0)
    with pytest.raises(NonFiniteLossError, match=r"at step \d+; stopped"):
        train_generator(config, workdir)
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        params, _ = checkpoints.load_params(workdir, use_ema=False)
        assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(params))


def test_generator_config_errors_name_the_field(tmp_path):
    config = tiny_generator_config(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="generator.tokenizer: no such directory"):
        validate_generator(config)
    config = tiny_generator_config(str(tmp_path))
    config.generator.kind = "diffusion"
    with pytest.raises(ConfigError, match="generator.kind: must be one of"):
        validate_generator(config)


def test_bad_generator_settings_are_refused_before_the_token_extraction(tokenizer_dir, tmp_path, monkeypatch):
    """A MaskGIT top_k past the tokenizer's 64 codes surfaced at the first evaluation (after the
    extraction and eval_every steps); ema_decay = 1 froze the EMA silently; a class table smaller
    than the data's classes trained most labels as the null class."""
    from nativetok_jax.training import generator_trainer

    def extraction(*args, **kwargs):
        raise AssertionError("tokens were extracted before the settings were checked")

    monkeypatch.setattr(generator_trainer, "extract_tokens", extraction)
    config = tiny_generator_config(tokenizer_dir, kind="maskgit")
    config.generator.sample.top_k = 65
    with pytest.raises(ConfigError, match=r"config.generator.sample.top_k: .*64"):
        train_generator(config, str(tmp_path / "top_k"))
    config = tiny_generator_config(tokenizer_dir)
    config.train.ema_decay = 1.0
    with pytest.raises(ConfigError, match=r"^config.train.ema_decay: must lie in \[0, 1\), got 1.0$"):
        train_generator(config, str(tmp_path / "ema"))

    class ThreeClasses:
        num_classes = 3

        def __len__(self):
            return 8

    config = tiny_generator_config(tokenizer_dir)
    config.generator.num_classes = 2
    with pytest.raises(ConfigError, match=r"^config.generator.num_classes: 2, but the data has 3 classes$"):
        generator_trainer.token_stores(config, None, str(tmp_path / "classes"), (ThreeClasses(), ThreeClasses()))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def run_two_processes(config_file: str, workdir: str, *flags: str) -> None:
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4"))
    processes = [start_main(config_file, workdir, *flags, f"--coordinator_address=localhost:{port}",
                            "--num_processes=2", f"--process_id={i}", env=env) for i in range(2)]
    for process in processes:
        code, stderr = finish(process)
        assert code == 0, stderr[-3000:]


@pytest.mark.slow
def test_two_processes_share_token_extraction_and_resume(tokenizer_dir, tmp_path):
    config_file = conftest.write_config_file(tmp_path, "test_generator_training.tiny_generator_config",
                                             tokenizer_dir=tokenizer_dir)
    workdir = str(tmp_path / "generator")
    train = os.path.join(workdir, "tokens", "train")
    steps = ("--config.train.eval_every=1000", "--config.train.checkpoint_every=1", "--config.train.log_every=1")
    run_two_processes(config_file, workdir, "--config.train.num_steps=1", *steps)

    # 96 examples over 2 processes: two shards of 48 (whole batches of 16), one per process.
    meta = token_store.read_meta(train)
    assert meta["complete"] and meta["num_written"] == 96 and meta["shard_size"] == 48
    ids_0, ids_1 = (np.load(token_store.shard_paths(train, i)[0]) for i in (0, 1))
    assert ids_0.shape == ids_1.shape == (48, 8)

    # An extraction interrupted after process 0's shard: only process 1 (its owner) can redo
    # shard 1; the run then resumes training from its checkpoint.
    os.remove(token_store.shard_paths(train, 1)[0])
    token_store.write_meta(train, dict(meta, complete=False))
    written_0 = os.path.getmtime(token_store.shard_paths(train, 0)[0])
    run_two_processes(config_file, workdir, "--config.train.num_steps=2", *steps)
    assert token_store.read_meta(train)["complete"]
    np.testing.assert_array_equal(np.load(token_store.shard_paths(train, 1)[0]), ids_1)
    assert os.path.getmtime(token_store.shard_paths(train, 0)[0]) == written_0
    assert storage.read_json(os.path.join(workdir, "eval.json"))["step"] == 2
    assert checkpoints.load_params(workdir, use_ema=False)[1] == 2


def test_a_generator_run_names_its_tokenizer_by_absolute_path_and_step(tokenizer_dir, tmp_path, monkeypatch):
    """The demo's ``generator.tokenizer = "workdirs/demo"`` is relative to where the run starts; the
    run records the absolute path, so ``sample`` from another directory finds the same tokenizer.
    It records the tokenizer's step too: sampling on a tokenizer trained further since is refused."""
    monkeypatch.chdir(os.path.dirname(tokenizer_dir))
    config = tiny_generator_config(os.path.basename(tokenizer_dir))
    config.generator.update(num_train_examples=16, num_eval_examples=16)
    config.train.update(num_steps=2, eval_every=2, checkpoint_every=2)
    workdir = str(tmp_path / "generator")
    train_generator(config, workdir)
    assert checkpoints.read_config(workdir).generator.tokenizer == tokenizer_dir
    monkeypatch.chdir(tmp_path)
    assert sample_images(workdir, str(tmp_path / "samples"), num_samples=2).shape == (2, 16, 16, 3)
    upstream = os.path.join(workdir, "upstream.json")
    with open(upstream) as f:
        assert json.load(f) == {"tokenizer stage": "", "tokenizer step": 2}
    with open(upstream, "w") as f:  # as if the tokenizer had been at step 1 when the generator trained
        json.dump({"tokenizer stage": "", "tokenizer step": 1}, f)
    with pytest.raises(ConfigError, match=r"other upstream models \(tokenizer step: 1 when it trained, 2 now\)"):
        sample_images(workdir, str(tmp_path / "again"), num_samples=2)
    # --labels outside the class table is refused from the checkpoint's metadata, before any restore.
    with open(upstream, "w") as f:
        json.dump({"tokenizer stage": "", "tokenizer step": 2}, f)
    from nativetok_jax.generation.pretrained import TrainedGenerator

    monkeypatch.setattr(TrainedGenerator, "from_checkpoint", lambda *a, **k: pytest.fail("restored before --labels"))
    with pytest.raises(ConfigError, match=r"^--labels: must lie in \[0, 1\), got 0..3$"):
        sample_images(workdir, str(tmp_path / "labels"), num_samples=2, labels=[0, 3])


def test_whole_crops_are_encoded_as_the_centre_square_with_a_random_flip():
    """crop_min = crop_max = 1 with flips (configs/gen_imagenet.py: "centre crops with random
    flips") takes the centre square, mirrored or not; not a square at a random offset."""
    from nativetok_jax.data.images import center_crop
    from nativetok_jax.data.pipeline import decode

    data = train_config().data
    data.update(crop_min=1.0, crop_max=1.0, flip=True)
    source = PhotoSource("train")
    flipped = 0
    for i in range(8):
        image, _ = example_image(source, i, data, 16, 3, SkippedImages())
        centre = center_crop(decode(source[i % len(source)]["image"], SkippedImages()), 16)
        assert np.array_equal(image, centre) or np.array_equal(image, centre[:, ::-1]), i
        flipped += not np.array_equal(image, centre)
    assert 0 < flipped < 8
