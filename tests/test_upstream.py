"""A run's upstream model changed under it (field reports: a VAE re-converted at the same path,
reused silently by a new run and by ``sample`` of an old one): runs record what identifies their
upstream models (the SD-VAE weights' SHA-256; a D²iT's DVAE step and latent scale, in
test_d2it_training.py) and refuse to resume or sample on anything else."""

import json
import os

import pytest

from nativetok_jax import storage
from nativetok_jax.config import ConfigError
from nativetok_jax.sample import sample_diffusion
from nativetok_jax.training import diffusion_trainer
from nativetok_jax.training.diffusion_trainer import autoencoder_upstream, train_diffusion
from nativetok_jax.workdir import UPSTREAM_FILE, check_upstream, record_upstream
from test_diffusion_training import tiny_dit_config

KEY = "model.autoencoder.weights sha256"


def test_the_weights_are_identified_by_content_not_path(tmp_path):
    weights = tmp_path / "sd_vae.npz"
    weights.write_bytes(b"the first conversion")
    config = tiny_dit_config().model.autoencoder
    assert autoencoder_upstream(config) == {}  # pixel space: nothing outside the run
    config.update(kind="sd_vae", weights=str(weights))
    first = autoencoder_upstream(config)
    weights.write_bytes(b"a re-conversion at the same path")
    second = autoencoder_upstream(config)
    assert set(first) == {KEY} and first != second and second[KEY] == storage.sha256(str(weights))


def test_record_then_check(tmp_path):
    record_upstream(tmp_path, {"a": 1})
    record_upstream(tmp_path, {"a": 1})  # a resume on the same upstream
    assert json.loads((tmp_path / UPSTREAM_FILE).read_text()) == {"a": 1}
    check_upstream(tmp_path, {}, "sampling")  # nothing given: nothing to compare
    with pytest.raises(ConfigError, match=r"other upstream models \(a: 1 when it trained, 2 now\); resuming would"):
        record_upstream(tmp_path, {"a": 2})
    check_upstream(tmp_path / "older_run", {"a": 2}, "sampling")  # runs from before the record: not checked


def test_a_dit_run_refuses_to_resume_or_sample_on_a_replaced_vae(tmp_path, monkeypatch):
    """The SD-VAE's checksum stands in for the file's (the run itself is in pixel space, so that it
    trains in seconds): what the trainer records, sample and the resume compare."""
    monkeypatch.setattr(diffusion_trainer, "autoencoder_upstream", lambda ae: {KEY: "aaaa"})
    workdir = str(tmp_path / "run")
    train_diffusion(tiny_dit_config(num_steps=2, checkpoint_every=2), workdir)
    assert json.loads(open(os.path.join(workdir, UPSTREAM_FILE)).read()) == {KEY: "aaaa"}
    monkeypatch.setattr(diffusion_trainer, "autoencoder_upstream", lambda ae: {KEY: "bbbb"})  # re-converted
    changed = r"\(model\.autoencoder\.weights sha256: 'aaaa' when it trained, 'bbbb' now\); "
    with pytest.raises(ConfigError, match=changed + "sampling would silently use the new ones"):
        sample_diffusion(workdir, str(tmp_path / "samples"), num_samples=1, num_steps=2, sampler="ddim")
    with pytest.raises(ConfigError, match=changed + "resuming would silently use the new ones"):
        train_diffusion(tiny_dit_config(num_steps=4, checkpoint_every=2), workdir)
    assert not os.path.exists(tmp_path / "samples")
    # The library loader and export (which goes through it) refuse it too.
    from nativetok_jax.generation.diffusion_models import TrainedDiT
    from nativetok_jax.pretrained.export import export_run

    with pytest.raises(ConfigError, match=changed + "loading it would silently use the new ones"):
        TrainedDiT.from_checkpoint(workdir)
    with pytest.raises(ConfigError, match=changed + "loading it would silently use the new ones"):
        export_run(workdir, str(tmp_path / "exported"))
