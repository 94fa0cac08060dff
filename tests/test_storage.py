"""Workdirs that are URLs: a ``gs://`` path reaches orbax, TensorFlow and every file the project
writes as that URL, never as a local directory named ``gs:``, and a run there trains, resumes and
loads like a local one.

No test can reach Cloud Storage, so :func:`fake_gcs` stands in for it at the three places where
the libraries turn a ``gs://`` URL into I/O: etils.epath's backend (our files, orbax's metadata,
grain's iterator state), the TensorStore kvstore spec orbax builds for arrays, and TensorFlow's
summary writer (clu's TensorBoard events). Each maps ``gs://BUCKET/KEY`` to ``ROOT/BUCKET/KEY``
and records the URLs it was given.
"""

import os

import grain
import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath

from conftest import tiny_config
from nativetok_jax import Tokenizer, checkpoints, storage
from nativetok_jax.data import token_store
from nativetok_jax.evaluation import fid
from nativetok_jax.evaluation.grids import save_grid
from nativetok_jax.pretrained import files

GS = "gs://"


class FakeGcs(epath_backend._OsPathBackend):  # noqa: SLF001 - the backend epath's own tests mock
    """epath's local backend with ``gs://BUCKET/KEY`` stored under ``root/BUCKET/KEY``."""

    def __init__(self, root: str):
        self.root = root
        self.urls: set[str] = set()

    def local(self, path) -> str:
        path = os.fspath(path)
        if not path.startswith(GS):
            return path
        self.urls.add(path)
        return os.path.join(self.root, path[len(GS):])

    def url(self, path: str) -> str:
        return GS + os.path.relpath(path, self.root) if path.startswith(self.root + os.sep) else path

    def open(self, path, mode):
        return super().open(self.local(path), mode)

    def exists(self, path):
        return super().exists(self.local(path))

    def isdir(self, path):
        return super().isdir(self.local(path))

    def listdir(self, path):
        return super().listdir(self.local(path))

    def glob(self, path):
        return [self.url(p) for p in super().glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for directory, dirs, names in super().walk(self.local(top), top_down=top_down, on_error=on_error):
            yield self.url(os.fspath(directory)), dirs, names

    def makedirs(self, path, *, exist_ok=False, mode=None):
        return super().makedirs(self.local(path), exist_ok=exist_ok)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        return super().mkdir(self.local(path), exist_ok=exist_ok)

    def rmtree(self, path):
        return super().rmtree(self.local(path))

    def remove(self, path):
        return super().remove(self.local(path))

    def rename(self, path, dst):
        return super().rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
        return super().replace(self.local(path), self.local(dst))

    def copy(self, path, dst, overwrite):
        return super().copy(self.local(path), self.local(dst), overwrite=overwrite)

    def stat(self, path):
        return super().stat(self.local(path))


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """A fake ``gs://`` under ``tmp_path/gcs``; the test runs in ``tmp_path/cwd`` so that a local
    ``gs:`` directory would show. Yields the backend (``.root``, ``.urls``)."""
    import tensorflow as tf
    from orbax.checkpoint._src.path import gcs_utils

    gcs = FakeGcs(str(tmp_path / "gcs"))
    os.makedirs(gcs.root)
    monkeypatch.setattr(gpath._GPath, "_backend", property(lambda self: gcs))  # noqa: SLF001
    kvstores: list[str] = []

    def kvstore(url: str) -> dict:  # orbax: the TensorStore spec of an array directory
        kvstores.append(url)
        return {"driver": "file", "path": gcs.local(url)}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    # orbax asks the google-cloud-storage client whether a bucket has a hierarchical namespace
    # before it deletes a step there; the fake bucket has none, as most buckets.
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    summary_writer = tf.summary.create_file_writer
    monkeypatch.setattr(tf.summary, "create_file_writer",
                        lambda logdir, *args, **kwargs: summary_writer(gcs.local(logdir), *args, **kwargs))
    gcs.kvstores = kvstores
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    yield gcs
    assert os.listdir(tmp_path / "cwd") == [], "a gs:// path became a local directory"


def test_paths_keep_urls_and_make_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(storage.path("gs://bucket/run")) == "gs://bucket/run"
    assert not storage.is_local("gs://bucket/run") and not storage.is_local(epath.Path("s3://b/k"))
    assert storage.path("run") == epath.Path(tmp_path / "run") and storage.is_local("run")
    assert str(checkpoints.checkpoint_directory("gs://bucket/run")) == "gs://bucket/run/checkpoints"


def test_checkpoints_hand_orbax_the_url_and_the_tokenizer_loads_from_it(fake_gcs):
    store = checkpoints.Checkpoints("gs://bucket/run/checkpoints", 1)
    assert str(store.directory) == "gs://bucket/run/checkpoints"
    assert str(store._manager.directory) == "gs://bucket/run/checkpoints"  # noqa: SLF001
    assert os.path.isdir(os.path.join(fake_gcs.root, "bucket", "run", "checkpoints"))

    # A tokenizer's sharded parameters and a data iterator saved there, restored, and loaded back
    # by Tokenizer.from_checkpoint from the URL.
    config = tiny_config()
    tokenizer = Tokenizer.from_config(config)
    checkpoints.write_config("gs://bucket/run", config)
    state = {"step": np.int32(3), "params": tokenizer.params, "ema": {}}
    iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
    next(iterator)
    store.save(3, state, iterator)
    store.close()
    assert fake_gcs.kvstores and all(url.startswith("gs://bucket/run/checkpoints/3") for url in fake_gcs.kvstores)

    store = checkpoints.Checkpoints("gs://bucket/run/checkpoints", 1)
    fresh = iter(grain.MapDataset.range(10).to_iter_dataset())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
                            state)
    restored = store.restore(store.latest_step(), abstract, fresh)
    store.close()
    assert next(fresh) == 1
    expected = jax.tree.leaves(jax.device_get(tokenizer.params))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(restored["params"])), expected))
    loaded = Tokenizer.from_checkpoint("gs://bucket/run")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(loaded.params)), expected))


def test_check_writable_makes_the_place_and_leaves_nothing_else_there(tmp_path, fake_gcs):
    """Every command checks its output place before it works: created, probed, left as it was."""
    target = tmp_path / "deep" / "er" / "eval.json"
    assert storage.check_writable(target, "--out") == epath.Path(target)
    assert os.listdir(tmp_path / "deep" / "er") == [] and not target.exists()
    assert storage.check_writable(tmp_path / "run_dir", "--out", directory=True) == epath.Path(tmp_path / "run_dir")
    assert os.listdir(tmp_path / "run_dir") == []
    url = "gs://bucket/results/eval.json"
    assert str(storage.check_writable(url, "--out")) == url
    assert os.listdir(fake_gcs.local("gs://bucket/results")) == []
    # One line naming the flag and what is wrong with the place.
    with pytest.raises(storage.OutputError, match=rf"^--out: {tmp_path / 'run_dir'} is a directory; name the file"):
        storage.check_writable(tmp_path / "run_dir", "--out")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(storage.OutputError, match=rf"^--out: {tmp_path / 'a_file'} is a file; name a directory"):
        storage.check_writable(tmp_path / "a_file", "--out", directory=True)
    with pytest.raises(storage.OutputError, match=rf"^--out: cannot write {tmp_path / 'a_file' / 'x' / 'y.json'}: "
                                                  rf"{tmp_path / 'a_file'} is a file, not a directory$"):
        storage.check_writable(tmp_path / "a_file" / "x" / "y.json", "--out")


def test_project_files_round_trip_through_a_url(fake_gcs):
    root = epath.Path("gs://bucket/files")
    config = tiny_config()
    checkpoints.write_config(root / "run", config)
    assert checkpoints.read_config("gs://bucket/files/run").model.num_tokens == config.model.num_tokens

    meta = {"num_examples": 5, "shard_size": 4, "num_tokens": 2}
    assert token_store.check_meta(root / "tokens", meta) is None
    token_store.write_meta(root / "tokens", dict(meta, complete=False))
    assert token_store.missing_shards(root / "tokens", meta) == [0, 1]
    token_store.write_shard(root / "tokens", 0, np.arange(8).reshape(4, 2), np.arange(4))
    token_store.write_shard(root / "tokens", 1, np.full((1, 2), 7), np.array([9]))
    assert token_store.mark_complete(root / "tokens") == 5
    source = token_store.TokenSource("gs://bucket/files/tokens")
    assert len(source) == 5 and source[4]["ids"].tolist() == [7, 7] and int(source[4]["label"]) == 9

    image = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    grid = save_grid(root / "images" / "grid.png", [image], upscale=2)
    from PIL import Image

    with Image.open(os.path.join(fake_gcs.root, "bucket", "files", "images", "grid.png")) as written:
        np.testing.assert_array_equal(np.asarray(written), grid)

    fid.save_statistics("gs://bucket/files/stats.npz", np.zeros(3), np.eye(3))
    mu, sigma = fid.load_statistics("gs://bucket/files/stats.npz")
    assert mu.shape == (3,) and np.array_equal(sigma, np.eye(3))

    files.save_weights("gs://bucket/files/w.npz", {"a/b": np.ones(2)}, kind="test")
    arrays, header = files.load_weights("gs://bucket/files/w.npz", kind="test")
    assert header["kind"] == "test" and np.array_equal(arrays["a/b"], np.ones(2))
    with pytest.raises(files.WeightsError, match="weights file not found: gs://bucket/files/none.npz"):
        files.load_weights("gs://bucket/files/none.npz")
    storage.write_json("gs://bucket/files/report.json", {"psnr": 1.5})
    assert storage.read_json("gs://bucket/files/report.json") == {"psnr": 1.5}
    # Nothing was written as a temporary beside its target in the bucket.
    written = {os.path.relpath(os.path.join(d, n), fake_gcs.root) for d, _, ns in os.walk(fake_gcs.root) for n in ns}
    assert not any(".tmp" in name for name in written)


@pytest.mark.slow
def test_a_training_run_in_a_gs_workdir_resumes_and_loads(fake_gcs):
    from test_training import train_config

    from nativetok_jax.training.trainer import train_and_evaluate

    workdir = "gs://bucket/runs/tiny"
    config = train_config(num_steps=2, checkpoint_every=2, eval_every=2, keep_checkpoints=1)
    assert train_and_evaluate(config, workdir)["step"] == 2
    config.train.num_steps = 4
    assert train_and_evaluate(config, workdir)["step"] == 4  # resumed from step 2

    local = os.path.join(fake_gcs.root, "bucket", "runs", "tiny")
    assert storage.read_json(f"{workdir}/eval.json")["step"] == 4
    assert {"config.json", "eval.json", "checkpoints"} <= set(os.listdir(local))
    assert [n for n in os.listdir(os.path.join(local, "checkpoints")) if n.isdigit()] == ["4"]  # keep_checkpoints=1
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(local))
    assert any(name.endswith(".png") for _, _, names in os.walk(local) for name in names)
    assert any(url.startswith(f"{workdir}/checkpoints/4") for url in fake_gcs.kvstores)
    tokenizer = Tokenizer.from_checkpoint(workdir)
    _, step = checkpoints.load_params(workdir)
    assert step == 4 and tokenizer.num_tokens == config.model.num_tokens


@pytest.mark.slow
def test_dit_dvae_and_d2it_train_in_gs_workdirs_on_gs_weights(fake_gcs):
    """DiT on an SD-VAE file in the bucket, a DVAE routed by a thresholds file in the bucket, and a
    D²iT on that DVAE's workdir: every workdir and file a URL, recorded as that URL (never as a
    local ``<cwd>/gs:/...`` directory)."""
    from test_d2it_training import tiny_d2it_config
    from test_diffusion_training import tiny_dit_config
    from test_dvae_training import dvae_train_config

    from nativetok_jax.data.pipeline import eval_images
    from nativetok_jax.data.sources import open_sources
    from nativetok_jax.models.d2it import grain_router
    from nativetok_jax.models.dit.kl_autoencoder import KLAutoencoder, KLAutoencoderConfig
    from nativetok_jax.pretrained.sd_vae import KIND
    from nativetok_jax.training.d2it_trainer import train_d2it
    from nativetok_jax.training.diffusion_trainer import train_diffusion
    from nativetok_jax.training.dvae_trainer import train_dvae

    # DiT in an SD-VAE's latent space (a tiny f8 one), the weights file in the bucket.
    from flax import nnx, traverse_util

    vae_config = KLAutoencoderConfig(block_widths=(32, 32, 32, 32), layers_per_block=1)
    vae = nnx.jit(lambda: KLAutoencoder(vae_config, rngs=nnx.Rngs(0)))()
    flat = {"/".join(map(str, k)): np.asarray(v) for k, v in traverse_util.flatten_dict(
        nnx.to_pure_dict(nnx.state(vae, nnx.Param))).items()}
    weights = "gs://bucket/weights/sd_vae.npz"
    files.save_weights(weights, flat, kind=KIND, source="test", config=vae_config.to_dict())
    dit = tiny_dit_config(num_steps=1, checkpoint_every=1, eval_every=1)
    dit.model.update(patch_size=1)  # 8 px images: 1 x 1 latents
    dit.model.autoencoder.update(kind="sd_vae", weights=weights)
    dit.train.preview.num_samples = 0  # (the previews have tests of their own)
    assert train_diffusion(dit, "gs://bucket/runs/dit")["step"] == 1
    assert token_store.read_meta("gs://bucket/runs/dit/latents/train")["weights"] == weights

    # A DVAE routed by a thresholds file in the bucket, then a D²iT on its workdir.
    dvae = dvae_train_config(num_steps=2, eval_every=2, checkpoint_every=2, latent_scale_batches=1)
    settings = grain_router.EntropySettings(4)
    crops = eval_images(dvae.data, open_sources(dvae.data, 4)[0], image_size=16, num_images=16, seed=3)
    thresholds = "gs://bucket/weights/thresholds.json"
    grain_router.GrainThresholds.from_entropies(np.asarray(grain_router.region_entropy(crops, settings)), settings).save(thresholds)
    dvae.model.grain.update(routing="entropy", thresholds=thresholds)
    assert train_dvae(dvae, "gs://bucket/runs/dvae")["step"] == 2
    d2it = tiny_d2it_config("gs://bucket/runs/dvae", num_steps=1, eval_every=1, checkpoint_every=1)
    d2it.train.preview.num_samples = 0
    assert train_d2it(d2it, "gs://bucket/runs/d2it")["step"] == 1
    assert token_store.read_meta("gs://bucket/runs/dvae/grain_latents/train")["dvae"] == "gs://bucket/runs/dvae"

    local = os.path.join(fake_gcs.root, "bucket", "runs")
    for run in ("dit", "dvae", "d2it"):
        assert storage.read_json(f"gs://bucket/runs/{run}/eval.json")["step"] >= 1
        assert {"config.json", "eval.json", "checkpoints"} <= set(os.listdir(os.path.join(local, run))), run
    assert not os.path.exists("gs:")  # nothing written to a local directory named after the scheme
