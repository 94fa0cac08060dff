"""Timestep respacing: sampling with a subset of a trained process's steps.

Source: DiT ``diffusion/respace.py`` (``space_timesteps``, ``SpacedDiffusion``). The kept steps'
betas are re-derived from ``alpha_bar`` at those steps, ``beta'_i = 1 - alpha_bar[k_i] /
alpha_bar[k_{i-1}]``, so the respaced process has exactly the original marginals at the kept
steps; the network keeps seeing the original step indices (:attr:`Schedule.timesteps`).
"""

from __future__ import annotations

import numpy as np

from nativetok_jax.diffusion.schedule import Schedule


def space_timesteps(num_steps: int, spec: str | int) -> list[int]:
    """The original steps kept by ``spec``, ascending.

    ``spec`` is ``"ddimN"`` (the even stride that gives exactly N steps, DDIM's ``range(0, T,
    stride)``: ``"ddim50"`` of 1000 keeps 0, 20, .., 980), or comma-separated counts per equal
    section (``"250"``: 250 steps spread over all 1000, ``round`` of a fractional stride, first and
    last step kept: 0, 4, 8, .., 995, 999; ``"10,20"``: 10 in the first half, 20 in the second).

    Raises:
      ValueError: a count larger than its section, or no stride giving exactly N for ``ddimN``.
    """
    spec = str(spec).strip()
    if spec.startswith("ddim"):
        try:
            wanted = int(spec[4:])
        except ValueError:
            raise ValueError(f"respacing {spec!r}: expected 'ddim' followed by a step count") from None
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == wanted:
                return list(range(0, num_steps, stride))
        if wanted == num_steps:
            return list(range(num_steps))
        raise ValueError(f"respacing {spec!r}: no integer stride gives exactly {wanted} of {num_steps} steps")
    try:
        counts = [int(c) for c in spec.split(",")]
    except ValueError:
        raise ValueError(f"respacing {spec!r}: expected 'ddimN' or comma-separated step counts") from None
    size_per, extra = divmod(num_steps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"respacing {spec!r}: cannot keep {count} steps of a section of {size}")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return kept


def respace(schedule: Schedule, spec: str | int | None) -> Schedule:
    """``schedule`` restricted to the steps :func:`space_timesteps` keeps (``None``: unchanged)."""
    if spec is None or str(spec) == str(schedule.num_steps):
        return schedule
    kept = space_timesteps(schedule.num_steps, spec)
    alphas_cumprod = schedule.alphas_cumprod[kept]
    previous = np.append(1.0, alphas_cumprod[:-1])
    return Schedule(1.0 - alphas_cumprod / previous, schedule.timesteps[kept])
