"""What keeps a run's work safe: preemption (SIGTERM) and a non-finite loss stop it cleanly.

Both trainers (tokenizer and generator) use these: SIGTERM becomes a flag every process agrees on
before the loop saves a checkpoint and stops; a NaN or infinite loss (or parameters) stops the
run before such a state can be saved, naming the last good checkpoint.
"""

from __future__ import annotations

import signal
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message says which step and what was kept."""


class Preempted(Exception):
    """SIGTERM arrived; the state was saved and the run can be restarted."""


class Preemption:
    """Turns SIGTERM into a flag the loop checks (all processes agree before acting on it)."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM: saving a checkpoint and stopping")
        self.requested = True

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def check_finite(metrics: dict[str, Any], step: int, directory: str, last_saved: int | None) -> None:
    """Stops before a state with a non-finite loss or parameters can be saved."""
    loss = float(metrics["loss"])
    if np.isfinite(loss) and float(metrics["params_finite"]) == 1.0:
        return
    kept = (f"the last good checkpoint (step {last_saved}) is kept in {directory}" if last_saved
            else "no checkpoint was saved yet")
    what = f"the loss became {loss}" if not np.isfinite(loss) else "the parameters became non-finite"
    raise NonFiniteLossError(f"{what} at step {step}; stopped, and {kept}")
