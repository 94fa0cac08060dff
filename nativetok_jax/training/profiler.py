"""A profiler window over chosen training steps, written where TensorBoard's profile plugin looks.

clu's ``periodic_actions.Profile`` does the same, but importing it imports TensorFlow (through
``clu.metric_writers``), which is an optional extra here; this is ``jax.profiler`` directly.
"""

from __future__ import annotations

import jax
from absl import logging
from etils import epath


class ProfileWindow:
    """Traces steps ``first_step + 1 .. first_step + num_steps`` into ``logdir/plugins/profile``.

    Call it after every finished step with that step's number; the trace starts after step
    ``first_step`` (so compilation of the first step stays out of it unless ``first_step`` is 0)
    and stops after ``num_steps`` more steps. ``close()`` ends a trace a stopped run left open.
    """

    def __init__(self, logdir: epath.PathLike, *, num_steps: int, first_step: int):
        if num_steps < 1 or first_step < 0:
            raise ValueError(f"profile window: num_steps {num_steps} must be >= 1, first_step {first_step} >= 0")
        self._logdir = str(logdir)
        self._start, self._stop = first_step, first_step + num_steps
        self._tracing = False

    def __call__(self, step: int) -> None:
        if step == self._start and not self._tracing:
            jax.profiler.start_trace(self._logdir)
            self._tracing = True
            logging.info("profiling steps %d..%d into %s/plugins/profile", self._start + 1, self._stop, self._logdir)
        elif step >= self._stop and self._tracing:
            self.close()

    def close(self) -> None:
        if self._tracing:
            jax.profiler.stop_trace()
            self._tracing = False
