"""What every command line shares: its error boundary and a config flag that fails in one line.

:func:`boundary` is the one error boundary of an entry point: a preempted or interrupted run ends
with the ``stopped: ...; run the same command to resume`` line (``guards.ends_preempted_runs``),
the project's own errors (:class:`~nativetok_jax.errors.UserError`: config fields, flags, files,
run directories, data) with one ``error: ...`` line, and anything else, a bug, keeps its
traceback.

:func:`config_flags_parser` is the ``flags_parser`` of the commands that take ``--config FILE[:ARG]``
(``app.run(main, flags_parser=config_flags_parser)``): a config file that refuses its argument, a
missing required argument, or an override of a field that does not exist
(``--config.train.num_step=10``) is one line naming the field and the closest existing names,
where ml_collections prints a traceback of 45 lines.

Both parsers answer ``--help`` (and ``-h``, ``--helpshort``) with the command's docstring and flags
and exit 0 (absl's own exits 1), and make the logs quiet: the lines a user would otherwise read
past are dropped from the absl log unless ``--verbosity=1`` (or ``-v 1``) or more asks for them:

- JAX's backend probe (``Unable to initialize backend 'tpu': ... Failed to open libtpu.so``, an
  INFO line of ``jax/_src/xla_bridge.py`` on every machine without a TPU);
- orbax's INFO and WARNING lines (about 50 for one checkpoint restore); orbax's errors stay,
  except those of a save that ran out of space (each of its threads logs the traceback; the
  command says it in one line instead, :class:`~nativetok_jax.checkpoints.NoSpaceError`).

The project's own INFO lines (progress, held-out metrics, where files went) are kept.
"""

from __future__ import annotations

import contextlib
import difflib
import logging as std_logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
from absl import app, flags, logging

from nativetok_jax import checkpoints
from nativetok_jax.config import load_config_file
from nativetok_jax.errors import UserError, first_line, one_line_errors
from nativetok_jax.training.guards import ends_preempted_runs


@contextlib.contextmanager
def boundary() -> Iterator[None]:
    """The error boundary of an entry point's work (see the module docstring)."""
    with ends_preempted_runs(), one_line_errors():
        yield


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

    Called by the flag parsers, after the flags are parsed and before JAX first touches a device
    (the backend probe is logged then). Idempotent.
    """
    handler = logging.get_absl_handler()
    verbose = flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].value >= 1
    if verbose:
        handler.removeFilter(_keep)
    elif _keep not in handler.filters:
        handler.addFilter(_keep)


def own_flags_parser(flag_values: flags.FlagValues, module_name: str) -> Callable[[list[str]], list[str]]:
    """The ``flags_parser`` of a command whose flags live in their own ``flag_values`` (so that
    several entry points import into one process): its flags, then absl's own (``--verbosity``)
    from what is left; ``--help`` prints the module's docstring and flags; a bad or missing flag
    is one ``error:`` line."""

    def parse(argv: list[str]) -> list[str]:
        if any(arg in HELP_FLAGS for arg in argv[1:]):
            module = sys.modules[module_name]
            print(f"{module.__doc__}\nflags:\n{flag_values.module_help(module)}")
            sys.exit(0)
        try:
            remaining = flags.FLAGS(flag_values(argv, known_only=True))
        except flags.Error as error:  # several missing flags come as several lines
            sys.exit(f"error: {'; '.join(str(error).splitlines())}")
        quiet_logs()
        return remaining

    return parse


def config_flags_parser(argv: Sequence[str], flag_name: str = "config") -> list[str]:
    """Parses absl's global flags; a bad ``--config`` (file, argument or field) exits with one line.

    Any other parse failure keeps absl's own report. ``--help`` prints the command's docstring and
    flags and exits 0 (``--helpfull``: every module's flags)."""
    given = set(argv[1:])
    if given & (HELP_FLAGS | FULL_HELP_FLAGS):
        app.usage(shorthelp=not given & FULL_HELP_FLAGS, writeto_stdout=True, exitcode=0)
    try:
        remaining = flags.FLAGS(list(argv))
    except Exception as error:  # noqa: BLE001 - re-raised below unless the config flag explains it
        problem = config_flag_problem(argv, flag_name, error)
        if problem is None:
            raise
        sys.exit(f"error: {problem}")
    quiet_logs()
    return remaining


def run(main: Callable[[list[str]], Any], flags_parser: Callable[[list[str]], list[str]] = config_flags_parser) -> None:
    """``app.run(main)`` with the project's flag parser: what ``if __name__ == "__main__":`` calls."""
    app.run(main, flags_parser=flags_parser)


def _flag_values(argv: Sequence[str], name: str) -> tuple[str | None, list[tuple[str, str]]]:
    """``(the --NAME file spec, [(dotted field path, the argument as given), ...])`` in ``argv``."""
    spec, overrides = None, []
    args = list(argv[1:])
    for i, arg in enumerate(args):
        if arg in (f"--{name}", f"-{name}") and i + 1 < len(args):
            spec = args[i + 1]
        elif arg.startswith((f"--{name}=", f"-{name}=")):
            spec = arg.split("=", 1)[1]
        elif arg.startswith((f"--{name}.", f"-{name}.")):
            path = arg.split(".", 1)[1].split("=", 1)[0]
            overrides.append((path, arg))
    return spec, overrides


def config_flag_problem(argv: Sequence[str], name: str, error: BaseException) -> str | None:
    """One line saying what is wrong with the config flag of ``argv``, or None when the config flag
    is not what failed. ``error`` is the parse failure; the config is loaded again to find out."""
    spec, overrides = _flag_values(argv, name)
    if spec is None:
        return None
    try:
        config = load_config_file(spec)
    except UserError as problem:
        return first_line(problem)  # it names the file and its argument
    for path, arg in overrides:
        missing = missing_field(config, path)
        if missing:
            return f"{arg.split('=', 1)[0]}: {missing}"
    return None


def missing_field(config: ml_collections.ConfigDict, path: str) -> str | None:
    """``"config.train has no field 'num_step'; did you mean 'num_steps'?"`` when the dotted
    ``path`` names no field of ``config``, else None."""
    node, walked = config, "config"
    for part in path.split("."):
        if isinstance(node, (ml_collections.ConfigDict, dict)):
            keys = list(node.keys())
            if part not in keys:
                close = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else \
                    f"; its fields: {', '.join(sorted(keys))}"
                return f"{walked} has no field {part!r}{hint}"
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit():
            if int(part) >= len(node):
                return f"{walked} has {len(node)} entries, not {int(part) + 1}"
            node = node[int(part)]
        else:
            return f"{walked} is a {type(node).__name__}, it has no field {part!r}"
        walked = f"{walked}.{part}"
    return None


