"""What every experiment command does around its run: the one-line errors and the closing table."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from nativetok_jax.command import boundary


def run_and_report(run: Callable[[], dict[str, Any]], table: Callable[[dict[str, Any]], str], written: str) -> None:
    """Runs ``run()`` inside the entry points' error boundary (``command.boundary``: SIGTERM or
    Ctrl-C ends it as a preempted run, the project's errors are one line ``error: ...``, a bug keeps
    its traceback), then prints the time taken, what was ``written`` and ``table(report)``."""

    start = time.time()
    with boundary():
        report = run()
    print(f"done in {time.time() - start:.0f} s ({written}):")
    print(table(report))
