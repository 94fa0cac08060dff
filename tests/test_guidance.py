"""Classifier-free guidance needs an unconditional model: a run trained with label dropout 0 never
trains its null class, so any guidance other than 1 is refused in one line (config, preview, sample)."""

import os

import pytest

from nativetok_jax.config import ConfigError, d2it_config, generator_config, load_config_file, validate_dit
from nativetok_jax.config import validate_d2it_model
from nativetok_jax.sample import diffusion_settings, sampling_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEVER_TRAINED = "needs the unconditional model, which never trained"


def dit_demo(label_drop: float):
    config = load_config_file(os.path.join(ROOT, "configs", "dit_demo.py"))
    config.model.label_drop_probability = label_drop
    return config


def test_dit_config_with_no_label_dropout_refuses_guidance_in_samples_and_previews():
    config = dit_demo(0.0)
    assert config.model.sample.guidance_scale != 1 and config.train.preview.guidance_scale != 1
    with pytest.raises(ConfigError, match=rf"^config\.model\.sample\.guidance_scale: guidance 4 {NEVER_TRAINED}"):
        validate_dit(config)
    config.model.sample.guidance_scale = 1.0
    with pytest.raises(ConfigError, match=rf"^config\.train\.preview\.guidance_scale: guidance 4 {NEVER_TRAINED}"):
        validate_dit(config)
    config.train.preview.guidance_scale = 1.0
    validate_dit(config)  # no guidance: fine without an unconditional model
    validate_dit(dit_demo(0.1))  # the demo as shipped


def test_d2it_model_with_no_label_dropout_refuses_guidance():
    model = d2it_config("B").model
    model.label_drop_probability = 0.0
    with pytest.raises(ConfigError, match=rf"^config\.model\.sample\.guidance_scale: guidance 1.5 {NEVER_TRAINED}"):
        validate_d2it_model(model)


def test_sample_refuses_guidance_for_a_run_without_an_unconditional_model():
    model = dit_demo(0.0).model
    with pytest.raises(ConfigError, match=rf"^--guidance_scale: guidance 2 {NEVER_TRAINED}: the run's "
                                          r"model\.label_drop_probability is 0"):
        diffusion_settings(model, guidance_scale=2.0)
    with pytest.raises(ConfigError, match=rf"^config\.model\.sample\.guidance_scale: guidance 4 {NEVER_TRAINED}"):
        diffusion_settings(model)  # an old run's stored setting
    assert diffusion_settings(model, guidance_scale=1.0)["guidance_scale"] == 1.0
    assert diffusion_settings(dit_demo(0.1).model, guidance_scale=2.0)["guidance_scale"] == 2.0


def test_token_generator_without_label_dropout_refuses_guidance():
    g = generator_config().generator
    g.label_drop_probability = 0.0
    assert sampling_settings(g, {}, vocab_size=64).guidance_scale == 1.0
    with pytest.raises(ConfigError, match=rf"^--guidance_scale: guidance 3 {NEVER_TRAINED}"):
        sampling_settings(g, dict(guidance_scale=3.0), vocab_size=64)
    with pytest.raises(ConfigError, match=rf"^--guidance_scale: guidance 0 {NEVER_TRAINED}"):
        sampling_settings(g, dict(guidance_scale=0.0), vocab_size=64)  # the unconditional model alone
