"""DiT's training objective: epsilon MSE plus the variational-bound term on a stop-gradient mean.

Source: DiT ``diffusion/gaussian_diffusion.py`` (``training_losses`` with ``LossType.MSE`` and
learned-range variance, ``_vb_terms_bpd``) and ``diffusion/diffusion_utils.py`` (``normal_kl``,
``discretized_gaussian_log_likelihood``). Per sample:

    loss = mean_positions((eps - eps_hat)^2) + L_vb
    L_vb = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) / ln 2          for t > 0
         = -log p(x_0 | x_1) / ln 2  (discretised Gaussian, 256 bins)     for t = 0

with ``p``'s mean built from ``stop_gradient(eps_hat)``: the VB term trains only the variance
(Nichol & Dhariwal 2021, section 3.1). Both terms are means over positions and channels, or
weighted means when per-position weights are given (D2iT's dynamic grain loss weights each latent
code once: a coarse region's four copies 1/4 each, a fine cell 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from nativetok_jax.diffusion.gaussian import GaussianDiffusion

# (x_t [B, ..., C] float32, timesteps [B] int32 of the original process, labels [B] int32)
#   -> output [B, ..., C or 2C]
ModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# (key, shape) -> float32 noise of ``shape``, standard normal at every position (D²iT's
# multi-grained noise is, with exact copies in coarse regions); default: independent Gaussians.
NoiseFn = Callable[[jax.Array, tuple[int, ...]], jax.Array]


def gaussian_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Independent standard-normal float32 noise (DiT's)."""
    return jax.random.normal(key, shape, jnp.float32)


def normal_kl(mean1: jax.Array, log_var1: jax.Array, mean2: jax.Array, log_var2: jax.Array) -> jax.Array:
    """Elementwise ``KL(N(mean1, var1) || N(mean2, var2))`` in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + jnp.exp(log_var1 - log_var2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-log_var2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """The tanh approximation of the standard normal CDF that DiT's likelihood uses."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: jax.Array, mean: jax.Array, log_scale: jax.Array) -> jax.Array:
    """Elementwise log-probability (nats) of data ``x`` in [-1, 1] quantised to 256 levels under a
    Gaussian of ``mean`` and standard deviation ``exp(log_scale)``; the end bins take the tails."""
    centered = x - mean
    inv_std = jnp.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def position_mean(values: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Per-sample mean over every non-batch axis of ``values [B, ..., C]``: ``[B]``.

    ``weights`` (broadcastable to ``values``, or ``values``' shape without the channel axis, e.g.
    ``[B, H, W]``) turn it into ``sum(w * values) / sum(w)`` over the same axes.
    """
    axes = tuple(range(1, values.ndim))
    if weights is None:
        return values.mean(axes)
    weights = jnp.asarray(weights, jnp.float32)
    if weights.ndim == values.ndim - 1:
        weights = weights[..., None]
    weights = jnp.broadcast_to(weights, values.shape)
    return (weights * values).sum(axes) / weights.sum(axes)


def vb_term(diffusion: GaussianDiffusion, output: jax.Array, x0: jax.Array, xt: jax.Array, t: jax.Array,
            weights: jax.Array | None = None) -> jax.Array:
    """The variational-bound term in bits per dimension, ``[B]``, of a network ``output`` at ``(xt, t)``.

    Differentiating it reaches whatever of ``output`` is not stopped; :func:`diffusion_loss`
    passes a stop-gradient noise prediction so only the variance channels learn from it.
    """
    true_mean, true_log_variance = diffusion.q_posterior(x0, xt, t)
    step = diffusion.p_mean_variance(output, xt, t, clip_denoised=False)
    kl = position_mean(normal_kl(true_mean, true_log_variance, step.mean, step.log_variance), weights) / math.log(2.0)
    nll = -position_mean(discretized_gaussian_log_likelihood(x0, step.mean, 0.5 * step.log_variance),
                         weights) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)


def diffusion_loss(
    apply_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x0: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    weights: jax.Array | None = None,
    noise_fn: NoiseFn = gaussian_noise,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DiT's loss on a batch: ``t`` uniform over the steps, ``x_t`` from Gaussian noise.

    Args:
      apply_fn: the network, ``(x_t, timesteps, labels) -> output`` (see :data:`ModelFn`); any
        compute dtype, its output is used in float32. Label dropout for guidance is the caller's
        (``DiT.drop_labels``) before this call.
      diffusion: the training process (1000 steps for DiT); ``learn_sigma`` must match the network.
      x0: clean data ``[B, ..., C]`` (scaled latents, or pixels in [-1, 1]).
      labels: int ``[B]``, passed through to ``apply_fn``.
      key: PRNG key for the steps and the noise.
      weights: optional per-position weights (see :func:`position_mean`), e.g. ``[B, H, W]``.
      noise_fn: the forward process's noise (:data:`NoiseFn`; D²iT: multi-grained).

    Returns:
      ``(loss, metrics)``: the scalar mean loss, and float32 scalars ``loss``, ``mse``, ``vb``
      (``vb`` is 0 without learned variance).
    """
    step_key, noise_key = jax.random.split(key)
    t = jax.random.randint(step_key, (x0.shape[0],), 0, diffusion.num_steps)
    noise = noise_fn(noise_key, x0.shape)
    x0 = x0.astype(jnp.float32)
    xt = diffusion.q_sample(x0, t, noise)
    output = apply_fn(xt, diffusion.model_timesteps(t), labels)
    eps, values = diffusion.split_output(output, x0.shape[-1])
    mse = position_mean(jnp.square(noise - eps), weights)
    if values is None:
        vb = jnp.zeros_like(mse)
    else:
        frozen = jnp.concatenate([jax.lax.stop_gradient(eps), values], axis=-1)
        vb = vb_term(diffusion, frozen, x0, xt, t, weights)
    loss = (mse + vb).mean()
    return loss, dict(loss=loss, mse=mse.mean(), vb=vb.mean())


def eps_mse_at(
    apply_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x0: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    step: int,
    weights: jax.Array | None = None,
    noise_fn: NoiseFn = gaussian_noise,
) -> jax.Array:
    """The epsilon MSE (scalar) at one fixed step, e.g. 100, 500, 900: a held-out curve that is
    not as noisy as the training loss, whose steps are drawn at random."""
    t = jnp.full((x0.shape[0],), step, jnp.int32)
    noise = noise_fn(key, x0.shape)
    xt = diffusion.q_sample(x0, t, noise)
    eps, _ = diffusion.split_output(apply_fn(xt, diffusion.model_timesteps(t), labels), x0.shape[-1])
    return position_mean(jnp.square(noise - eps), weights).mean()
