"""What keeps a run's work safe: preemption (SIGTERM), Ctrl-C (SIGINT) and a non-finite loss stop it
cleanly.

The training loop (``training/loop.py``) asks :class:`Preemption` at *every* step whether to save
and stop: with several processes (``jax.distributed``) through JAX's preemption sync point (the
coordination service turns a SIGTERM on any host into one step at which all hosts stop
together, so they agree without a collective per step); with one process through a SIGTERM
flag. Ctrl-C is handled like SIGTERM (save at the next step, stop, print the resume line; with
JAX's preemption service it is turned into a SIGTERM of this process, so every host stops at the
same step); a second Ctrl-C stops at once without saving. A NaN or infinite loss (or parameters) stops the run before such a state can be saved,
naming the last good checkpoint. Every entry point ends a preempted run with the same line
(:func:`ends_preempted_runs`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from jax._src import distributed
from jax.experimental import multihost_utils

from nativetok_jax.errors import UserError


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced a NaN or infinite loss; the message says which step and what was kept."""


class Preempted(Exception):
    """SIGTERM arrived; the state was saved (if there was one) and the run can be restarted."""


def jax_syncs_preemption() -> bool:
    """Whether JAX's coordination service handles SIGTERM (several processes, preemption service on)."""
    return jax.process_count() > 1 and distributed.global_state.preemption_sync_manager is not None


INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for a program stopped by Ctrl-C


class Preemption:
    """Whether to save and stop now; checked every step (see the module docstring)."""

    def __init__(self):
        self.requested = False
        self.reason = "preempted"
        self._interrupted = False
        self._synced = jax_syncs_preemption()
        self._previous: dict[int, Any] = {}
        if not self._synced:  # JAX's coordination service owns SIGTERM when it syncs preemption
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM: saving a checkpoint and stopping")
        self.requested = True

    def _interrupt(self, signum, frame):
        del signum, frame
        if self._interrupted:  # the second Ctrl-C: stop now, whatever is being done
            raise KeyboardInterrupt
        self._interrupted = True
        self.reason = "interrupted (Ctrl-C)"
        logging.warning("Ctrl-C: saving a checkpoint and stopping (Ctrl-C again stops at once, without saving)")
        if self._synced:  # JAX's preemption service turns it into one step at which every host stops
            os.kill(os.getpid(), signal.SIGTERM)
        else:
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
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def _stop_now(signum, frame):
    del frame
    what = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    raise Preempted(f"{what} outside the training loop, so there was nothing to save")


@contextlib.contextmanager
def ends_preempted_runs() -> Iterator[None]:
    """For entry points: a SIGTERM or Ctrl-C outside the training loop (which saves first) stops at
    once, and every preempted or interrupted run exits with the same line: ``stopped: <why>; run
    the same command to resume`` (exit status 1). A second Ctrl-C inside the loop (which stops
    without saving) ends with one line too, and exit status 130."""
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, _stop_now)}
    if not jax_syncs_preemption():
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _stop_now)
    try:
        yield
    except Preempted as stop:
        logging.warning("%s", stop)
        sys.exit(f"stopped: {stop}; run the same command to resume")
    except KeyboardInterrupt:
        print("stopped: Ctrl-C twice, so without saving; the newest saved checkpoint is kept, run the same "
              "command to resume from it", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check_finite(metrics: dict[str, Any], step: int, directory: str, last_saved: int | None) -> None:
    """Stops before a state with a non-finite loss or parameters can be saved."""
    loss = float(metrics["loss"])
    if np.isfinite(loss) and float(metrics["params_finite"]) == 1.0:
        return
    kept = (f"the last good checkpoint (step {last_saved}) is kept in {directory}" if last_saved
            else "no checkpoint was saved yet")
    what = f"the loss became {loss}" if not np.isfinite(loss) else "the parameters became non-finite"
    raise NonFiniteLossError(f"{what} at step {step}; stopped, and {kept}")
