"""DiT's Gaussian diffusion: schedule values, the process, the loss, respacing, samplers, guidance."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nativetok_jax.diffusion.gaussian import GaussianDiffusion
from nativetok_jax.diffusion.guidance import guided
from nativetok_jax.diffusion.losses import diffusion_loss, eps_mse_at, position_mean, vb_term
from nativetok_jax.diffusion.respacing import respace, space_timesteps
from nativetok_jax.diffusion.samplers import ddim_sample, ddpm_sample, make_sampler
from nativetok_jax.diffusion.schedule import named_schedule

LINEAR = named_schedule("linear", 1000)


def test_linear_schedule_values_are_dits():
    assert LINEAR.alphas_cumprod[0] == pytest.approx(0.9999, rel=1e-12)
    assert LINEAR.alphas_cumprod[499] == pytest.approx(0.0785872, rel=1e-5)
    assert LINEAR.alphas_cumprod[999] == pytest.approx(4.03583e-5, rel=1e-5)
    assert LINEAR.posterior_variance[1] == pytest.approx(5.45319e-5, rel=1e-5)
    assert LINEAR.betas.dtype == np.float64


def test_cosine_schedule_is_monotone_and_capped():
    cosine = named_schedule("cosine", 1000)
    assert np.all(np.diff(cosine.alphas_cumprod) < 0)
    assert cosine.betas.max() == pytest.approx(0.999)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        named_schedule("quadratic")


def test_respacing_250_keeps_dits_steps_and_rederives_betas():
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250
    assert kept[:4] == [0, 4, 8, 12] and kept[-3:] == [991, 995, 999]
    spaced = respace(LINEAR, "250")
    np.testing.assert_array_equal(spaced.timesteps, kept)
    assert spaced.betas[0] == pytest.approx(1e-4, rel=1e-9)
    assert spaced.betas[-1] == pytest.approx(0.0775193, rel=1e-5)
    np.testing.assert_allclose(spaced.alphas_cumprod, LINEAR.alphas_cumprod[kept], rtol=1e-12)


def test_respacing_ddim50_has_stride_20():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "10,20")[:2] == [0, 55]  # 10 over the first 500 steps
    with pytest.raises(ValueError, match="cannot keep"):
        space_timesteps(100, "200")


def _batch(key, shape=(4, 4, 4, 3)):
    k1, k2 = jax.random.split(key)
    return jax.random.uniform(k1, shape, minval=-1, maxval=1), jax.random.normal(k2, shape)


def test_x0_recovered_from_noised_x0_and_its_noise():
    diffusion = GaussianDiffusion(LINEAR)
    x0, noise = _batch(jax.random.key(0))
    t = jnp.array([0, 10, 500, 990])
    xt = diffusion.q_sample(x0, t, noise)
    np.testing.assert_allclose(diffusion.predict_x0(xt, t, noise), x0, atol=2e-3)  # 1/sqrt(ab) ~ 160 at t=990
    np.testing.assert_allclose(diffusion.predict_eps(xt, t, x0), noise, atol=1e-4)


def test_learned_range_endpoints():
    diffusion = GaussianDiffusion(LINEAR)
    t = jnp.array([1, 500, 999])
    ones = jnp.ones((3, 2))
    np.testing.assert_allclose(diffusion.learned_range_log_variance(ones, t)[:, 0], np.log(LINEAR.betas[[1, 500, 999]]),
                               rtol=1e-6)
    np.testing.assert_allclose(diffusion.learned_range_log_variance(-ones, t)[:, 0],
                               LINEAR.posterior_log_variance_clipped[[1, 500, 999]], rtol=1e-6)


def _true_posterior_output(diffusion, x0, xt, t):
    """A learned-variance output whose mean and variance are exactly the posterior's."""
    eps = diffusion.predict_eps(xt, t, x0)
    return jnp.concatenate([eps, -jnp.ones_like(eps)], axis=-1)  # v = -1: the posterior variance


def test_vb_term_is_zero_at_the_true_posterior():
    diffusion = GaussianDiffusion(LINEAR)
    x0, noise = _batch(jax.random.key(1))
    t = jnp.array([1, 100, 500, 900])
    xt = diffusion.q_sample(x0, t, noise)
    vb = vb_term(diffusion, _true_posterior_output(diffusion, x0, xt, t), x0, xt, t)
    np.testing.assert_allclose(vb, 0.0, atol=2e-5)
    wrong = vb_term(diffusion, _true_posterior_output(diffusion, x0, xt, t) + 0.3, x0, xt, t)
    assert np.all(np.asarray(wrong) > 5e-4)


def test_vb_at_step_zero_is_the_discretised_likelihood():
    diffusion = GaussianDiffusion(LINEAR)
    x0 = jnp.round(jax.random.uniform(jax.random.key(2), (2, 3, 3, 3), minval=-0.99, maxval=0.99) * 127.5) / 127.5
    t = jnp.zeros((2,), jnp.int32)
    xt = diffusion.q_sample(x0, t, jnp.zeros_like(x0))
    vb = vb_term(diffusion, _true_posterior_output(diffusion, x0, xt, t), x0, xt, t)
    # Mean exactly x0 and sigma = sqrt(beta~_1) (step 0's clipped variance): the bin x0 +- 1/255 holds
    # erf(h / (sigma sqrt 2)) of the mass, which is -log2 of that in bits.
    half_width = (1 / 255) / np.sqrt(LINEAR.posterior_variance[1])
    expected = -np.log2(math.erf(half_width / math.sqrt(2)))
    np.testing.assert_allclose(vb, expected, rtol=2e-3)


def _oracle(diffusion, x0):
    """A model that returns the true noise of ``x0`` (and the posterior variance)."""
    original = np.asarray(diffusion.schedule.timesteps)
    lookup = jnp.asarray(np.searchsorted(original, np.arange(original.max() + 1)), jnp.int32)

    def model(x, timesteps, labels):
        t = lookup[timesteps]
        eps = diffusion.predict_eps(x, t, x0[: x.shape[0]])
        return jnp.concatenate([eps, -jnp.ones_like(eps)], axis=-1)
    return model


def test_no_vb_gradient_reaches_the_mean_channels():
    diffusion = GaussianDiffusion(LINEAR)
    x0, _ = _batch(jax.random.key(3))

    def loss_of(scale, term):
        def model(x, timesteps, labels):
            return jnp.concatenate([scale[0] * x, scale[1] * jnp.ones_like(x)], axis=-1)
        _, metrics = diffusion_loss(model, diffusion, x0, jnp.zeros(4, jnp.int32), jax.random.key(4))
        return metrics[term]

    grad_vb = jax.grad(loss_of)(jnp.array([0.5, 0.2]), "vb")
    grad_mse = jax.grad(loss_of)(jnp.array([0.5, 0.2]), "mse")
    assert grad_vb[0] == 0.0 and grad_vb[1] != 0.0
    assert grad_mse[0] != 0.0 and grad_mse[1] == 0.0


def test_loss_weights_and_bfloat16_model():
    diffusion = GaussianDiffusion(LINEAR)
    x0, _ = _batch(jax.random.key(5))
    labels, key = jnp.zeros(4, jnp.int32), jax.random.key(6)

    def model(x, timesteps, labels):
        return jnp.concatenate([0.9 * x, jnp.zeros_like(x)], -1).astype(jnp.bfloat16)

    loss, metrics = diffusion_loss(model, diffusion, x0, labels, key)
    same, _ = diffusion_loss(model, diffusion, x0, labels, key, weights=jnp.full((4, 4, 4), 0.25))
    assert loss.dtype == jnp.float32 and np.isfinite(loss)
    np.testing.assert_allclose(same, loss, rtol=1e-6)
    assert metrics["loss"] == pytest.approx(float(metrics["mse"] + metrics["vb"]), rel=1e-5)
    # A weight of zero on half the positions: the mean is over the other half only.
    values = jnp.arange(8.0).reshape(1, 2, 4, 1)
    weights = jnp.array([[[1.0, 1, 1, 1], [0, 0, 0, 0]]])
    assert float(position_mean(values, weights)[0]) == pytest.approx(1.5)
    assert np.isfinite(eps_mse_at(model, diffusion, x0, labels, key, 500))


@pytest.mark.parametrize("spec", ["ddim50", "1000"])
def test_ddim_eta0_with_an_oracle_reaches_x0(spec):
    diffusion = GaussianDiffusion(respace(LINEAR, spec))
    x0, _ = _batch(jax.random.key(7), (2, 4, 4, 3))
    samples = jax.jit(lambda key: ddim_sample(_oracle(diffusion, x0), diffusion, jnp.zeros(2, jnp.int32), key,
                                              (4, 4, 3)))(jax.random.key(8))
    np.testing.assert_allclose(samples, x0, atol=1e-4)


def test_ddpm_with_an_oracle_reaches_x0():
    diffusion = GaussianDiffusion(respace(LINEAR, "50"))
    x0, _ = _batch(jax.random.key(9), (2, 4, 4, 3))
    samples = jax.jit(lambda key: ddpm_sample(_oracle(diffusion, x0), diffusion, jnp.zeros(2, jnp.int32), key,
                                              (4, 4, 3)))(jax.random.key(10))
    # The last step adds no noise and its mean is x0 itself.
    np.testing.assert_allclose(samples, x0, atol=1e-4)


def _toy_apply(params, x, timesteps, labels):
    """A tiny class-conditional 'network': its outputs depend on x, t and the label."""
    scale = params["scale"][labels].reshape(-1, 1, 1, 1)
    eps = jnp.tanh(scale * x + timesteps.reshape(-1, 1, 1, 1) / 1000.0)
    return jnp.concatenate([eps, jnp.tanh(x)], axis=-1)


TOY_PARAMS = {"scale": jnp.array([0.3, -0.5, 0.8, 0.1])}  # class 3 is the null class


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_same_key_same_samples_and_batch_independence(method):
    diffusion = GaussianDiffusion(respace(LINEAR, "ddim10"))
    sampler = make_sampler(_toy_apply, diffusion, (4, 4, 2), method=method, eta=1.0,
                           guidance_scale=2.0, null_label=3)
    labels = jnp.array([0, 1, 2, 0, 1, 2, 0, 1])
    key = jax.random.key(11)
    batch = sampler(TOY_PARAMS, labels, key)
    np.testing.assert_array_equal(batch, sampler(TOY_PARAMS, labels, key))
    assert not np.allclose(batch, sampler(TOY_PARAMS, labels, jax.random.key(12)))
    for i in (0, 5):
        alone = sampler(TOY_PARAMS, labels[i:i + 1], key, jnp.array([i]))
        # The same random draws; XLA vectorises batches of 1 and 8 differently (1 ulp).
        np.testing.assert_allclose(alone[0], batch[i], rtol=1e-6, atol=1e-6)
    assert not np.allclose(batch[0], batch[3])  # same label, different index: different samples


def test_guidance_scale_one_is_conditional_zero_unconditional():
    x = jax.random.normal(jax.random.key(13), (3, 4, 4, 2))
    t = jnp.array([5, 500, 900])
    labels = jnp.array([0, 1, 2])
    model = lambda x, t, y: _toy_apply(TOY_PARAMS, x, t, y)  # noqa: E731
    conditional = model(x, t, labels)
    unconditional = model(x, t, jnp.full_like(labels, 3))
    np.testing.assert_array_equal(guided(model, 1.0, 3)(x, t, labels), conditional)
    zero = guided(model, 0.0, 3)(x, t, labels)
    np.testing.assert_allclose(zero[..., :2], unconditional[..., :2], atol=1e-6)
    np.testing.assert_array_equal(zero[..., 2:], conditional[..., 2:])  # variance: the conditional model's
    four = guided(model, 4.0, 3)(x, t, labels)
    np.testing.assert_allclose(four[..., :2], unconditional[..., :2] + 4 * (conditional - unconditional)[..., :2],
                               atol=1e-5)


def test_three_channel_flag_touches_channels_0_to_2_only():
    x = jax.random.normal(jax.random.key(14), (2, 3, 3, 4))
    t, labels = jnp.array([10, 700]), jnp.array([0, 2])
    model = lambda x, t, y: _toy_apply(TOY_PARAMS, x, t, y)  # noqa: E731
    conditional = model(x, t, labels)
    full = guided(model, 4.0, 3)(x, t, labels)
    quirk = guided(model, 4.0, 3, guided_channels=3)(x, t, labels)
    np.testing.assert_array_equal(quirk[..., :3], full[..., :3])
    np.testing.assert_array_equal(quirk[..., 3:], conditional[..., 3:])
    assert not np.allclose(full[..., 3], conditional[..., 3])


def test_sampler_errors_name_the_problem():
    diffusion = GaussianDiffusion(LINEAR)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler(_toy_apply, diffusion, (2, 2, 2), method="euler")
    with pytest.raises(ValueError, match="null label"):
        make_sampler(_toy_apply, diffusion, (2, 2, 2), guidance_scale=2.0)
    with pytest.raises(ValueError, match="channels"):
        diffusion.split_output(jnp.zeros((1, 2, 2, 3)), 2)
