"""``python -m nativetok_jax.main --config configs/demo.py --workdir DIR``.

Today this runs the tokenizer round trip on the held-out photographs bundled with scikit-image:
it builds the tokenizer the config describes (freshly initialised: training is the next
milestone), encodes the photographs, decodes them from the first 1, 4, 16, ... tokens, and writes
into ``DIR``: ``config.json`` (the resolved config), ``roundtrip.png`` (inputs, then one row per
prefix length) and ``roundtrip.json`` (token ids and PSNR per prefix length).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from nativetok_jax.config import ConfigError
from nativetok_jax.data.photos import load_photos
from nativetok_jax.data.images import center_crop
from nativetok_jax.evaluation.grids import save_grid
from nativetok_jax.evaluation.metrics import psnr
from nativetok_jax.tokenizer import Tokenizer, preview_lengths

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py[:arg].", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for this run's outputs.")
flags.DEFINE_integer("seed", 0, "Seed of the parameter initialisation.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def round_trip(config, workdir: str, seed: int) -> dict:
    """Encodes and decodes the held-out photographs; writes the grid and the JSON summary."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    tokenizer = Tokenizer.from_config(config, seed=seed)
    images = np.stack([center_crop(photo, tokenizer.image_size) for photo in load_photos("heldout")])
    ids = tokenizer.encode(images)
    rows, summary = [images], {"num_tokens": tokenizer.num_tokens, "ids": np.asarray(ids).tolist(), "psnr": {}}
    for k in preview_lengths(tokenizer.num_tokens):
        reconstruction = np.asarray(tokenizer.decode(ids[:, :k]))
        rows.append(reconstruction)
        summary["psnr"][str(k)] = psnr(images, reconstruction)
        logging.info("first %3d tokens: PSNR %.2f dB", k, summary["psnr"][str(k)])
    save_grid(os.path.join(workdir, "roundtrip.png"), rows, upscale=max(1, 128 // tokenizer.image_size))
    with open(os.path.join(workdir, "roundtrip.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        summary = round_trip(FLAGS.config, FLAGS.workdir, FLAGS.seed)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"round trip of {len(summary['ids'])} held-out photographs through {summary['num_tokens']} tokens; "
          f"wrote {FLAGS.workdir}/roundtrip.png and roundtrip.json")


if __name__ == "__main__":
    app.run(main)
