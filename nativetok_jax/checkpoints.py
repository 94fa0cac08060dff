"""Checkpoints through one orbax ``CheckpointManager`` per training stage.

A checkpoint holds two items: ``state`` (step, parameters, EMA, optimiser state; sharded arrays)
and ``data`` (the grain iterator's position), so a restarted run continues with the very batch
it would have seen. Saves are atomic (orbax writes a temporary directory and renames it), keep
the newest ``keep`` steps, and leftovers of a save killed half-way are cleaned up at start.
:func:`load_params` reads just the parameters (or their EMA), for the next HNT stage and for
``Tokenizer.from_checkpoint``.
"""

from __future__ import annotations

import contextlib
import errno
import json
from collections.abc import Callable
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from nativetok_jax import storage
from nativetok_jax.config import config_from_dict
from nativetok_jax.errors import UserError

CONFIG_FILE = "config.json"


class RunDirectoryError(UserError, FileNotFoundError):
    """A path given as a training run's directory holds no run (no ``config.json``) or no checkpoint."""

# orbax splits the writing of a replicated array across its replicas, which costs one small XLA
# compile per array shape and device at the first save (8 s for the tiny test model on 8 CPU
# devices); only arrays whose slices are at least this large are worth it.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
    """orbax's standard handlers, with replica-parallel saving kept for large arrays only."""
    handlers = [(ty, ocp.type_handlers.get_type_handler(ty)) for ty in ocp.type_handlers.supported_types()
                if ty is not jax.Array]
    arrays = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)
    return ocp.type_handlers.create_type_handler_registry(*handlers, (jax.Array, arrays))


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    state = ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers())
    return {"state": state, "data": grain.checkpoint.CheckpointHandler()}


class NoSpaceError(UserError, OSError):
    """A checkpoint save ran out of space on the device; the message names the directory and the
    newest intact checkpoint (a rerun resumes from it)."""


def is_no_space(error: BaseException) -> bool:
    """Whether ``error``, or an exception it was raised from or during (exception groups
    included), is "no space left on device" (``ENOSPC``; tensorstore reports it in its message)."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(current):
            return True
        pending += [current.__cause__, current.__context__, *getattr(current, "exceptions", ())]
    return False


class Checkpoints:
    """Save, find and restore the checkpoints of one stage directory (local, or a URL such as
    ``gs://bucket/run/checkpoints``, which orbax writes to directly)."""

    def __init__(self, directory: storage.PathLike, keep: int):
        self.directory = storage.path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())
        self._closed = False

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator) -> None:
        """Saves checkpoint ``step`` whole (orbax's temporary directory renamed when complete).

        Raises:
          NoSpaceError: the device filled up during the save (one line: the directory, the newest
            intact checkpoint, what to do); the half-written checkpoint is removed and the manager
            closed, so no thread of it writes on at exit.
        """
        intact = self._manager.latest_step()
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
                ),
                force=True,
            )
            self._manager.wait_until_finished()
        except Exception as error:
            if not is_no_space(error):
                raise
            self._abandon(step)
            kept = f"checkpoint {intact} is intact" if intact is not None else "no earlier checkpoint was saved"
            raise NoSpaceError(f"no space left on {self.directory} while saving checkpoint {step}; {kept}; "
                               "free space and rerun to resume") from None

    def _abandon(self, step: int) -> None:
        """After a failed save: closes the manager (errors of its threads suppressed) and removes
        what the save left, to give back the space it took."""
        with contextlib.suppress(Exception):
            self._manager.close()
        self._closed = True
        for leftover in self.directory.glob(f"{step}*"):
            if leftover.name == str(step) or ".orbax-checkpoint-tmp" in leftover.name:
                with contextlib.suppress(Exception):
                    leftover.rmtree() if leftover.is_dir() else leftover.unlink()

    def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator) -> Any:
        """The state saved at ``step`` placed like ``abstract_state``; moves ``data_iterator`` too."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)
                ),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
            ),
        )
        return restored["state"]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._manager.close()


def checkpoint_directory(stage_directory: storage.PathLike) -> epath.Path:
    return storage.path(stage_directory) / "checkpoints"


def latest_step(stage_directory: storage.PathLike) -> int | None:
    """The newest finished checkpoint's step in a stage directory (orbax's finished checkpoints are
    the directories named by their step; unfinished ones carry a temporary suffix), or ``None``."""
    directory = checkpoint_directory(stage_directory)
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []
    return max(steps, default=None)


def write_config(directory: storage.PathLike, config: ml_collections.ConfigDict) -> None:
    """Writes the resolved config beside the checkpoints (what ``read_config`` rebuilds). Trainers
    call ``workdir.write_config``, which first refuses to replace the config of a run whose
    checkpoints hold parameters of other shapes."""
    storage.write_text(storage.path(directory) / CONFIG_FILE, config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(directory: storage.PathLike) -> ml_collections.ConfigDict:
    path = storage.path(directory) / CONFIG_FILE
    if not path.is_file():
        raise RunDirectoryError(f"no {CONFIG_FILE} in {str(directory)!r}: not a training run's directory")
    return config_from_dict(json.loads(path.read_text()))  # runs written before a field existed get its default


def final_stage_directory(path: storage.PathLike) -> epath.Path:
    """``path`` itself if it holds checkpoints, else its last training stage that holds a finished
    one: a stage that has just started has an empty ``checkpoints/`` until its first save, and
    until then the run's newest model is the previous stage's."""
    directory = storage.path(path)
    if checkpoint_directory(directory).is_dir():
        return directory
    config = read_config(directory)
    stages = [s["name"] for s in (config.get("hnt", {}) or {}).get("stages", ()) or ()]
    finished = [directory / name for name in stages if latest_step(directory / name) is not None]
    if not finished:
        raise RunDirectoryError(f"no finished checkpoint under {str(path)!r} or its training stages")
    return finished[-1]


# Where a restored parameter goes: (its path, string keys; its stored shape) -> its sharding.
Placement = Callable[[tuple[str, ...], tuple[int, ...]], jax.sharding.Sharding]


def load_params(stage_directory: storage.PathLike, use_ema: bool = True, step: int | None = None, *,
                placement: Placement | None = None) -> tuple[dict, int]:
    """The parameters in a stage directory's newest checkpoint (or its ``step``).

    Returns ``(params, step)``; the EMA weights when the run kept them and ``use_ema``. With
    ``placement`` (e.g. :func:`nativetok_jax.sharding.restore_placement`) every parameter is
    restored straight into its sharding, each host reading only the shards its devices hold (a
    model too large for one host's memory loads on a pod); without, as whole host numpy arrays
    (small models, tools). Only the parameters are read, never the optimiser state.
    """
    directory = checkpoint_directory(stage_directory)
    if not directory.is_dir():
        raise RunDirectoryError(f"no checkpoints under {str(stage_directory)!r} (expected {str(directory)!r})")
    with ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers=_handlers(),
    ) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise RunDirectoryError(f"no finished checkpoint in {str(directory)!r}")
        metadata = manager.item_metadata(step)["state"]
        key = "ema" if use_ema and "ema" in metadata and metadata["ema"] else "params"
        wanted = {key: metadata[key]}
        if placement is None:
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        else:
            restore_args = jax.tree_util.tree_map_with_path(
                lambda path, leaf: ocp.ArrayRestoreArgs(
                    sharding=placement(tuple(str(getattr(k, "key", k)) for k in path[1:]), tuple(leaf.shape)),
                    global_shape=tuple(leaf.shape), dtype=leaf.dtype), wanted)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True)
            ),
        )
    return restored["state"][key], step


def save_params(stage_directory: storage.PathLike, params: Any, step: int = 0) -> None:
    """Writes ``params`` (a nested dict of arrays) as the finished checkpoint ``step`` of a stage
    directory, with no optimiser state and no data position: what :func:`load_params` (and so
    ``sample``, ``evaluate`` and ``Tokenizer.from_checkpoint``) reads. Converted public weights
    become a run directory this way (``python -m nativetok_jax.convert dit|titok``)."""
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(checkpoint_directory(stage_directory), options=options,
                               item_handlers={"state": _handlers()["state"]}) as manager:
        state = {"step": np.asarray(step, np.int64), "params": params}
        manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)), force=True)
        manager.wait_until_finished()
