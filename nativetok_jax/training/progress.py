"""Training progress with an ETA, without TensorFlow.

The same reports as clu's ``periodic_actions.ReportProgress`` (which cannot be imported without
TensorFlow: it imports ``clu.metric_writers``): every ``every_steps`` steps and at the last one, a
log line ``step 200/2300 (8.7%), 4.9 steps/s, ETA 7m09s (1m02s: 12.0% eval)`` and the scalars
``steps_per_sec`` and ``uptime`` (seconds) on the run's writer.

    progress = ReportProgress(num_train_steps=n, writer=writer, every_steps=50)
    for step in range(start + 1, n + 1):
        state = train_step(state, batch)
        progress(step)
        with progress.timed("eval"):
            evaluate()
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator
from typing import Any

from absl import logging


def format_seconds(seconds: float) -> str:
    """``7m09s``, ``2h03m``, ``41s``: a duration for a log line."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ReportProgress:
    """Logs steps/s, percentage and ETA and writes ``steps_per_sec`` / ``uptime`` scalars.

    Call it after every step with the step just finished; it reports every ``every_steps`` steps
    and at ``num_train_steps``. The rate is measured between reports, so the first report after
    a (re)start includes compilation. ``timed(name)`` adds the share of wall time spent in named
    parts (evaluation, checkpoints) to the log line.
    """

    def __init__(self, *, num_train_steps: int, writer: Any = None, every_steps: int = 100):
        if every_steps < 1:
            raise ValueError(f"every_steps must be positive, got {every_steps}")
        self._total = num_train_steps
        self._writer = writer
        self._every = every_steps
        self._start = time.monotonic()
        self._last: tuple[int, float] | None = None
        self._parts: dict[str, float] = collections.defaultdict(float)

    def __call__(self, step: int) -> None:
        now = time.monotonic()
        if self._last is None:  # the first step after a (re)start: only a reference point
            self._last = (step, now)
            return
        if step % self._every and step != self._total:
            return
        last_step, last_time = self._last
        if step <= last_step or now <= last_time:
            return
        rate = (step - last_step) / (now - last_time)
        self._last = (step, now)
        message = f"step {step}/{self._total} ({100 * step / self._total:.1f}%), {rate:.3g} steps/s, " \
                  f"ETA {format_seconds((self._total - step) / rate)}"
        if self._parts:
            uptime = now - self._start
            shares = ", ".join(f"{100 * seconds / uptime:.1f}% {name}" for name, seconds in sorted(self._parts.items()))
            message += f" ({format_seconds(uptime)}: {shares})"
        logging.info("%s", message)
        if self._writer is not None:
            self._writer.write_scalars(step, {"steps_per_sec": rate, "uptime": now - self._start})

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Counts the wall time of the block as ``name`` in the progress line."""
        start = time.monotonic()
        try:
            yield
        finally:
            self._parts[name] += time.monotonic() - start
