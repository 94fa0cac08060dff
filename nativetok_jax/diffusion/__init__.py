"""Gaussian diffusion as DiT (facebookresearch/DiT, from OpenAI's improved-diffusion) trains and
samples it, written for JAX: float64 schedules on the host, float32 arithmetic on device.

- :mod:`.schedule`: linear (DiT) and cosine noise schedules; :class:`~.schedule.Schedule`.
- :mod:`.respacing`: ``"250"`` / ``"ddim50"`` step subsets with re-derived betas.
- :mod:`.gaussian`: :class:`~.gaussian.GaussianDiffusion` (forward noising, posterior, eps <-> x0,
  learned-range variance) and :func:`~.gaussian.build_diffusion`.
- :mod:`.losses`: :func:`~.losses.diffusion_loss` (eps MSE + stop-gradient VB term, optional
  per-position weights) and the held-out :func:`~.losses.eps_mse_at`.
- :mod:`.guidance`: classifier-free guidance on a doubled batch.
- :mod:`.samplers`: DDPM and DDIM as one ``lax.scan``, per-sample keys, :func:`~.samplers.make_sampler`;
  multi-grained (D²iT) given a grain map.
- :mod:`.multi_grain`: D²iT's multi-grained noise, the averaging of outputs over coarse copies and
  the dynamic grain loss's weights.
"""
