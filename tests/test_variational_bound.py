"""The variational bound in bits per dimension (DiT's calc_bpd_loop) against closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nativetok_jax.diffusion.gaussian import build_diffusion
from nativetok_jax.diffusion.schedule import named_schedule
from nativetok_jax.diffusion.variational_bound import bound_timesteps, prior_bpd, variational_bound


def _tanh_cdf(x):
    return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def oracle(diffusion, x0):
    """The network that knows x0: the exact noise, and v = -1 (the posterior variance beta~_t)."""
    def apply(xt, t, labels):
        eps = diffusion.predict_eps(xt, t, jnp.broadcast_to(x0, xt.shape))  # t: 1000-step indices, unspaced
        return jnp.concatenate([eps, -jnp.ones_like(eps)], axis=-1)
    return apply


@pytest.mark.parametrize("num_terms", [None, 11])
def test_the_bound_of_an_oracle_is_its_decoder_term_plus_the_prior_in_closed_form(num_terms):
    diffusion = build_diffusion("linear", 1000)
    schedule = named_schedule("linear", 1000)  # float64 on the host
    x0 = jnp.asarray(np.array([0.5, -0.25, 0.0, 0.75], np.float32).reshape(1, 2, 2, 1).repeat(2, 0))
    result = jax.jit(lambda x: variational_bound(oracle(diffusion, x), diffusion, x, jnp.zeros(2, jnp.int32),
                                                 jax.random.key(0), num_terms=num_terms))(x0)
    # t >= 1: the oracle's mean and variance are the true posterior's, every KL term is 0.
    np.testing.assert_allclose(result["kl_bpd"], 0.0, atol=2e-4)
    # t = 0: the mean is x0 exactly; its standard deviation is sqrt(beta~_1) (the clipped log-variance).
    sigma = math.sqrt(schedule.posterior_variance[1])
    decoder = -math.log(_tanh_cdf(1 / 255 / sigma) - _tanh_cdf(-1 / 255 / sigma)) / math.log(2.0)
    np.testing.assert_allclose(result["decoder_bpd"], decoder, rtol=1e-4)
    # The prior: KL(N(sqrt(ab) x0, 1 - ab) || N(0, 1)) averaged over the 4 values, in bits.
    ab = schedule.alphas_cumprod[-1]
    values = np.array([0.5, -0.25, 0.0, 0.75])
    prior = np.mean(0.5 * (-1.0 - math.log(1 - ab) + (1 - ab) + ab * values**2)) / math.log(2.0)
    np.testing.assert_allclose(result["prior_bpd"], prior, rtol=1e-3)
    np.testing.assert_allclose(result["total_bpd"], decoder + prior, rtol=1e-3)


def test_weights_and_the_subset_of_steps():
    steps, weights = bound_timesteps(1000, 4)
    np.testing.assert_array_equal(steps, [999, 666, 333, 0])
    np.testing.assert_allclose(weights, [333.0, 333.0, 333.0, 1.0])
    steps, weights = bound_timesteps(5)
    np.testing.assert_array_equal(steps, [4, 3, 2, 1, 0]) and np.testing.assert_array_equal(weights, 1.0)
    with pytest.raises(ValueError, match="num_terms"):
        bound_timesteps(1000, 1)
    # Weights that count a repeated value once give the unweighted bound of the distinct values.
    diffusion = build_diffusion("linear", 1000)
    x = jnp.asarray([[[1.0], [1.0], [-0.5]]])  # [1, 3, 1]: the first value copied twice
    w = jnp.asarray([[0.5, 0.5, 1.0]])
    np.testing.assert_allclose(prior_bpd(diffusion, x, w), prior_bpd(diffusion, x[:, 1:]), rtol=1e-6)
