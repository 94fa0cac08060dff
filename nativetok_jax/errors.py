"""The project's own error family, and the boundary every command line puts around its work.

A :class:`UserError` is a problem in what the user gave (a config field, a flag, a file, a folder,
a run directory of another kind, the data) and its message names that input in one line. Every
entry point prints such an error as one line, ``error: <message>``, and exits with status 1
(:func:`one_line_errors`); any other exception is a bug and keeps its traceback. Each part of the
package defines its kind of user error as a subclass (``config.ConfigError``,
``data.sources.DataError``, ``pretrained.files.WeightsError``, ``checkpoints.RunDirectoryError``,
``workdir.WrongRunError``, ...), most of them also ``ValueError`` or ``FileNotFoundError`` so that
older ``except`` clauses keep working.

This module is the core: it imports nothing of the package.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class UserError(Exception):
    """Bad input the user can fix; the message names it (a field, a flag, a file) in one line."""


def first_line(error: BaseException) -> str:
    """The error's message up to its first line break (a message never needs more)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Exits with ``error: <first line>`` (status 1) for a :class:`UserError`; anything else
    propagates with its traceback. The error's cause (``raise ... from``) stays on the exception
    for code that catches it; the command line shows only the line."""
    try:
        yield
    except UserError as error:
        sys.exit(f"error: {first_line(error)}")
