"""What keeps a run's work safe: preemption (SIGTERM) and a non-finite loss stop it cleanly.

The training loop (``training/loop.py``) asks :class:`Preemption` at *every* step whether to save
and stop: with several processes (``jax.distributed``) through JAX's preemption sync point (the
coordination service turns a SIGTERM on any host into one step at which all hosts stop
together, so they agree without a collective per step); with one process through a SIGTERM
flag. A NaN or infinite loss (or parameters) stops the run before such a state can be saved,
naming the last good checkpoint. Every entry point ends a preempted run with the same line
(:func:`ends_preempted_runs`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from jax._src import distributed
from jax.experimental import multihost_utils


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message says which step and what was kept."""


class Preempted(Exception):
    """SIGTERM arrived; the state was saved (if there was one) and the run can be restarted."""


def jax_syncs_preemption() -> bool:
    """Whether JAX's coordination service handles SIGTERM (several processes, preemption service on)."""
    return jax.process_count() > 1 and distributed.global_state.preemption_sync_manager is not None


class Preemption:
    """Whether to save and stop now; checked every step (see the module docstring)."""

    def __init__(self):
        self.requested = False
        self._synced = jax_syncs_preemption()
        self._previous = None
        if not self._synced:  # JAX's coordination service owns SIGTERM when it syncs preemption
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM: saving a checkpoint and stopping")
        self.requested = True

    def reached(self, step: int) -> bool:
        """True on the step at which every process saves and stops (call it at every step)."""
        if self._synced:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        if jax.process_count() == 1:
            return self.requested
        # Several processes without JAX's preemption service: agree through a collective.
        return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _stop_now(signum, frame):
    del signum, frame
    raise Preempted("SIGTERM outside the training loop, so there was nothing to save")


@contextlib.contextmanager
def ends_preempted_runs() -> Iterator[None]:
    """For entry points: a SIGTERM outside the training loop (which saves first) stops at once, and
    every preempted run exits with the same line: ``stopped: <why>; run the same command to
    resume`` (exit status 1)."""
    previous = None if jax_syncs_preemption() else signal.signal(signal.SIGTERM, _stop_now)
    try:
        yield
    except Preempted as stop:
        logging.warning("%s", stop)
        sys.exit(f"stopped: {stop}; run the same command to resume")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def check_finite(metrics: dict[str, Any], step: int, directory: str, last_saved: int | None) -> None:
    """Stops before a state with a non-finite loss or parameters can be saved."""
    loss = float(metrics["loss"])
    if np.isfinite(loss) and float(metrics["params_finite"]) == 1.0:
        return
    kept = (f"the last good checkpoint (step {last_saved}) is kept in {directory}" if last_saved
            else "no checkpoint was saved yet")
    what = f"the loss became {loss}" if not np.isfinite(loss) else "the parameters became non-finite"
    raise NonFiniteLossError(f"{what} at step {step}; stopped, and {kept}")
