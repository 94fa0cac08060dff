"""D²iT's multi-grained diffusion: noise, coarse averaging, grain loss weights, grain-map samplers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nativetok_jax.diffusion.gaussian import GaussianDiffusion
from nativetok_jax.diffusion.guidance import guided
from nativetok_jax.diffusion.losses import diffusion_loss, position_mean
from nativetok_jax.diffusion.multi_grain import average_coarse, grain_loss_weights, multi_grain_noise
from nativetok_jax.diffusion.respacing import respace
from nativetok_jax.diffusion.samplers import ddim_sample, ddpm_sample, make_sampler
from nativetok_jax.diffusion.schedule import named_schedule

LINEAR = named_schedule("linear", 1000)


def _grains(key, shape, fine_ratio=0.5):
    return jax.random.bernoulli(jax.random.key(key), fine_ratio, shape).astype(jnp.int32)


def _blocks(x):
    """``[B, h, w, C]`` -> ``[B, h/2, w/2, 4, C]``: each region's four cells."""
    b, h, w, c = x.shape
    return np.asarray(x).reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4, c)


def _assert_coarse_copies(x, grains):
    """Coarse regions hold one value copied 2 x 2, bit for bit."""
    cells = _blocks(x)[np.asarray(grains) == 0]  # [regions, 4, C]
    assert cells.size and np.array_equal(cells, np.broadcast_to(cells[:, :1], cells.shape))


def test_noise_has_unit_variance_and_exact_copies_in_coarse_regions():
    grains = _grains(0, (32, 16, 16))
    noise = multi_grain_noise(jax.random.key(1), grains, 4)
    assert noise.shape == (32, 32, 32, 4) and noise.dtype == jnp.float32
    _assert_coarse_copies(noise, grains)
    cells = _blocks(noise)
    fine, coarse = cells[np.asarray(grains) == 1], cells[np.asarray(grains) == 0][:, 0]  # independent draws
    # In fine regions the four cells are independent draws (all distinct, uncorrelated).
    assert np.all(fine[:, 0] != fine[:, 1])
    assert abs(np.corrcoef(fine[:, 0].ravel(), fine[:, 3].ravel())[0, 1]) < 4 / math.sqrt(fine[:, 0].size)
    for values in (fine.ravel(), coarse.ravel()):
        n = values.size  # > 16,000 independent N(0, 1) draws each: the sample variance's standard error is sqrt(2/n)
        assert abs(values.mean()) < 4 / math.sqrt(n)
        assert abs(values.var() - 1.0) < 4 * math.sqrt(2 / n)
    # Every cell has unit variance, the copied ones included.
    assert abs(np.asarray(noise).var() - 1.0) < 4 * math.sqrt(2 / coarse.size)


def test_noise_with_per_sample_keys_does_not_depend_on_the_batch():
    grains = _grains(2, (8, 4, 4))
    keys = jax.random.split(jax.random.key(3), 8)
    batch = multi_grain_noise(keys, grains, 3)
    for i in (0, 5):
        np.testing.assert_array_equal(multi_grain_noise(keys[i:i + 1], grains[i:i + 1], 3)[0], batch[i])
    with pytest.raises(ValueError, match="keys for a batch of 8"):
        multi_grain_noise(keys[:3], grains, 3)
    with pytest.raises(ValueError, match="grains"):
        multi_grain_noise(keys, grains[0], 3)


def test_average_coarse_averages_coarse_regions_only_and_is_idempotent():
    grains = jnp.array([[[0, 1], [1, 0]]])
    x = jnp.arange(32.0).reshape(1, 4, 4, 2)
    out = average_coarse(x, grains)
    # Region (0, 0) is coarse: cells (0,0)=0, (0,1)=2, (1,0)=8, (1,1)=10 in channel 0 -> mean 5.
    np.testing.assert_array_equal(out[0, :2, :2, 0], np.full((2, 2), 5.0))
    np.testing.assert_array_equal(out[0, :2, :2, 1], np.full((2, 2), 6.0))
    np.testing.assert_array_equal(out[0, :2, 2:], x[0, :2, 2:])  # fine regions untouched
    np.testing.assert_array_equal(out[0, 2:, :2], x[0, 2:, :2])
    np.testing.assert_array_equal(out[0, 2:, 2:, 0], np.full((2, 2), 25.0))  # (20 + 22 + 28 + 30) / 4
    # Bit-exact on values that are already copies, so averaging twice is averaging once.
    grains = _grains(4, (4, 8, 8))
    once = average_coarse(jax.random.normal(jax.random.key(5), (4, 16, 16, 3)) * 1.7 + 0.3, grains)
    _assert_coarse_copies(once, grains)
    np.testing.assert_array_equal(average_coarse(once, grains), once)
    with pytest.raises(ValueError, match=r"grains must be \[4, 8, 8\]"):
        average_coarse(once, grains[:, :4])
    with pytest.raises(ValueError, match="integer grain map"):
        average_coarse(once, grains.astype(jnp.float32))


def test_grain_loss_weights_count_each_code_once():
    grains = jnp.array([[[1, 0]]])
    expected = np.array([[[1, 1, 0.25, 0.25], [1, 1, 0.25, 0.25]]], np.float32)
    np.testing.assert_array_equal(grain_loss_weights(grains), expected)
    np.testing.assert_array_equal(grain_loss_weights(grains, 1, 1), np.ones((1, 2, 4), np.float32))
    # Squared errors 1 on the fine region's 4 codes and 6 on the coarse region's one code (copied 4
    # times): the dynamic grain loss is the mean over codes, (4 * 1 + 6) / 5 = 2; unweighted it is
    # the mean over cells, (4 * 1 + 4 * 6) / 8 = 3.5.
    errors = jnp.asarray(np.where(expected == 1, 1.0, 6.0)[..., None])
    assert float(position_mean(errors, grain_loss_weights(grains))[0]) == pytest.approx(2.0)
    assert float(position_mean(errors, grain_loss_weights(grains, 1, 1))[0]) == pytest.approx(3.5)
    with pytest.raises(ValueError, match="grain loss weights"):
        grain_loss_weights(grains, -1.0, 1.0)


def test_the_loss_with_multi_grained_noise_and_the_grain_loss():
    diffusion = GaussianDiffusion(LINEAR)
    grains = _grains(15, (8, 4, 4))
    x0 = average_coarse(jax.random.normal(jax.random.key(16), (8, 8, 8, 2)), grains)

    def model(x, timesteps, labels):  # D²iT's content transformer's output is averaged over copies
        return average_coarse(jnp.concatenate([jnp.sin(3 * x), jnp.cos(x)], axis=-1), grains)

    weights = grain_loss_weights(grains)
    noise_fn = lambda key, shape: multi_grain_noise(key, grains, shape[-1])  # noqa: E731
    _, metrics = jax.jit(lambda key: diffusion_loss(model, diffusion, x0, jnp.zeros(8, jnp.int32), key, weights,
                                                    noise_fn))(jax.random.key(17))
    # The same loss from its definition: multi-grained noise (x_t keeps the copies), weighted means.
    step_key, noise_key = jax.random.split(jax.random.key(17))
    t = jax.random.randint(step_key, (8,), 0, 1000)
    noise = multi_grain_noise(noise_key, grains, 2)
    xt = diffusion.q_sample(x0, t, noise)
    _assert_coarse_copies(xt, grains)
    eps = average_coarse(jnp.sin(3 * xt), grains)
    np.testing.assert_allclose(metrics["mse"], position_mean(jnp.square(noise - eps), weights).mean(), rtol=1e-5)


def _oracle_checking_copies(diffusion, x0):
    """A grain-map model that returns the true noise of ``x0``, pushed far off whenever its input
    is not exact copies in coarse regions, so reaching ``x0`` proves the copies held at every step."""
    original = np.asarray(diffusion.schedule.timesteps)
    lookup = jnp.asarray(np.searchsorted(original, np.arange(original.max() + 1)), jnp.int32)

    def model(x, timesteps, labels, grains):
        eps = diffusion.predict_eps(x, lookup[timesteps], x0[: x.shape[0]])
        broken = jnp.max(jnp.abs(x - average_coarse(x, grains)), axis=(1, 2, 3), keepdims=True)
        return jnp.concatenate([eps + 1e3 * broken, -jnp.ones_like(eps)], axis=-1)
    return model


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_multi_grained_sampling_with_an_oracle_reaches_the_known_latent(method):
    diffusion = GaussianDiffusion(respace(LINEAR, "ddim20" if method == "ddim" else "20"))
    grains = _grains(7, (2, 4, 4))
    x0 = average_coarse(jax.random.normal(jax.random.key(8), (2, 8, 8, 3)), grains)  # a neighbour-copied latent
    sampler = ddpm_sample if method == "ddpm" else ddim_sample
    samples = jax.jit(lambda key: sampler(_oracle_checking_copies(diffusion, x0), diffusion, jnp.zeros(2, jnp.int32),
                                          key, (8, 8, 3), grains=grains))(jax.random.key(9))
    np.testing.assert_allclose(samples, x0, atol=1e-4)
    _assert_coarse_copies(samples, grains)


def _toy_apply(params, x, timesteps, labels, grains):
    """A class- and grain-conditional 'network' that does not average its outputs itself."""
    scale = params["scale"][labels].reshape(-1, 1, 1, 1)
    cells = jnp.repeat(jnp.repeat(grains, 2, axis=1), 2, axis=2)[..., None].astype(jnp.float32)
    eps = jnp.tanh(scale * x + timesteps.reshape(-1, 1, 1, 1) / 1000.0 + 0.3 * cells)
    return jnp.concatenate([eps, jnp.tanh(x + cells)], axis=-1)


TOY_PARAMS = {"scale": jnp.array([0.3, -0.5, 0.8, 0.1])}  # class 3 is the null class


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_same_seed_same_samples_independent_of_the_batch(method):
    diffusion = GaussianDiffusion(respace(LINEAR, "ddim10"))
    sampler = make_sampler(_toy_apply, diffusion, (8, 8, 2), method=method, eta=1.0, guidance_scale=2.0, null_label=3)
    labels = jnp.array([0, 1, 2, 0, 1, 2, 0, 1])
    grains = _grains(10, (8, 4, 4))
    key = jax.random.key(11)
    batch = sampler(TOY_PARAMS, labels, key, None, grains)
    _assert_coarse_copies(batch, grains)  # though the model does not average: the sampler does
    np.testing.assert_array_equal(batch, sampler(TOY_PARAMS, labels, key, None, grains))
    assert not np.allclose(batch, sampler(TOY_PARAMS, labels, jax.random.key(12), None, grains))
    for i in (0, 5):
        alone = sampler(TOY_PARAMS, labels[i:i + 1], key, jnp.array([i]), grains[i:i + 1])
        # The same random draws; XLA vectorises batches of 1 and 8 differently (1 ulp).
        np.testing.assert_allclose(alone[0], batch[i], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"grains must be \[8, 4, 4\]"):
        sampler(TOY_PARAMS, labels, key, None, grains[:, :2])


def test_guidance_with_a_grain_map_behaves_as_dits():
    x = jax.random.normal(jax.random.key(13), (3, 4, 4, 2))
    t, labels, grains = jnp.array([5, 500, 900]), jnp.array([0, 1, 2]), _grains(14, (3, 2, 2))
    model = lambda x, t, y, g: _toy_apply(TOY_PARAMS, x, t, y, g)  # noqa: E731
    conditional = model(x, t, labels, grains)
    unconditional = model(x, t, jnp.full_like(labels, 3), grains)
    np.testing.assert_array_equal(guided(model, 1.0, 3)(x, t, labels, grains), conditional)
    zero = guided(model, 0.0, 3)(x, t, labels, grains)
    np.testing.assert_allclose(zero[..., :2], unconditional[..., :2], atol=1e-6)
    np.testing.assert_array_equal(zero[..., 2:], conditional[..., 2:])  # variance: the conditional model's
    four = guided(model, 4.0, 3)(x, t, labels, grains)
    np.testing.assert_allclose(four[..., :2], unconditional[..., :2] + 4 * (conditional - unconditional)[..., :2],
                               atol=1e-5)
    # Each half of the doubled batch saw the grain map of its own sample.
    other = guided(model, 4.0, 3)(x, t, labels, 1 - grains)
    assert not np.allclose(other, four)
