"""DDPM ancestral and DDIM samplers, each one ``lax.scan`` over the (respaced) steps.

Source: DiT ``diffusion/gaussian_diffusion.py`` (``p_sample``, ``ddim_sample``) and ``sample.py``
(DDPM with 250 respaced steps and no clipping is DiT's FID protocol).

Randomness is per sample: sample ``i`` draws its starting noise and every step's noise from
``fold_in(key, index_i)``, ``index_i`` being its position in the whole sampling run
(``sample_indices``, default ``0 .. B-1``). So a sample depends on the key and its index only,
not on the batch it was drawn in or the batch size, and a run split over hosts or batches
(give each batch its global indices) draws exactly the samples of one big batch.

Multi-grained sampling (D²iT, :mod:`.multi_grain`): given a grain map ``grains [B, h/2, w/2]``,
the network is called as ``model_fn(x, timesteps, labels, grains)``, its output is averaged over
each coarse region's copies, and the starting noise and every step's noise are multi-grained
(drawn per sample from the same folded keys). Every update is elementwise in ``x``, the output
and the noise, all three exact 2 x 2 copies in coarse regions, so coarse regions stay exact
copies at every step. Without ``grains`` the samplers are DiT's, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from nativetok_jax.diffusion.gaussian import GaussianDiffusion
from nativetok_jax.diffusion.guidance import guided
from nativetok_jax.diffusion.losses import ModelFn
from nativetok_jax.diffusion.multi_grain import average_coarse, check_grains, multi_grain_noise

METHODS = ("ddpm", "ddim")

# (params, x_t, timesteps, labels[, grains]) -> output; a pure function of its arguments (e.g.
# nnx.merge of a graphdef with ``params``) so the sampler can be jitted with the weights as an
# argument. The grain map is passed only to multi-grained samplers.
ApplyFn = Callable[..., jax.Array]


def _sample_keys(key: jax.Array, batch: int, sample_indices: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(starting-noise keys, step-noise keys), each ``[B]`` keys folded from the sample indices."""
    indices = jnp.arange(batch) if sample_indices is None else jnp.asarray(sample_indices)
    if indices.shape != (batch,):
        raise ValueError(f"sample_indices must have shape ({batch},), got {indices.shape}")
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i)))(indices)
    return keys[:, 0], keys[:, 1]


def _normal(keys: jax.Array, shape: Sequence[int], step: jax.Array | None = None) -> jax.Array:
    """One standard-normal draw of ``shape`` per key (folded with ``step`` when given)."""
    def draw(k):
        return jax.random.normal(k if step is None else jax.random.fold_in(k, step), tuple(shape), jnp.float32)
    return jax.vmap(draw)(keys)


def _noise(keys: jax.Array, shape: Sequence[int], step: jax.Array | None, grains: jax.Array | None) -> jax.Array:
    """The per-sample noise of one step (``step=None``: the starting noise), multi-grained with ``grains``."""
    if grains is None:
        return _normal(keys, shape, step)
    if step is not None:
        keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    return multi_grain_noise(keys, grains, shape[-1])


def _reverse(model_fn: ModelFn, diffusion: GaussianDiffusion, x: jax.Array, t: jax.Array, labels: jax.Array,
             grains: jax.Array | None, clip_denoised: bool):
    """The reverse step's mean and variance from the network at ``(x, t)``; with ``grains`` the
    output is averaged over coarse copies (a bit-exact no-op on a model that averages already)."""
    timesteps = diffusion.model_timesteps(t)
    if grains is None:
        output = model_fn(x, timesteps, labels)
    else:
        output = average_coarse(model_fn(x, timesteps, labels, grains).astype(jnp.float32), grains)
    return diffusion.p_mean_variance(output, x, t, clip_denoised=clip_denoised)


def _run(step_fn, diffusion: GaussianDiffusion, labels: jax.Array, key: jax.Array, shape: Sequence[int],
         sample_indices: jax.Array | None, grains: jax.Array | None) -> jax.Array:
    if grains is not None:
        check_grains(grains, (labels.shape[0], *shape))
    start_keys, step_keys = _sample_keys(key, labels.shape[0], sample_indices)
    x = _noise(start_keys, shape, None, grains)

    def body(x, step):
        t = jnp.full((x.shape[0],), step, jnp.int32)
        return step_fn(x, t, _noise(step_keys, shape, step, grains)), None

    x, _ = jax.lax.scan(body, x, jnp.arange(diffusion.num_steps - 1, -1, -1, dtype=jnp.int32))
    return x


def ddpm_sample(model_fn: ModelFn, diffusion: GaussianDiffusion, labels: jax.Array, key: jax.Array,
                shape: Sequence[int], *, sample_indices: jax.Array | None = None,
                clip_denoised: bool = False, grains: jax.Array | None = None) -> jax.Array:
    """Ancestral sampling: ``x_{t-1} = mean + sigma_t z`` (no noise at the last step).

    Args:
      model_fn: ``(x_t, timesteps, labels) -> output`` (guided or not, see :func:`guided`).
      diffusion: the (respaced) process; its ``learn_sigma`` says how to read the output.
      labels: int ``[B]`` class labels (the null class for unconditional models).
      key: the run's PRNG key.
      shape: one sample's shape, e.g. ``(32, 32, 4)``.
      sample_indices: int ``[B]``, each sample's index in the run (default ``0 .. B-1``).
      clip_denoised: clip the x_0 estimate to [-1, 1] (pixel space only; DiT: off).
      grains: int ``[B, h/2, w/2]`` (1 fine, 0 coarse) for multi-grained sampling (D²iT): then
        ``model_fn`` takes the grain map as a fourth argument, and coarse regions of the samples
        are exact 2 x 2 copies. None: DiT's sampler.

    Returns:
      float32 samples ``[B, *shape]``.

    Raises:
      ValueError: ``sample_indices`` or ``grains`` of the wrong shape (at trace time).
    """
    def step(x, t, noise):
        out = _reverse(model_fn, diffusion, x, t, labels, grains, clip_denoised)
        nonzero = (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        return out.mean + nonzero * jnp.exp(0.5 * out.log_variance) * noise

    return _run(step, diffusion, labels, key, shape, sample_indices, grains)


def ddim_sample(model_fn: ModelFn, diffusion: GaussianDiffusion, labels: jax.Array, key: jax.Array,
                shape: Sequence[int], *, eta: float = 0.0, sample_indices: jax.Array | None = None,
                clip_denoised: bool = False, grains: jax.Array | None = None) -> jax.Array:
    """DDIM (Song et al. 2021, eq. 12): ``x_{t-1} = sqrt(ab') x0 + sqrt(1 - ab' - s^2) eps + s z``,
    ``s = eta sqrt((1 - ab') / (1 - ab)) sqrt(1 - ab / ab')``; ``eta = 0`` is deterministic given the
    starting noise. Arguments as :func:`ddpm_sample`."""
    def step(x, t, noise):
        out = _reverse(model_fn, diffusion, x, t, labels, grains, clip_denoised)
        eps = diffusion.predict_eps(x, t, out.x0)
        alpha_bar = diffusion.coefficient("alphas_cumprod", t, x.ndim)
        alpha_bar_prev = diffusion.coefficient("alphas_cumprod_prev", t, x.ndim)
        sigma = eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * jnp.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean = out.x0 * jnp.sqrt(alpha_bar_prev) + jnp.sqrt(jnp.maximum(1 - alpha_bar_prev - sigma**2, 0.0)) * eps
        nonzero = (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        return mean + nonzero * sigma * noise

    return _run(step, diffusion, labels, key, shape, sample_indices, grains)


def make_sampler(
    apply_fn: ApplyFn,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    method: str = "ddpm",
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    null_label: int | None = None,
    guided_channels: int | None = None,
    clip_denoised: bool = False,
) -> Callable[..., jax.Array]:
    """A jitted ``sample(params, labels, key, sample_indices=None, grains=None) -> [B, *shape]`` float32.

    The whole reverse process is one compiled ``lax.scan``; ``params`` is an argument (not a
    baked-in constant), so new weights (EMA, a later checkpoint) reuse the compiled program.
    Given ``grains`` (int ``[B, h/2, w/2]``), the sampling is multi-grained (D²iT) and ``apply_fn``
    is called as ``apply_fn(params, x, timesteps, labels, grains)``; guidance doubles the grain map
    with the batch.

    Raises:
      ValueError: an unknown ``method``, or guidance without ``null_label``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {METHODS}")
    if guidance_scale != 1.0 and null_label is None:
        raise ValueError("classifier-free guidance needs the null label (the model's num_classes)")
    shape = tuple(int(s) for s in shape)

    def sample(params, labels: jax.Array, key: jax.Array, sample_indices: jax.Array | None = None,
               grains: jax.Array | None = None) -> jax.Array:
        model_fn = lambda *inputs: apply_fn(params, *inputs)  # noqa: E731
        if guidance_scale != 1.0:
            model_fn = guided(model_fn, guidance_scale, null_label, guided_channels=guided_channels)
        labels = jnp.asarray(labels, jnp.int32)
        if method == "ddpm":
            return ddpm_sample(model_fn, diffusion, labels, key, shape, sample_indices=sample_indices,
                               clip_denoised=clip_denoised, grains=grains)
        return ddim_sample(model_fn, diffusion, labels, key, shape, eta=eta, sample_indices=sample_indices,
                           clip_denoised=clip_denoised, grains=grains)

    return jax.jit(sample)
