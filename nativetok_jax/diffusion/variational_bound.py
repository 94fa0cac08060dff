"""The variational bound of a diffusion model in bits per dimension (DiT's ``calc_bpd_loop``).

Source: DiT ``diffusion/gaussian_diffusion.py`` (``calc_bpd_loop``, ``_prior_bpd``,
``_vb_terms_bpd``), from OpenAI's improved-diffusion. For clean data ``x_0``:

    bpd = sum_{t >= 1} KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) / ln 2       (x_t ~ q(x_t | x_0))
        + (-log p(x_0 | x_1)) / ln 2          discretised Gaussian decoder, 256 bins on [-1, 1]
        + KL(q(x_T | x_0) || N(0, I)) / ln 2  the prior term

each term a mean over the data's dimensions (so the total is per dimension), exactly the terms of
the training loss's VB part (:func:`nativetok_jax.diffusion.losses.vb_term`). Like DiT we apply
the decoder term to latents as to pixels: the number compares models on one latent space, not
with pixel-space likelihoods.

The full bound needs one network call per step (1000 for DiT). ``num_terms`` evaluates an evenly
spaced subset of the steps that always includes ``t = 0`` and weighs each ``t >= 1`` term by the
number of steps it stands for (``(T - 1) / (num_terms - 1)``): an estimate of the same sum, exact
when the KL terms vary linearly between the chosen steps.

Per-position ``weights`` (as :func:`~nativetok_jax.diffusion.losses.position_mean` takes them; D²iT:
each latent code once) make every mean a weighted mean, and ``noise_fn`` replaces the Gaussian
noise of ``q(x_t | x_0)`` (D²iT's multi-grained noise, copied in coarse regions).
"""

from __future__ import annotations

import math
import jax
import jax.numpy as jnp
import numpy as np

from nativetok_jax.diffusion.gaussian import GaussianDiffusion
from nativetok_jax.diffusion.losses import ModelFn, NoiseFn, gaussian_noise, normal_kl, position_mean, vb_term


def bound_timesteps(num_steps: int, num_terms: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The steps evaluated and the weight of each: ``(int32 [n], float32 [n])``, descending.

    ``num_terms=None`` (or ``>= num_steps``): every step, weight 1. Otherwise ``num_terms >= 2``
    evenly spaced steps from ``num_steps - 1`` down to 0; ``t = 0`` weighs 1 and each other
    ``(num_steps - 1) / (num_terms - 1)``.

    Raises:
      ValueError: ``num_terms < 2``.
    """
    if num_terms is None or num_terms >= num_steps:
        steps = np.arange(num_steps - 1, -1, -1, dtype=np.int32)
        return steps, np.ones(num_steps, np.float32)
    if num_terms < 2:
        raise ValueError(f"num_terms: the bound needs t = 0 and at least one t >= 1, got {num_terms}")
    steps = np.unique(np.round(np.linspace(0, num_steps - 1, num_terms)).astype(np.int32))[::-1]
    weights = np.where(steps == 0, 1.0, (num_steps - 1) / (len(steps) - 1)).astype(np.float32)
    return steps.copy(), weights


def prior_bpd(diffusion: GaussianDiffusion, x0: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """``KL(q(x_T | x_0) || N(0, I))`` in bits per dimension, ``[B]`` (DiT's ``_prior_bpd``)."""
    t = jnp.full((x0.shape[0],), diffusion.num_steps - 1, jnp.int32)
    x0 = x0.astype(jnp.float32)
    mean = diffusion.coefficient("sqrt_alphas_cumprod", t, x0.ndim) * x0
    # log(1 - alpha_bar_T) from the float64 table's square root: no float32 cancellation in 1 - alpha_bar.
    log_variance = jnp.broadcast_to(2.0 * jnp.log(diffusion.coefficient("sqrt_one_minus_alphas_cumprod", t, x0.ndim)),
                                    x0.shape)
    zeros = jnp.zeros_like(x0)
    return position_mean(normal_kl(mean, log_variance, zeros, zeros), weights) / math.log(2.0)


def variational_bound(
    apply_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x0: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    weights: jax.Array | None = None,
    noise_fn: NoiseFn = gaussian_noise,
    num_terms: int | None = None,
) -> dict[str, jax.Array]:
    """The variational bound of ``apply_fn`` on ``x0``, in bits per dimension, per example.

    Args:
      apply_fn: the network ``(x_t, timesteps, labels) -> output`` (learned or fixed variance, as
        ``diffusion.learn_sigma`` says); not guided (the bound is the conditional model's).
      diffusion: the training process (not respaced).
      x0: clean data ``[B, ..., C]`` float32 (scaled latents).
      labels: int ``[B]``.
      key: the noise of every step is ``noise_fn(fold_in(key, t), x0.shape)``.
      weights, noise_fn, num_terms: see the module docstring.

    Returns:
      float32 ``[B]`` arrays: ``total_bpd`` (the bound), ``prior_bpd``, ``decoder_bpd`` (the t = 0
      term) and ``kl_bpd`` (the weighted sum of the ``t >= 1`` terms). One ``lax.scan`` over the
      steps; jit the caller.
    """
    x0 = x0.astype(jnp.float32)
    steps, step_weights = bound_timesteps(diffusion.num_steps, num_terms)

    def body(carry, inputs):
        kl, decoder = carry
        step, weight = inputs
        t = jnp.full((x0.shape[0],), step, jnp.int32)
        xt = diffusion.q_sample(x0, t, noise_fn(jax.random.fold_in(key, step), x0.shape))
        term = vb_term(diffusion, apply_fn(xt, diffusion.model_timesteps(t), labels), x0, xt, t, weights)
        is_decoder = step == 0
        return (kl + jnp.where(is_decoder, 0.0, weight * term), decoder + jnp.where(is_decoder, term, 0.0)), None

    zeros = jnp.zeros((x0.shape[0],), jnp.float32)
    (kl, decoder), _ = jax.lax.scan(body, (zeros, zeros), (jnp.asarray(steps), jnp.asarray(step_weights)))
    prior = prior_bpd(diffusion, x0, weights)
    return {"total_bpd": kl + decoder + prior, "prior_bpd": prior, "decoder_bpd": decoder, "kl_bpd": kl}
