"""Exported models (config.json + model.safetensors): tokenizers and generators load back with
the same ids, images and logits, from plain files that any safetensors reader opens."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from conftest import tiny_config
from nativetok_jax import Tokenizer, sharding
from nativetok_jax.config import generator_config
from nativetok_jax.generation.pretrained import TrainedGenerator
from nativetok_jax.models.generators.build import build_generator
from nativetok_jax.pretrained import export
from nativetok_jax.pretrained.files import WeightsError


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_config(tiny_config(), seed=3)


def images(count: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 16, 16, 3), dtype=np.uint8)


def one_line(error) -> str:
    assert "\n" not in str(error.value)
    return str(error.value)


def test_tokenizer_round_trip_gives_the_same_ids_and_images(tokenizer, tmp_path):
    directory = str(tmp_path / "tok")
    tokenizer.save_pretrained(directory)
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"]
    loaded = Tokenizer.from_pretrained(directory)
    batch = images()
    ids = np.asarray(tokenizer.encode(batch))
    np.testing.assert_array_equal(np.asarray(loaded.encode(batch)), ids)
    for k in (1, 4, 8):
        np.testing.assert_array_equal(np.asarray(loaded.decode(ids[:, :k])), np.asarray(tokenizer.decode(ids[:, :k])))
    assert json.loads(loaded.config.to_json_best_effort()) == json.loads(tokenizer.config.to_json_best_effort())


def test_the_files_are_plain_json_and_safetensors(tokenizer, tmp_path):
    directory = str(tmp_path / "tok")
    tokenizer.save_pretrained(directory)
    with open(os.path.join(directory, "config.json")) as f:
        header = json.load(f)
    assert (header["format"], header["format_version"], header["kind"]) == ("nativetok_jax", 1, "tokenizer")
    assert (header["image_size"], header["num_tokens"], header["codebook_size"]) == (16, 8, 64)
    assert header["config"]["model"]["num_tokens"] == 8
    arrays = load_file(os.path.join(directory, "model.safetensors"))  # no nativetok_jax, no orbax
    expected = {"/".join(map(str, path)): np.asarray(value) for path, value in
                jax.tree_util.tree_flatten_with_path(tokenizer.params)[0] for path in [tuple(p.key for p in path)]}
    assert sorted(arrays) == sorted(expected) and any(name.startswith("mit/") for name in arrays)
    for name, value in expected.items():
        np.testing.assert_array_equal(arrays[name], value, err_msg=name)


def test_loading_what_is_not_an_export_is_one_line_error(tokenizer, tmp_path):
    with pytest.raises(WeightsError, match="config.json not found: .* is not an exported model"):
        Tokenizer.from_pretrained(str(tmp_path))
    directory = str(tmp_path / "tok")
    tokenizer.save_pretrained(directory)
    with pytest.raises(WeightsError, match="holds a 'tokenizer', expected a 'generator'") as error:
        TrainedGenerator.from_pretrained(directory)
    one_line(error)
    weights = os.path.join(directory, "model.safetensors")
    data = open(weights, "rb").read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) - 64])
    with pytest.raises(WeightsError, match="is not a readable safetensors file") as error:
        Tokenizer.from_pretrained(directory)
    one_line(error)


def test_parameters_of_another_model_are_refused(tokenizer, tmp_path):
    directory = str(tmp_path / "tok")
    tokenizer.save_pretrained(directory)
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as f:
        header = json.load(f)
    header["config"]["model"]["num_tokens"] = 16
    with open(config_path, "w") as f:
        json.dump(header, f)
    with pytest.raises(ValueError, match="parameters do not fit this tokenizer"):
        Tokenizer.from_pretrained(directory)


@pytest.mark.parametrize("kind", ["ar", "maskgit"])
def test_generator_round_trip_gives_the_same_logits_and_samples(tokenizer, tmp_path, kind):
    config = generator_config()
    config.generator.update(kind=kind, width=32, depth=2, num_heads=2)
    config.generator.sample.update(temperature=1.0, num_steps=4)
    abstract = nnx.eval_shape(lambda: build_generator(config.generator, vocab_size=64, num_tokens=8, num_classes=3,
                                                      rngs=nnx.Rngs(0)))
    model = build_generator(config.generator, vocab_size=64, num_tokens=8, num_classes=3, rngs=nnx.Rngs(5))
    # The heads start at zero; random values make the logits (and the round trip) informative.
    params = jax.tree.map(lambda x: np.random.default_rng(1).normal(0, 0.05, x.shape).astype(x.dtype),
                          sharding.params_of(model))
    assert jax.tree.structure(params) == jax.tree.structure(sharding.params_of(abstract))
    generator = TrainedGenerator(config, params, tokenizer)
    directory = str(tmp_path / "gen")
    generator.save_pretrained(directory)
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors", "tokenizer"]
    loaded = TrainedGenerator.from_pretrained(directory)
    assert (loaded.kind, loaded.num_classes, loaded.step) == (kind, 3, None)
    ids = np.random.default_rng(2).integers(0, 64, (4, 8)).astype(np.int32)
    labels = np.array([0, 1, 2, 0], np.int32)
    np.testing.assert_array_equal(np.asarray(loaded.logits(ids, labels)), np.asarray(generator.logits(ids, labels)))
    key = jax.random.key(7)
    sampled = np.asarray(generator.sample_ids(labels, key))
    np.testing.assert_array_equal(np.asarray(loaded.sample_ids(labels, key)), sampled)
    np.testing.assert_array_equal(np.asarray(loaded.tokenizer.decode(sampled)), np.asarray(tokenizer.decode(sampled)))


def test_export_command_on_a_directory_without_a_run_is_one_error_line(tmp_path, capsys):
    assert export.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no config.json in")


@pytest.mark.slow
def test_export_command_exports_a_trained_run_as_it_loads_from_its_checkpoint(tmp_path, capsys):
    from test_training import train_config

    from nativetok_jax.training.trainer import train_and_evaluate

    workdir, out = str(tmp_path / "run"), str(tmp_path / "exported")
    train_and_evaluate(train_config(num_steps=2, checkpoint_every=2), workdir)
    assert export.main(["--workdir", workdir, "--out", out]) == 0
    assert capsys.readouterr().out.strip() == f"exported the tokenizer of {workdir} to {out}"
    batch = images(4, seed=1)
    np.testing.assert_array_equal(np.asarray(Tokenizer.from_pretrained(out).encode(batch)),
                                  np.asarray(Tokenizer.from_checkpoint(workdir).encode(batch)))
