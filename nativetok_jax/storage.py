"""Files through ``etils.epath``: every path the project reads or writes may be local or a URL.

Runs on TPU pods write their workdir to ``gs://`` (any scheme epath knows works the same way:
``s3://``, ``az://``, and whatever a test registers). Local paths are made absolute, so the logs
and orbax see where a run writes; URLs are kept as they are (``os.path.abspath("gs://b/run")``
would name a local directory ``gs:``). Writes are whole: a local file is written beside its
target and renamed over it, so a killed process never leaves half a file; an object store's
objects appear whole on their own.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from typing import Any

import numpy as np
from etils import epath

from nativetok_jax.errors import UserError, first_line

PathLike = str | os.PathLike
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_local(path: PathLike) -> bool:
    """Whether ``path`` is on this machine's file system (not a ``scheme://`` URL)."""
    return not _URL.match(os.fspath(path))


def path(path: PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: absolute when local, the URL unchanged otherwise."""
    resolved = epath.Path(path)
    return resolved.absolute() if is_local(path) else resolved


def canonical(path: PathLike) -> str:
    """A name of ``path`` that is the same from every host and working directory, for a record
    (a store's description): a local path absolute with its links resolved, a URL unchanged."""
    return os.path.realpath(path) if is_local(path) else os.fspath(path)


class OutputError(UserError, OSError):
    """An output the command was told to write cannot be written there."""


def check_writable(target: PathLike, flag: str, *, directory: bool = False) -> epath.Path:
    """Makes sure, before any work, that the command can write ``target`` (a file, or a directory
    where ``directory``): its parents are created and an empty probe file written beside (or in)
    it and removed, so an unwritable place fails in seconds rather than after the evaluation or
    the benchmark it was to hold. Returns ``target`` as :func:`path` gives it.

    Raises:
      OutputError: one line naming ``flag`` and ``target``: a directory where a file is wanted (or a
        file where a directory is), or the operating system's reason (no permission, a parent that
        is a file, a read-only file system, a bucket that refuses the write).
    """
    resolved = path(target)
    if not directory and resolved.is_dir():
        raise OutputError(f"{flag}: {resolved} is a directory; name the file to write")
    if directory and resolved.exists() and not resolved.is_dir():
        raise OutputError(f"{flag}: {resolved} is a file; name a directory to write into")
    folder = resolved if directory else resolved.parent
    if is_local(folder):  # a file on the way names itself (mkdir would only say "File exists")
        ancestor = folder
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise OutputError(f"{flag}: cannot write {resolved}: {ancestor} is a file, not a directory")
    probe = folder / f".{resolved.name or 'out'}.probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or first_line(error)
        raise OutputError(f"{flag}: cannot write {resolved}: {reason}") from error
    return resolved


def write_bytes(target: PathLike, data: bytes) -> None:
    """Writes ``data`` to ``target`` whole, creating its parent directories."""
    target = path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not is_local(target):
        target.write_bytes(data)
        return
    temporary = target.parent / f".{target.name}.tmp-{os.getpid()}"
    temporary.write_bytes(data)
    os.replace(temporary, target)


def write_text(target: PathLike, text: str) -> None:
    write_bytes(target, text.encode())


def write_json(target: PathLike, value: Any) -> None:
    """``value`` as indented JSON in ``target`` (written whole, parents created)."""
    write_text(target, json.dumps(value, indent=2))


def read_json(source: PathLike) -> Any:
    return json.loads(path(source).read_text())


def write_npz(target: PathLike, **arrays: Any) -> None:
    """An uncompressed ``.npz`` of ``arrays`` at exactly ``target`` (no ``.npz`` appended)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(target, buffer.getvalue())


def sha256(source: PathLike, chunk_bytes: int = 1 << 22) -> str:
    """The hex SHA-256 of the file at ``source`` (local or a URL), read in chunks: what identifies
    a weights file's content, where its path does not (a re-conversion writes the same path)."""
    digest = hashlib.sha256()
    with path(source).open("rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
