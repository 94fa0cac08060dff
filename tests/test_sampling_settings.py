"""Sampling settings: validated for every generator kind after the command line's overrides, in one
line naming the flag or field; temperature 0 is greedy decoding (the limit), for both samplers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nativetok_jax import checkpoints
from nativetok_jax.config import ConfigError, base_config, generator_config
from nativetok_jax.generation import autoregressive, masked
from nativetok_jax.models.generators.gpt import GPT
from nativetok_jax.models.generators.masked_generator import MaskedTokenTransformer
from nativetok_jax.sample import sample_images, sampling_settings

VOCAB, LENGTH, CLASSES = 16, 8, 4
LABELS = jnp.array([0, 1, 2, 3])


@pytest.fixture(scope="module")
def gpt() -> GPT:
    model = GPT(vocab_size=VOCAB, num_tokens=LENGTH, num_classes=CLASSES, width=32, depth=2, num_heads=4,
                mlp_hidden=64, zero_head=False, rngs=nnx.Rngs(0))
    model.head[...] = model.head[...] * 20  # peaked, so greedy and sampled ids differ
    return model


@pytest.fixture(scope="module")
def maskgit() -> MaskedTokenTransformer:
    return nnx.jit(lambda: MaskedTokenTransformer(vocab_size=VOCAB, num_tokens=LENGTH, num_classes=CLASSES, width=32,
                                                  depth=2, num_heads=4, mlp_ratio=2.0, rngs=nnx.Rngs(0)))()


def test_temperature_zero_is_greedy_autoregressive_decoding(gpt):
    """Issue 17, case 6 (AR): temperature 0 was refused; it is the limit, greedy decoding."""
    greedy = [np.asarray(autoregressive.sample(gpt, LABELS, key=jax.random.key(seed), temperature=0.0))
              for seed in (0, 1)]
    top_one = np.asarray(autoregressive.sample(gpt, LABELS, key=jax.random.key(2), top_k=1))
    np.testing.assert_array_equal(greedy[0], greedy[1])
    np.testing.assert_array_equal(greedy[0], top_one)


def test_temperature_zero_is_greedy_maskgit_decoding(maskgit):
    """Issue 17, case 6 (MaskGIT): temperature 0 divided the logits by zero and drew ids from
    infinities and NaNs; it is greedy decoding, the same ids as top-k 1 whatever the seed."""
    def draw(seed, **settings):
        return np.asarray(masked.sample(maskgit, LABELS, key=jax.random.key(seed), num_tokens=LENGTH, num_steps=4,
                                        choice_temperature=0.0, **settings))

    greedy = draw(0, temperature=0.0)
    np.testing.assert_array_equal(greedy, draw(1, temperature=0.0))
    np.testing.assert_array_equal(greedy, draw(2, top_k=1))
    assert greedy.min() >= 0 and greedy.max() < VOCAB


def test_maskgit_top_p_keeps_only_the_nucleus(maskgit):
    """top-p applied to MaskGIT too (it was ignored): a tiny nucleus keeps only the top id."""
    nucleus = masked.sample(maskgit, LABELS, key=jax.random.key(0), num_tokens=LENGTH, num_steps=4,
                            choice_temperature=0.0, top_p=1e-6)
    greedy = masked.sample(maskgit, LABELS, key=jax.random.key(0), num_tokens=LENGTH, num_steps=4,
                           choice_temperature=0.0, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(nucleus), np.asarray(greedy))


def generator(kind: str):
    config = generator_config()
    config.generator.kind = kind
    return config.generator


@pytest.mark.parametrize("kind, overrides, message", [
    ("maskgit", dict(temperature=-1.0), "--temperature: must be a finite number >= 0, got -1.0"),
    ("ar", dict(temperature=math.inf), "--temperature: must be a finite number >= 0, got inf"),
    ("ar", dict(top_k=VOCAB + 1), f"--top_k: must be an integer >= 0 and <= {VOCAB}, got {VOCAB + 1}"),
    ("maskgit", dict(top_k=-2), f"--top_k: must be an integer >= 0 and <= {VOCAB}, got -2"),
    ("maskgit", dict(top_p=0.0), "--top_p: must lie in (0, 1] (1: off), got 0.0"),
    ("ar", dict(top_p=1.5), "--top_p: must lie in (0, 1] (1: off), got 1.5"),
    ("ar", dict(guidance_scale=math.nan), "--guidance_scale: must be a finite number >= 0, got nan"),
    ("maskgit", dict(guidance_scale=-1.0), "--guidance_scale: must be a finite number >= 0, got -1.0"),
    ("maskgit", dict(num_steps=0), "--num_steps: must be an integer >= 1, got 0"),
    ("maskgit", dict(choice_temperature=-0.5), "--choice_temperature: must be a finite number >= 0, got -0.5"),
    ("ar", dict(num_steps=4), "--num_steps: only MaskGIT generators use it; this one is 'ar'"),
    ("ar", dict(num_samples=0), "--num_samples: must be an integer >= 1, got 0"),
    ("maskgit", dict(seed=-1), "--seed: must be an integer >= 0, got -1"),
])
def test_bad_settings_are_one_line_errors_naming_the_flag(kind, overrides, message):
    with pytest.raises(ConfigError) as error:
        sampling_settings(generator(kind), overrides, vocab_size=VOCAB)
    assert str(error.value) == message


@pytest.mark.parametrize("kind", ["ar", "maskgit"])
def test_a_bad_stored_setting_names_the_config_field_and_good_overrides_apply(kind):
    g = generator(kind)
    g.sample.top_p = 2.0
    with pytest.raises(ConfigError, match=r"^config.generator.sample.top_p: must lie in \(0, 1\]"):
        sampling_settings(g, {}, vocab_size=VOCAB)
    settings = sampling_settings(g, dict(top_p=0.9, temperature=0.0, top_k=VOCAB), vocab_size=VOCAB)
    assert (settings.top_p, settings.temperature, settings.top_k) == (0.9, 0.0, VOCAB)
    assert g.sample.top_p == 2.0  # the run's config is not changed


def test_sample_command_validates_before_loading_anything(tmp_path):
    """The final settings are checked before parameters are read or anything is written."""
    tokenizer = tmp_path / "tokenizer"
    checkpoints.write_config(str(tokenizer), base_config())
    (tokenizer / "checkpoints").mkdir()
    config = generator_config()
    config.generator.update(kind="maskgit", tokenizer=str(tokenizer))
    workdir = tmp_path / "generator"
    checkpoints.write_config(str(workdir), config)  # no checkpoints: loading them would fail differently
    out = tmp_path / "samples"
    with pytest.raises(ConfigError, match=r"^--top_p: must lie in \(0, 1\] \(1: off\), got 0.0$"):
        sample_images(str(workdir), str(out), top_p=0.0)
    with pytest.raises(ConfigError, match="^--batch_size: must be a positive integer, got 0$"):
        sample_images(str(workdir), str(out), batch_size=0)
    assert not out.exists()
