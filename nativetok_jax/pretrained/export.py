"""Exports a training run of any kind to a pretrained-model directory
(``pretrained/directory.py``: config JSON + safetensors)::

    python -m nativetok_jax.pretrained.export --workdir workdirs/demo --out exported/demo
"""

from __future__ import annotations

import argparse
import sys

from nativetok_jax import checkpoints
from nativetok_jax.dvae import DVAE
from nativetok_jax.errors import UserError, first_line
from nativetok_jax.generation.diffusion_models import TrainedD2iT, TrainedDiT
from nativetok_jax.generation.pretrained import TrainedGenerator
from nativetok_jax.pretrained.directory import TASK_KINDS
from nativetok_jax.tokenizer import Tokenizer
from nativetok_jax.workdir import require_task


def export_run(workdir: str, out: str, *, use_ema: bool = True) -> str:
    """Exports the newest checkpoint of a training workdir of any kind (tokenizer, HNT tokenizer,
    generator, DiT, DVAE, D²iT) to ``out``; returns the kind written (:data:`KINDS`).

    Raises ``checkpoints.RunDirectoryError`` for a directory without a run or a checkpoint (one
    line), and the loaders' errors (``WeightsError``, ``ConfigError``) for what they cannot load."""
    config = require_task(workdir, "export", tuple(TASK_KINDS))
    checkpoints.final_stage_directory(workdir)  # a run without a checkpoint is one line, before any loading
    kind = TASK_KINDS[config.get("task", "tokenizer")]
    model_class = {"tokenizer": Tokenizer, "generator": TrainedGenerator, "dvae": DVAE, "dit": TrainedDiT,
                   "d2it": TrainedD2iT}[kind]
    model_class.from_checkpoint(workdir, use_ema=use_ema).save_pretrained(out)
    return kind


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
