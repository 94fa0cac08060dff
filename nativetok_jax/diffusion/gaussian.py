"""The Gaussian diffusion process on device: forward noising, the posterior, epsilon <-> x_0, and
the reverse step's mean and (learned-range) variance.

Source: DiT ``diffusion/gaussian_diffusion.py`` (``q_sample``, ``q_posterior_mean_variance``,
``p_mean_variance`` with ``ModelVarType.LEARNED_RANGE``, ``_predict_xstart_from_eps``). Images and
latents are channels-last: ``x [B, ..., C]``; a network with learned variance returns ``[B, ..., 2C]``,
the noise prediction in the first ``C`` channels and the variance interpolation values ``v`` in the
last ``C`` (DiT stacks them along its channel axis the same way).

All arithmetic is float32 whatever the network's compute dtype: per-step coefficients come from
the float64 :class:`~nativetok_jax.diffusion.schedule.Schedule` cast once to float32, and the
network's output is cast to float32 before it is used.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nativetok_jax.diffusion.respacing import respace
from nativetok_jax.diffusion.schedule import Schedule, named_schedule


class MeanVariance(NamedTuple):
    """One reverse step ``p(x_{t-1} | x_t)``: float32 arrays shaped like ``x_t``."""

    mean: jax.Array
    log_variance: jax.Array
    x0: jax.Array  # the network's estimate of x_0
    eps: jax.Array  # the network's estimate of the noise


def _gather(table: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
    """``table[t]`` as float32, shaped ``[B, 1, ..., 1]`` to broadcast over an ``ndim``-d batch."""
    values = jnp.asarray(table, jnp.float32)[t]
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
    """DiT's Gaussian diffusion over a :class:`Schedule`; every method is traceable.

    ``t`` arguments are int arrays ``[B]`` of step indices *of this schedule* (0 .. num_steps-1);
    :meth:`model_timesteps` maps them to the indices the network was trained with.

    Args:
      schedule: the float64 schedule (possibly respaced).
      learn_sigma: the network predicts the variance (learned range, DiT's default) after its noise
        channels; otherwise the reverse variance is the fixed posterior variance ("fixed small").
    """

    schedule: Schedule
    learn_sigma: bool = True

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    @functools.cached_property
    def _tables(self) -> dict[str, np.ndarray]:
        s = self.schedule
        return dict(
            sqrt_alphas_cumprod=np.sqrt(s.alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - s.alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / s.alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / s.alphas_cumprod - 1.0),
            posterior_mean_coef1=s.posterior_mean_coef1,
            posterior_mean_coef2=s.posterior_mean_coef2,
            posterior_variance=s.posterior_variance,
            posterior_log_variance_clipped=s.posterior_log_variance_clipped,
            log_betas=np.log(s.betas),
            alphas_cumprod=s.alphas_cumprod,
            alphas_cumprod_prev=s.alphas_cumprod_prev,
        )

    def coefficient(self, name: str, t: jax.Array, ndim: int) -> jax.Array:
        """The float32 per-step coefficient ``name`` at ``t``, broadcastable over ``ndim`` dims."""
        return _gather(self._tables[name], t, ndim)

    def model_timesteps(self, t: jax.Array) -> jax.Array:
        """The original-process step indices (int32) the network sees for this schedule's ``t``."""
        return jnp.asarray(self.schedule.timesteps, jnp.int32)[t]

    def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
        """``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise`` (float32)."""
        x0 = x0.astype(jnp.float32)
        return (self.coefficient("sqrt_alphas_cumprod", t, x0.ndim) * x0
                + self.coefficient("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * noise.astype(jnp.float32))

    def q_posterior(self, x0: jax.Array, xt: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mean and clipped log-variance of ``q(x_{t-1} | x_t, x_0)``."""
        mean = (self.coefficient("posterior_mean_coef1", t, xt.ndim) * x0.astype(jnp.float32)
                + self.coefficient("posterior_mean_coef2", t, xt.ndim) * xt.astype(jnp.float32))
        log_variance = jnp.broadcast_to(self.coefficient("posterior_log_variance_clipped", t, xt.ndim), xt.shape)
        return mean, log_variance

    def predict_x0(self, xt: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
        """``x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)``."""
        return (self.coefficient("sqrt_recip_alphas_cumprod", t, xt.ndim) * xt.astype(jnp.float32)
                - self.coefficient("sqrt_recipm1_alphas_cumprod", t, xt.ndim) * eps.astype(jnp.float32))

    def predict_eps(self, xt: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
        """The noise that takes ``x0`` to ``xt`` at step ``t`` (inverse of :meth:`predict_x0`)."""
        return ((self.coefficient("sqrt_recip_alphas_cumprod", t, xt.ndim) * xt.astype(jnp.float32) - x0)
                / self.coefficient("sqrt_recipm1_alphas_cumprod", t, xt.ndim))

    def learned_range_log_variance(self, v: jax.Array, t: jax.Array) -> jax.Array:
        """``f log beta_t + (1 - f) log beta~_t`` with ``f = (v + 1) / 2`` (Nichol & Dhariwal eq. 15):
        ``v = 1`` gives ``beta_t``, ``v = -1`` the (clipped) posterior variance ``beta~_t``."""
        fraction = (v.astype(jnp.float32) + 1.0) / 2.0
        return (fraction * self.coefficient("log_betas", t, v.ndim)
                + (1.0 - fraction) * self.coefficient("posterior_log_variance_clipped", t, v.ndim))

    def split_output(self, output: jax.Array, channels: int) -> tuple[jax.Array, jax.Array | None]:
        """A network output ``[B, ..., C or 2C]`` -> (eps, variance values or None), float32.

        Raises:
          ValueError: the output's channel count does not fit ``learn_sigma``.
        """
        expected = 2 * channels if self.learn_sigma else channels
        if output.shape[-1] != expected:
            raise ValueError(f"the network output has {output.shape[-1]} channels; learn_sigma={self.learn_sigma} "
                             f"with {channels}-channel inputs needs {expected}")
        output = output.astype(jnp.float32)
        if not self.learn_sigma:
            return output, None
        return output[..., :channels], output[..., channels:]

    def p_mean_variance(self, output: jax.Array, xt: jax.Array, t: jax.Array, *,
                        clip_denoised: bool = False) -> MeanVariance:
        """The reverse step implied by the network's ``output`` at ``(xt, t)``.

        ``clip_denoised`` clips the x_0 estimate to [-1, 1] (pixel space); DiT samples latents
        without clipping.
        """
        eps, values = self.split_output(output, xt.shape[-1])
        if values is None:
            log_variance = jnp.broadcast_to(self.coefficient("posterior_log_variance_clipped", t, xt.ndim), xt.shape)
        else:
            log_variance = self.learned_range_log_variance(values, t)
        x0 = self.predict_x0(xt, t, eps)
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = self.predict_eps(xt, t, x0)
        mean, _ = self.q_posterior(x0, xt, t)
        return MeanVariance(mean, log_variance, x0, eps)


def build_diffusion(schedule: str = "linear", num_steps: int = 1000, respacing: str | None = None,
                    learn_sigma: bool = True) -> GaussianDiffusion:
    """The process of a named schedule, optionally respaced for sampling (``"250"``, ``"ddim50"``).

    Training uses the full process (``respacing=None``); samplers take the respaced one, whose
    :meth:`GaussianDiffusion.model_timesteps` still hands the network the original step indices.
    """
    return GaussianDiffusion(respace(named_schedule(schedule, num_steps), respacing), learn_sigma=learn_sigma)
