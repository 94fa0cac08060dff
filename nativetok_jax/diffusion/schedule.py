"""Noise schedules, computed in float64 numpy on the host.

JAX runs with x64 off, where ``jnp.float64`` silently becomes float32; DiT's schedule values
(``alpha_bar[999] = 4.03583e-5``, posterior variances near 1e-5) and the coefficients derived from
them lose digits in float32 arithmetic, and low-precision schedules give NaNs. So every derived
array is computed here in float64 and only the finished per-step coefficients are cast to float32
when a traced computation reads them (:class:`nativetok_jax.diffusion.gaussian.GaussianDiffusion`).

Source: facebookresearch/DiT ``diffusion/gaussian_diffusion.py`` (from OpenAI's improved-diffusion):
``get_named_beta_schedule``, ``betas_for_alpha_bar`` and the ``GaussianDiffusion`` constructor.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

SCHEDULES = ("linear", "cosine")


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete diffusion process of ``num_steps`` steps, all arrays float64 ``[num_steps]``.

    Attributes:
      betas: per-step noise variances ``beta_t`` in (0, 1].
      timesteps: int64, the step index of the *original* process each step stands for (the
        identity unless respaced, :func:`nativetok_jax.diffusion.respacing.respace`); the network
        is always given these original indices.
    """

    betas: np.ndarray
    timesteps: np.ndarray

    def __post_init__(self):
        betas = np.asarray(self.betas, dtype=np.float64)
        timesteps = np.asarray(self.timesteps, dtype=np.int64)
        if betas.ndim != 1 or not len(betas):
            raise ValueError(f"Schedule: betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("Schedule: every beta must lie in (0, 1]")
        if timesteps.shape != betas.shape:
            raise ValueError(f"Schedule: timesteps {timesteps.shape} and betas {betas.shape} differ in shape")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "timesteps", timesteps)

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """``alpha_bar_t = prod_{s<=t} (1 - beta_s)``."""
        return np.cumprod(1.0 - self.betas)

    @functools.cached_property
    def alphas_cumprod_prev(self) -> np.ndarray:
        """``alpha_bar_{t-1}``, with ``alpha_bar_{-1} = 1``."""
        return np.append(1.0, self.alphas_cumprod[:-1])

    @functools.cached_property
    def posterior_variance(self) -> np.ndarray:
        """Variance of ``q(x_{t-1} | x_t, x_0)``: ``beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)``."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @functools.cached_property
    def posterior_log_variance_clipped(self) -> np.ndarray:
        """log of :attr:`posterior_variance`, whose step-0 value (0) is replaced by step 1's."""
        variance = self.posterior_variance
        return np.log(np.append(variance[1], variance[1:]) if len(variance) > 1 else variance)

    @functools.cached_property
    def posterior_mean_coef1(self) -> np.ndarray:
        """Coefficient of ``x_0`` in the posterior mean."""
        return self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @functools.cached_property
    def posterior_mean_coef2(self) -> np.ndarray:
        """Coefficient of ``x_t`` in the posterior mean."""
        return (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - self.betas) / (1.0 - self.alphas_cumprod)


def linear_betas(num_steps: int = 1000, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    """DiT's linear schedule; ``start``/``end`` are for 1000 steps and scale by ``1000 / num_steps``."""
    scale = 1000.0 / num_steps
    return np.linspace(scale * start, scale * end, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int = 1000, max_beta: float = 0.999, offset: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: ``alpha_bar(s) = cos((s + offset) / (1 + offset) * pi/2)^2``,
    ``beta_t = min(1 - alpha_bar((t+1)/T) / alpha_bar(t/T), max_beta)``."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


def named_schedule(name: str = "linear", num_steps: int = 1000) -> Schedule:
    """``"linear"`` (DiT, 1e-4 .. 0.02 at 1000 steps) or ``"cosine"``; ValueError otherwise."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if name == "linear":
        betas = linear_betas(num_steps)
    elif name == "cosine":
        betas = cosine_betas(num_steps)
    else:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {SCHEDULES}")
    return Schedule(betas, np.arange(num_steps))
