"""What every absl entry point shares: ``--help`` that prints the command's help and exits 0 (absl's
own ``--help`` exits 1), and quiet logs by default.

Quiet logs: the lines a user would otherwise read past are dropped from the absl log unless
``--verbosity=1`` (or ``-v 1``) or more asks for them:

- JAX's backend probe (``Unable to initialize backend 'tpu': ... Failed to open libtpu.so``, an
  INFO line of ``jax/_src/xla_bridge.py`` on every machine without a TPU);
- orbax's INFO and WARNING lines (about 50 for one checkpoint restore: handler registration,
  metadata reads, "read only" notices); orbax's errors stay, except those of a save that ran out
  of space (each of its threads logs the traceback; the command says it in one line instead,
  :class:`~nativetok_jax.checkpoints.NoSpaceError`).

The project's own INFO lines (progress, held-out metrics, where files went) are kept.
"""

from __future__ import annotations

import logging as std_logging
import os
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging

from nativetok_jax import checkpoints

HELP_FLAGS = frozenset({"-h", "-help", "--help", "-helpshort", "--helpshort", "-?"})
FULL_HELP_FLAGS = frozenset({"-helpfull", "--helpfull"})
# Path fragments of the log records hidden by default, with the level below which each is hidden.
QUIET_SOURCES = ((os.sep + "orbax" + os.sep, std_logging.ERROR),
                 (os.path.join("jax", "_src", "xla_bridge.py"), std_logging.WARNING))


def is_noise(record: std_logging.LogRecord) -> bool:
    """Whether ``record`` is one of the lines hidden by default (see the module docstring)."""
    if any(fragment in record.pathname and record.levelno < below for fragment, below in QUIET_SOURCES):
        return True
    error = record.exc_info[1] if record.exc_info else None
    return QUIET_SOURCES[0][0] in record.pathname and (
        (error is not None and checkpoints.is_no_space(error)) or "No space left on device" in record.getMessage())


def _keep(record: std_logging.LogRecord) -> bool:
    return not is_noise(record)


def quiet_logs() -> None:
    """Hides :func:`is_noise`'s records from the absl log unless ``--verbosity`` is 1 or more.

    Call it after the flags are parsed, before JAX first touches a device (the backend probe is
    logged then). Idempotent.
    """
    handler = logging.get_absl_handler()
    verbose = flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].value >= 1
    if verbose:
        handler.removeFilter(_keep)
    elif _keep not in handler.filters:
        handler.addFilter(_keep)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, except that ``--help`` (and ``-h``, ``--helpshort``) prints the
    command's docstring and flags and exits 0, ``--helpfull`` every module's flags; then
    :func:`quiet_logs`."""
    given = set(argv[1:])
    if given & (HELP_FLAGS | FULL_HELP_FLAGS):
        app.usage(shorthelp=not given & FULL_HELP_FLAGS, writeto_stdout=True, exitcode=0)
    remaining = app.parse_flags_with_usage(argv)
    quiet_logs()
    return remaining


def run(main: Callable[[list[str]], Any]) -> None:
    """``app.run(main)`` with :func:`parse_flags`: what ``if __name__ == "__main__":`` calls."""
    app.run(main, flags_parser=parse_flags)
