"""The paper's objectives end to end: proxy-code targets from a (tiny) VQGAN, the decoder
fine-tune through its frozen decoder with LPIPS and the GAN, and the checkpointed result."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from test_training import train_config
from nativetok_jax import Tokenizer, checkpoints, sharding
from nativetok_jax.config import ConfigError, validate_training
from nativetok_jax.models.nativetok import build_model
from nativetok_jax.models.frozen.lpips import LPIPS
from nativetok_jax.models.frozen.vqgan import VQGAN, VQGANConfig
from nativetok_jax.pretrained import files
from nativetok_jax.training.networks import load_networks
from nativetok_jax.training.state import build_state
from nativetok_jax.training.tokenizer_objective import tokenizer_train_step
from nativetok_jax.training.trainer import train_and_evaluate

# 16 px images, 4x4 codes (two 2x downsamplings), 32 codes: the tiny tokenizer's proxy grid.
TINY_VQGAN = VQGANConfig(filters=8, num_res_blocks=1, channel_multipliers=(1, 1, 2), embedding_dim=8,
                         codebook_size=32, num_groups=4)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """A tiny VQGAN and an LPIPS network with random weights, in the project's weights format."""
    directory = tmp_path_factory.mktemp("weights")
    vqgan_path, lpips_path = str(directory / "vqgan.npz"), str(directory / "lpips.npz")
    files.save_weights(vqgan_path, files.model_arrays(VQGAN(TINY_VQGAN, rngs=nnx.Rngs(0))),
                       kind="maskgit_vqgan", config=TINY_VQGAN.to_dict(), source="test")
    lpips = LPIPS(rngs=nnx.Rngs(1))
    arrays = files.model_arrays(lpips)
    arrays = {k: np.abs(v) if k.startswith("heads") else v for k, v in arrays.items()}  # a distance >= 0
    files.save_weights(lpips_path, arrays, kind="lpips", source="test")
    return vqgan_path, lpips_path


def proxy_config(vqgan_path: str, proxy: str, **train):
    config = train_config(**train)
    config.model.decoder.head = "proxy_codes"
    config.train.losses.proxy = proxy
    config.pretrained.maskgit_vqgan = vqgan_path
    return config


@pytest.mark.slow
def test_proxy_code_cross_entropy_learns_the_vqgan_codes(weight_files):
    config = proxy_config(weight_files[0], "codes", learning_rate=3e-3)
    networks = load_networks(config)
    mesh = sharding.make_mesh(config.mesh)
    built = build_state(lambda r: build_model(config.model, r), train=config.train, mesh=mesh,
                        rules=sharding.rules_of(config), num_steps=100)
    state = built.state
    image_sharding = sharding.batch_sharding(mesh, (8, 16, 16, 3))
    step = tokenizer_train_step(built, config, 8, networks=networks)
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    batch = {"image": jax.device_put(images, image_sharding), "label": np.zeros(8, np.int32)}
    history = []
    with jax.set_mesh(mesh):
        for _ in range(15):
            state, metrics = step(state, batch)
            history.append(jax.device_get(metrics))
    first, last = history[0], history[-1]
    assert first["proxy_code_loss"] > 0.9 * np.log(32)  # chance level over 32 codes at the start
    assert last["proxy_code_loss"] < 0.7 * first["proxy_code_loss"]
    assert last["proxy_code_accuracy"] > first["proxy_code_accuracy"]


@pytest.mark.slow
def test_decoder_fine_tune_through_the_frozen_vqgan_with_lpips_and_gan(weight_files, tmp_path):
    vqgan_path, lpips_path = weight_files
    config = proxy_config(vqgan_path, "pixels", num_steps=4, checkpoint_every=2)
    config.model.decoder.proxy_decoding = "soft"
    config.train.losses.update(perceptual_weight=0.5, adversarial_weight=0.1, adversarial_start_step=1,
                               lecam_weight=0.001)
    config.pretrained.lpips = lpips_path
    config.discriminator.update(width=8, depth=2)
    summary = train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(summary["psnr"]) and summary["step"] == 4
    # The discriminator is part of the checkpointed state; the VQGAN and LPIPS are not.
    restored, step = checkpoints.load_params(str(tmp_path), use_ema=False)
    assert step == 4 and set(restored) == {"mit", "experts", "token_head", "quantizer", "decoder"}
    state_dir = os.path.join(checkpoints.checkpoint_directory(str(tmp_path)), "4", "state")
    assert os.path.isdir(os.path.join(state_dir)) and "discriminator" in open(
        os.path.join(state_dir, "_METADATA")).read()
    # The tokenizer reloads its VQGAN from the file the run's config names, and decodes softly.
    tokenizer = Tokenizer.from_checkpoint(str(tmp_path))
    images = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    assert tokenizer.decode(tokenizer.encode(images)[:, :2]).shape == (2, 16, 16, 3)


def test_objective_config_errors_name_the_field(weight_files):
    config = proxy_config(weight_files[0], "codes")
    config.train.losses.adversarial_weight = 0.1
    with pytest.raises(ConfigError, match="train.losses.adversarial_weight: needs pixels"):
        validate_training(config)
    config = train_config()
    config.train.losses.perceptual_weight = 1.0
    config.pretrained.lpips = "/nonexistent/lpips.npz"
    with pytest.raises(ConfigError, match="pretrained.lpips: file not found"):
        validate_training(config)
    config = proxy_config(weight_files[0], "codes")
    config.model.decoder.proxy_codebook_size = 64
    with pytest.raises(ConfigError, match="proxy_codebook_size: 64, but the VQGAN has 32 codes"):
        load_networks(config)
