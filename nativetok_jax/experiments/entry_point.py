"""What every experiment command does around its run: the one-line errors and the closing table."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any


def run_and_report(run: Callable[[], dict[str, Any]], table: Callable[[dict[str, Any]], str], written: str) -> None:
    """Runs ``run()`` (SIGTERM ends it as a preempted run), exits with one line ``error: ...`` for bad
    input (config, data, grain or value errors, missing files), else prints the time taken, what was
    ``written`` and ``table(report)``."""
    from nativetok_jax.config import ConfigError
    from nativetok_jax.data.sources import DataError
    from nativetok_jax.models.grain import GrainError
    from nativetok_jax.training.guards import ends_preempted_runs

    start = time.time()
    try:
        with ends_preempted_runs():
            report = run()
    except (ConfigError, DataError, GrainError, ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {str(error).splitlines()[0]}")
    print(f"done in {time.time() - start:.0f} s ({written}):")
    print(table(report))
