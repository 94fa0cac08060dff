"""``python -m nativetok_jax.sample --workdir GEN_DIR --out DIR``: images from a trained generator.

Loads the generator's newest checkpoint (EMA weights when kept) and the tokenizer its config
names, samples class-conditional token ids with the config's settings (``generator.sample``;
each can be overridden by a flag), decodes them with the tokenizer and writes
``DIR/sample_00000.png ...``, ``DIR/grid.png`` and ``DIR/ids.npz`` (ids, labels and the image
size, which ``evaluate --samples`` checks). The
samples are seeded: the same command writes the same images.
"""

from __future__ import annotations

import os
import sys
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from nativetok_jax.config import ConfigError, validate_sampling  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a program (the functions stay importable)."""
    flags.DEFINE_string("workdir", None, "A generator's training directory.")
    flags.DEFINE_string("out", None, "Directory for the PNGs and ids.npz.")
    flags.DEFINE_integer("num_samples", None, "How many images (default: the config's).")
    flags.DEFINE_string("labels", None, "Comma-separated class ids, cycled (default: 0, 1, 2, ... cycling the classes).")
    flags.DEFINE_integer("seed", None, "Sampling seed (default: the config's).")
    flags.DEFINE_integer("batch_size", 64, "Images sampled per call.")
    flags.DEFINE_float("temperature", None, "Softmax temperature (0: greedy decoding).")
    flags.DEFINE_integer("top_k", None, "Keep the k most likely ids (0: all).")
    flags.DEFINE_float("top_p", None, "Nucleus sampling mass (1: off).")
    flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance: uncond + scale * (cond - uncond).")
    flags.DEFINE_integer("num_steps", None, "MaskGIT decoding steps.")
    flags.DEFINE_float("choice_temperature", None, "MaskGIT: scale of the Gumbel noise on the confidences.")
    flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the run kept them.")
    flags.mark_flags_as_required(["workdir", "out"])


SETTINGS = ("temperature", "top_k", "top_p", "guidance_scale", "num_steps", "choice_temperature", "seed",
            "num_samples")
MASKGIT_ONLY = ("num_steps", "choice_temperature")


def sampling_settings(generator: ml_collections.ConfigDict, overrides: dict[str, Any], *,
                      vocab_size: int) -> ml_collections.ConfigDict:
    """``generator.sample`` with the flags' overrides, validated as a whole (``validate_sampling``):
    a bad value is a ``ConfigError`` naming the flag that set it, or the config field. A flag the
    generator's kind does not use (``--num_steps`` for an autoregressive one) is an error too."""
    settings = ml_collections.ConfigDict(generator.sample.to_dict())
    names = {}
    for name in SETTINGS:
        if overrides.get(name) is None:
            continue
        if name in MASKGIT_ONLY and generator.kind != "maskgit":
            raise ConfigError(f"--{name}: only MaskGIT generators use it; this one is {generator.kind!r}")
        settings[name] = overrides[name]
        names[name] = f"--{name}"
    validate_sampling(settings, generator.kind, vocab_size=vocab_size, names=names)
    return settings


def sample_images(workdir: str | os.PathLike, out: str | os.PathLike, **overrides) -> np.ndarray:
    """Writes the samples into ``out`` (local or a URL); returns them as uint8 ``[N, H, W, 3]``."""
    from nativetok_jax import checkpoints
    from nativetok_jax.data.sources import SAMPLE_FILE, SAMPLE_IDS_FILE
    from nativetok_jax.generation.pretrained import TrainedGenerator
    from nativetok_jax.workdir import check_loadable

    config = checkpoints.read_config(workdir)
    g = config.generator
    tokenizer_config = checkpoints.read_config(checkpoints.final_stage_directory(g.tokenizer))
    settings = sampling_settings(g, overrides, vocab_size=tokenizer_config.model.quantizer.codebook_size)
    batch_size = 64 if overrides.get("batch_size") is None else overrides["batch_size"]
    if batch_size < 1:
        raise ConfigError(f"--batch_size: must be a positive integer, got {batch_size}")
    check_loadable(g.tokenizer)
    check_loadable(workdir)
    generator = TrainedGenerator.from_checkpoint(workdir, use_ema=overrides.get("use_ema", True))
    tokenizer, num_classes = generator.tokenizer, generator.num_classes
    wanted = overrides.get("labels")
    if wanted:
        labels = np.resize(np.asarray(wanted, np.int32), settings.num_samples)
    else:
        labels = (np.arange(settings.num_samples) % num_classes).astype(np.int32)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    ids = []
    for start in range(0, len(labels), batch_size):
        chunk = labels[start : start + batch_size]
        padded = np.resize(chunk, batch_size) if len(labels) > batch_size else chunk
        key = jax.random.fold_in(jax.random.key(settings.seed), start)
        ids.append(np.asarray(generator.sample_ids(padded, key, settings))[: len(chunk)])
    ids = np.concatenate(ids)
    images = np.concatenate([np.asarray(tokenizer.decode(ids[i : i + batch_size])) for i in range(0, len(ids), batch_size)])
    if jax.process_index() == 0:
        from nativetok_jax import storage
        from nativetok_jax.evaluation.grids import save_grid, save_png

        directory = storage.path(out)
        for i, image in enumerate(images):
            save_png(directory / SAMPLE_FILE.format(index=i), image)
        storage.write_npz(directory / SAMPLE_IDS_FILE, ids=ids, labels=labels, image_size=tokenizer.image_size)
        columns = int(np.ceil(np.sqrt(len(images))))
        save_grid(directory / "grid.png", [images[i : i + columns] for i in range(0, len(images), columns)],
                  upscale=max(1, 96 // tokenizer.image_size))
    logging.info("wrote %d samples of %s (step %d) to %s", len(images), workdir, generator.step, out)
    return images


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    labels = [int(x) for x in FLAGS.labels.split(",")] if FLAGS.labels else None
    from nativetok_jax.training.guards import ends_preempted_runs

    try:
        with ends_preempted_runs():
            images = sample_images(
                FLAGS.workdir, FLAGS.out, num_samples=FLAGS.num_samples, labels=labels, seed=FLAGS.seed,
                batch_size=FLAGS.batch_size, temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                guidance_scale=FLAGS.guidance_scale, num_steps=FLAGS.num_steps,
                choice_temperature=FLAGS.choice_temperature, use_ema=FLAGS.use_ema)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {str(error).splitlines()[0]}")
    print(f"wrote {len(images)} samples to {FLAGS.out} (grid.png, sample_*.png, ids.npz)")


if __name__ == "__main__":
    define_flags()
    app.run(main)
