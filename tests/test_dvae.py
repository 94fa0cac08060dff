"""D²iT's Dynamic VAE: routing through the two encoder branches, KL, decoding copied latents, a
one-batch overfit, the public uint8 API and its configs (docs/d2it.md "Stage 1")."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nativetok_jax import sharding
from nativetok_jax.config import ConfigError, dvae_config, load_config_file, validate_dvae, validate_dvae_model
from nativetok_jax.dvae import DVAE
from nativetok_jax.models.d2it import grain_router
from nativetok_jax.models.d2it.dvae import (DVAEConfig, DynamicVAE, Posterior, kl_divergence, latent_scale_of,
                                       sample_latents)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")


def tiny_config(routing: str = "random", thresholds: str = ""):
    """16 px images, coarse f4 (4 x 4 regions of 4 px), fine f2 (8 x 8 latent)."""
    config = dvae_config()
    config.model.update(image_size=16, filters=8, channel_multipliers=(1, 2, 2), num_res_blocks=1,
                        attention_resolutions=(8,), num_groups=4, latent_channels=4)
    config.model.grain.update(routing=routing, thresholds=thresholds)
    return config


def tiny_model(seed: int = 0) -> DynamicVAE:
    return DynamicVAE(DVAEConfig.from_model_config(tiny_config().model), rngs=nnx.Rngs(seed))


def random_images(seed: int, count: int = 2, size: int = 16) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (count, size, size, 3), minval=-1.0, maxval=1.0)


def test_the_fine_branch_is_taken_one_level_before_the_coarsest():
    model = nnx.eval_shape(lambda: DynamicVAE(DVAEConfig(), rngs=nnx.Rngs(0)))
    coarse, fine = jax.eval_shape(lambda x: DynamicVAE(DVAEConfig(), rngs=nnx.Rngs(0)).branch_moments(x),
                                  jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
    assert coarse.mean.shape == (1, 16, 16, 4) and fine.mean.shape == (1, 32, 32, 4)  # f16 and f8 [P]
    assert model.encoder.fine.conv_out.kernel.shape == (3, 3, 256, 8)  # width 128 * 2: level f8's
    assert model.encoder.coarse.conv_out.kernel.shape == (3, 3, 512, 8)
    assert model.position_rows.shape == (32, 4)
    axes = sharding.param_axes(model)
    assert axes["position_rows"] == ("position", "latent")
    assert axes["encoder"]["coarse"]["attn_1"]["attention"]["query"] == ("embed", "heads", "head_dim")


@nnx.jit
def branch_gradient_norms(model, images, grains, weights):
    """Norms of d(sum of routed moments * weights) / d(parameters), per part of the network."""
    def loss(m):
        posterior = m.posterior(images, grains)
        return jnp.sum(posterior.mean * weights) + jnp.sum(posterior.logvar * weights)

    grads = nnx.state(nnx.grad(loss)(model), nnx.Param)
    return {name: optax.tree.norm(part) for name, part in
            [("fine", grads["encoder"]["fine"]), ("coarse", grads["encoder"]["coarse"]),
             ("conv_in", grads["encoder"]["conv_in"]), ("decoder", grads["decoder"])]}


def test_gradients_reach_only_the_branch_each_region_chose():
    model = tiny_model()
    images = random_images(0)
    weights = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    mixed = jnp.asarray(np.random.default_rng(0).integers(0, 2, (2, 4, 4)), jnp.int32)
    for grains, reached in [(jnp.ones((2, 4, 4), jnp.int32), {"fine"}), (jnp.zeros((2, 4, 4), jnp.int32), {"coarse"}),
                            (mixed, {"fine", "coarse"})]:
        norms = {k: float(v) for k, v in branch_gradient_norms(model, images, grains, weights).items()}
        for branch in ("fine", "coarse"):
            assert (norms[branch] > 0) == (branch in reached), (reached, norms)
        assert norms["conv_in"] > 0 and norms["decoder"] == 0


def test_kl_matches_the_closed_form_with_each_coarse_code_once():
    torch = pytest.importorskip("torch")
    model = tiny_model()
    images = random_images(2)
    grains = jnp.asarray(np.random.default_rng(1).integers(0, 2, (2, 4, 4)), jnp.int32)
    coarse, fine = nnx.jit(lambda m, x: m.branch_moments(x))(model, images)
    expected = np.zeros(2)
    standard = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    for b in range(2):
        for i in range(4):
            for j in range(4):
                if grains[b, i, j]:
                    mean = fine.mean[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
                    logvar = fine.logvar[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
                else:  # one coarse code, counted once
                    mean, logvar = coarse.mean[b, i, j], coarse.logvar[b, i, j]
                q = torch.distributions.Normal(torch.tensor(np.asarray(mean), dtype=torch.float64),
                                               torch.tensor(np.exp(0.5 * np.asarray(logvar, np.float64))))
                expected[b] += torch.distributions.kl_divergence(q, standard).sum().item()
    kl = nnx.jit(lambda m, x, g: kl_divergence(m.posterior(x, g), g, m.factors))(model, images, grains)
    np.testing.assert_allclose(kl, expected, rtol=1e-5)


def test_posterior_samples_keep_a_coarse_regions_cells_equal():
    grains = jnp.asarray(np.random.default_rng(2).integers(0, 2, (64, 4, 4)), jnp.int32)
    coarse = Posterior(jnp.full((64, 4, 4, 4), 0.5), jnp.full((64, 4, 4, 4), np.log(4.0)))
    fine = Posterior(jnp.full((64, 8, 8, 4), 0.5), jnp.full((64, 8, 8, 4), np.log(4.0)))
    posterior = Posterior(*(grain_router.neighbour_copy([c, f], grains) for c, f in zip(coarse, fine)))
    z = np.asarray(sample_latents(posterior, grains, jax.random.key(0)))
    cells = z.reshape(64, 4, 2, 4, 2, 4)
    spread = cells.max(axis=(2, 4)) - cells.min(axis=(2, 4))
    g = np.asarray(grains)[..., None]
    assert np.all(spread[np.broadcast_to(g == 0, spread.shape)] == 0)
    assert np.all(spread[np.broadcast_to(g == 1, spread.shape)] > 0)
    assert abs(z.mean() - 0.5) < 0.05 and abs(z.std() - 2.0) < 0.05


def test_decode_accepts_copied_latents_and_projects_other_latents_onto_copies():
    model = tiny_model()
    grains = jnp.asarray(np.random.default_rng(3).integers(0, 2, (2, 4, 4)), jnp.int32)
    latents = nnx.jit(lambda m, x, g: m.posterior(x, g).mean)(model, random_images(3), grains)
    decode = nnx.jit(lambda m, z, g: m.decode(z, g))
    direct = nnx.jit(lambda m, z: m.decoder(z + m.position_rows[...][:, None] + m.position_cols[...][None]))
    np.testing.assert_allclose(decode(model, latents, grains), direct(model, latents), rtol=1e-5, atol=1e-5)
    # Zero-mean changes to a coarse code's copies are averaged away.
    wobble = jnp.asarray(np.tile([[1.0, -1.0], [-2.0, 2.0]], (4, 4)))[None, :, :, None]
    coarse_cells = grain_router.fine_grain_map(grains, 2)[..., None] == 0
    np.testing.assert_allclose(decode(model, latents + jnp.where(coarse_cells, wobble, 0.0), grains),
                               decode(model, latents, grains), rtol=1e-5, atol=1e-5)


def test_block_mean_shortcut_with_silent_networks_is_the_block_mean_codec_of_its_routing():
    """With the encoder heads' and the decoder's output convolutions zeroed, a DVAE with the
    block-mean shortcut decodes each region as its grain's block means: the same-codes codec of
    evaluation/block_mean_routing.py, checked here by an independent numpy computation."""
    config = tiny_config()
    config.model.shortcut = "block_mean"
    model = DynamicVAE(DVAEConfig.from_model_config(config.model), rngs=nnx.Rngs(0))
    for conv in (model.encoder.coarse.conv_out, model.encoder.fine.conv_out, model.decoder.conv_out):
        conv.kernel[...] = jnp.zeros_like(conv.kernel[...])
        conv.bias[...] = jnp.zeros_like(conv.bias[...])
    images = random_images(5)
    grains = np.random.default_rng(5).integers(0, 2, (2, 4, 4)).astype(np.int32)
    reconstruction = nnx.jit(lambda m, x, g: m(x, g).reconstruction)(model, images, jnp.asarray(grains))
    x = np.asarray(images, np.float64)
    expected = np.empty_like(x)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                region = x[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4]
                side = 2 if grains[b, i, j] else 4  # fine f2 blocks, coarse f4 blocks
                for u in range(0, 4, side):
                    for v in range(0, 4, side):
                        expected[b, 4 * i + u:4 * i + u + side, 4 * j + v:4 * j + v + side] = \
                            region[u:u + side, v:v + side].mean(axis=(0, 1))
    np.testing.assert_allclose(reconstruction, expected, atol=1e-5)
    # Without the shortcut the same silent networks give zeros (mid grey).
    plain = DynamicVAE(DVAEConfig.from_model_config(tiny_config().model), rngs=nnx.Rngs(0))
    plain.decoder.conv_out.kernel[...] = jnp.zeros_like(plain.decoder.conv_out.kernel[...])
    plain.decoder.conv_out.bias[...] = jnp.zeros_like(plain.decoder.conv_out.bias[...])
    np.testing.assert_allclose(nnx.jit(lambda m, x, g: m(x, g).reconstruction)(plain, images, jnp.asarray(grains)), 0.0)


def test_one_batch_overfit_lowers_the_loss():
    model = tiny_model()
    rng = np.random.default_rng(4)
    images = jnp.asarray(np.repeat(np.repeat(rng.uniform(-1, 1, (4, 4, 4, 3)), 4, 1), 4, 2), jnp.float32)
    grains = jnp.asarray(rng.integers(0, 2, (4, 4, 4)), jnp.int32)
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, key):
        def loss_fn(m):
            out = m(images, grains, key)
            return jnp.mean(jnp.abs(out.reconstruction - images)) + 1e-6 * jnp.mean(
                kl_divergence(out.posterior, grains, m.factors))
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, jax.random.key(i))) for i in range(40)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses


def test_latent_scale_counts_each_code_once():
    grains = jnp.asarray([[[0, 1]]], jnp.int32)  # one coarse, one fine region on a 2 x 4 fine grid
    coarse = jnp.full((1, 1, 2, 1), 3.0)
    fine = jnp.asarray([[[[-1.0], [1.0]], [[-1.0], [1.0]]]])
    latents = grain_router.neighbour_copy([coarse, jnp.concatenate([fine, fine], axis=2)], grains)
    codes = np.array([3.0, -1.0, 1.0, -1.0, 1.0])  # the coarse code once, four fine codes
    assert latent_scale_of(latents, grains, (2, 1)) == pytest.approx(1 / codes.std(), rel=1e-5)


# ------------------------------------------------------------------------------------- the public API


@pytest.fixture(scope="module")
def thresholds_file(tmp_path_factory):
    settings = DVAEConfig.from_model_config(tiny_config().model).entropy_settings
    rng = np.random.default_rng(5)
    images = np.concatenate([np.full((8, 16, 16, 3), 90, np.uint8), rng.integers(0, 256, (8, 16, 16, 3)).astype(np.uint8)])
    path = str(tmp_path_factory.mktemp("thresholds") / "t.json")
    grain_router.GrainThresholds.from_entropies(grain_router.region_entropy(images, settings), settings).save(path)
    return path


@pytest.fixture(scope="module")
def entropy_vae(thresholds_file):
    return DVAE.from_config(tiny_config("entropy", thresholds_file), seed=0)


def test_public_dvae_encodes_uint8_to_fine_latents_and_a_grain_map(entropy_vae):
    vae = entropy_vae
    assert vae.latent_shape == (8, 8, 4) and vae.grain_map_shape == (4, 4) and vae.latent_scale == 1.0
    images = np.zeros((2, 16, 16, 3), np.uint8)
    images[:, :, 8:] = np.random.default_rng(6).integers(0, 256, (2, 16, 8, 3))  # right half noise
    latents, grains = vae.encode(images)
    assert latents.shape == (2, 8, 8, 4) and latents.dtype == jnp.float32 and grains.dtype == jnp.int32
    np.testing.assert_array_equal(grains, [[[0, 0, 1, 1]] * 4] * 2)
    np.testing.assert_array_equal(grains, vae.router(images))
    mean, logvar, same = vae.posterior(images)
    np.testing.assert_array_equal(mean, latents)
    np.testing.assert_array_equal(same, grains)
    decoded = vae.decode(latents, grains)
    assert decoded.shape == (2, 16, 16, 3) and decoded.dtype == jnp.uint8
    sampled, _ = vae.encode(images, sample=True, seed=1)
    assert not np.allclose(sampled, latents)
    np.testing.assert_array_equal(sampled[:, :, :2][:, ::2], sampled[:, :, :2][:, 1::2])  # coarse copies stay equal
    forced, forced_grains = vae.encode(images, np.ones((2, 4, 4), np.int32))
    assert np.asarray(forced_grains).all() and not np.allclose(forced, latents)
    again = DVAE.from_params(vae.config, vae.params, latent_scale=0.5)
    assert again.latent_scale == 0.5
    np.testing.assert_array_equal(again.encode(images)[0], latents)


def test_fixed_grain_modes(thresholds_file):
    for routing, fine in [("fine", 1.0), ("coarse", 0.0)]:
        router = DVAEConfig.from_model_config(tiny_config(routing).model).router()
        assert float(np.mean(router(np.zeros((2, 16, 16, 3), np.uint8)))) == fine
    vae = DVAE.from_config(tiny_config("random"), seed=0)
    images = np.zeros((16, 16, 16, 3), np.uint8)
    grains = vae.encode(images, seed=3)[1]
    assert float(np.mean(grains)) == pytest.approx(0.5, abs=0.08)
    assert not np.array_equal(vae.encode(images, seed=4)[1], grains)


def test_public_dvae_bad_inputs_give_one_line_errors(entropy_vae, thresholds_file):
    vae = entropy_vae
    cases = [
        (lambda: vae.encode(np.zeros((1, 14, 16, 3), np.uint8)), "14 x 16 px do not split into 4 x 4 px regions"),
        (lambda: vae.encode(np.zeros((1, 16, 16, 3), np.float32)), "must be uint8"),
        (lambda: vae.encode(np.zeros((1, 32, 32, 3), np.uint8)), "must be 16 x 16 px"),
        (lambda: vae.decode(np.zeros((1, 8, 8, 4)), np.full((1, 4, 4), 2)), "must be 0 .coarse. or 1 .fine."),
        (lambda: vae.decode(np.zeros((1, 8, 8, 4)), np.zeros((1, 2, 2), np.int32)), r"grain map must have shape \(1, 4, 4\)"),
        (lambda: vae.decode(np.zeros((1, 4, 4, 4)), np.zeros((1, 4, 4), np.int32)), r"latents must have shape \[B, 8, 8, 4\]"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    other = tiny_config("entropy", thresholds_file)
    other.model.grain.num_bins = 32
    with pytest.raises(grain_router.GrainError, match="other entropy settings: num_bins 16 .wanted 32."):
        DVAE.from_config(other)
    with pytest.raises(ConfigError, match="model.grain.fine_ratio: must lie in"):
        config = tiny_config("random")
        config.model.grain.fine_ratio = 1.0
        DVAE.from_config(config)


# ------------------------------------------------------------------------------------- configs


def test_dvae_configs_validate_and_build():
    demo = load_config_file(os.path.join(CONFIG_DIR, "dvae_demo.py"))
    validate_dvae(demo)
    model_config = DVAEConfig.from_model_config(demo.model)
    assert (model_config.factors, model_config.latent_size) == ((8, 4), 8)
    assert model_config.router().thresholds[0] > 0  # the shipped thresholds file fits the demo's settings
    model = nnx.eval_shape(lambda: DynamicVAE(model_config, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(sharding.params_of(model))) < 3_000_000  # sized for 2 cores
    for arg in ("imagenet", "ffhq"):
        full = load_config_file(os.path.join(CONFIG_DIR, f"dvae.py:{arg}"))
        validate_dvae_model(full.model)
        with pytest.raises(ConfigError, match="pretrained.lpips: is needed"):  # L1 + LPIPS + GAN: name the weights
            validate_dvae(full)
        model_config = DVAEConfig.from_model_config(full.model)
        assert (model_config.factors, model_config.latent_size, model_config.entropy_settings.num_bins) == ((16, 8), 32, 256)


@pytest.mark.parametrize("field, value, message", [
    ("channel_multipliers", (4,), "model.channel_multipliers: need at least two"),
    ("image_size", 40, "model.image_size: 40 is not a multiple of the coarse factor 16"),
    ("num_groups", 24, "model.num_groups: 24 groups do not divide"),
    ("grain.routing", "learned", "model.grain.routing: must be one of"),
    ("grain.thresholds", "", "model.grain.thresholds: entropy routing needs a thresholds file"),
    ("grain.sigma", 0.0, "model.grain.sigma: must be > 0"),
    ("shortcut", "residual", "model.shortcut: must be one of"),
])
def test_bad_dvae_fields_raise_config_errors_that_name_them(field, value, message):
    config = dvae_config()
    config.model.grain.thresholds = "t.json"
    target = config.model
    *parents, leaf = field.split(".")
    for parent in parents:
        target = target[parent]
    target[leaf] = value
    with pytest.raises(ConfigError, match=message):
        validate_dvae(config)
