"""Exports a training run of any kind to a pretrained-model directory
(``pretrained/directory.py``: config JSON + safetensors)::

    python -m nativetok_jax.pretrained.export --workdir workdirs/demo --out exported/demo
"""

from __future__ import annotations

import argparse
import sys

from nativetok_jax import checkpoints, storage, tasks
from nativetok_jax.errors import UserError, first_line
from nativetok_jax.workdir import require_task

# config.task of a training run -> the kind of model it exports (``tasks.Task.export_kind``).
TASK_KINDS = {name: task.export_kind for name, task in tasks.TASKS.items()}


def export_run(workdir: str, out: str, *, use_ema: bool = True) -> str:
    """Exports the newest checkpoint of a training workdir of any kind (tokenizer, HNT tokenizer,
    generator, DiT, DVAE, D²iT) to ``out``; returns the kind written (``tasks.Task.export_kind``:
    ``pretrained.directory.KINDS``).

    Raises ``checkpoints.RunDirectoryError`` for a directory without a run or a checkpoint (one
    line), and the loaders' errors (``WeightsError``, ``ConfigError``) for what they cannot load."""
    config = require_task(workdir, "export", tuple(tasks.TASKS))
    checkpoints.final_stage_directory(workdir)  # a run without a checkpoint is one line, before any loading
    storage.check_writable(out, "--out", directory=True)  # before the checkpoint is read
    task = tasks.of(config)
    task.load("export").from_checkpoint(workdir, use_ema=use_ema).save_pretrained(out)
    return task.export_kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nativetok_jax.pretrained.export",
                                     description="Export a training run's newest checkpoint as config.json + "
                                                 "model.safetensors.")
    parser.add_argument("--workdir", required=True, help="a training workdir of any kind: tokenizer (HNT too), "
                        "generator, DiT, DVAE, D²iT")
    parser.add_argument("--out", required=True, help="the directory to write")
    parser.add_argument("--no_ema", action="store_true", help="the raw weights instead of the EMA ones")
    args = parser.parse_args(argv)
    try:
        kind = export_run(args.workdir, args.out, use_ema=not args.no_ema)
    except UserError as error:  # the project's own errors are one line; anything else is a bug
        print(f"error: {first_line(error)}", file=sys.stderr)
        return 1
    print(f"exported the {kind} of {args.workdir} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
