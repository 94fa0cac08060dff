"""``python -m nativetok_jax.sample --workdir GEN_DIR --out DIR``: images from a trained generator.

Loads the generator's newest checkpoint (EMA weights when kept) and the tokenizer its config
names, samples class-conditional token ids with the config's settings (``generator.sample``;
each can be overridden by a flag), decodes them with the tokenizer and writes
``DIR/sample_00000.png ...``, ``DIR/grid.png`` and ``DIR/ids.npz`` (ids and labels). The
samples are seeded: the same command writes the same images.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from PIL import Image  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a program (the functions stay importable)."""
    flags.DEFINE_string("workdir", None, "A generator's training directory.")
    flags.DEFINE_string("out", None, "Directory for the PNGs and ids.npz.")
    flags.DEFINE_integer("num_samples", None, "How many images (default: the config's).")
    flags.DEFINE_string("labels", None, "Comma-separated class ids, cycled (default: 0, 1, 2, ... cycling the classes).")
    flags.DEFINE_integer("seed", None, "Sampling seed (default: the config's).")
    flags.DEFINE_integer("batch_size", 64, "Images sampled per call.")
    flags.DEFINE_float("temperature", None, "Softmax temperature.")
    flags.DEFINE_integer("top_k", None, "Keep the k most likely ids (0: all).")
    flags.DEFINE_float("top_p", None, "Nucleus sampling mass (AR only; 1: off).")
    flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance: uncond + scale * (cond - uncond).")
    flags.DEFINE_integer("num_steps", None, "MaskGIT decoding steps.")
    flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the run kept them.")
    flags.mark_flags_as_required(["workdir", "out"])


def sample_images(workdir: str, out: str, **overrides) -> np.ndarray:
    """Writes the samples into ``out``; returns them as uint8 ``[N, H, W, 3]``."""
    from nativetok_jax.generation.pretrained import TrainedGenerator

    generator = TrainedGenerator.from_checkpoint(workdir, use_ema=overrides.get("use_ema", True))
    tokenizer, num_classes = generator.tokenizer, generator.num_classes
    settings = generator.config.generator.sample
    for name in ("temperature", "top_k", "top_p", "guidance_scale", "num_steps", "seed", "num_samples"):
        if overrides.get(name) is not None:
            settings[name] = overrides[name]
    wanted = overrides.get("labels")
    if wanted:
        labels = np.resize(np.asarray(wanted, np.int32), settings.num_samples)
    else:
        labels = (np.arange(settings.num_samples) % num_classes).astype(np.int32)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    batch_size = overrides.get("batch_size") or 64
    ids = []
    for start in range(0, len(labels), batch_size):
        chunk = labels[start : start + batch_size]
        padded = np.resize(chunk, batch_size) if len(labels) > batch_size else chunk
        key = jax.random.fold_in(jax.random.key(settings.seed), start)
        ids.append(np.asarray(generator.sample_ids(padded, key, settings))[: len(chunk)])
    ids = np.concatenate(ids)
    images = np.concatenate([np.asarray(tokenizer.decode(ids[i : i + batch_size])) for i in range(0, len(ids), batch_size)])
    if jax.process_index() == 0:
        from nativetok_jax.evaluation.grids import save_grid

        os.makedirs(out, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(os.path.join(out, f"sample_{i:05d}.png"))
        np.savez(os.path.join(out, "ids.npz"), ids=ids, labels=labels)
        columns = int(np.ceil(np.sqrt(len(images))))
        save_grid(os.path.join(out, "grid.png"), [images[i : i + columns] for i in range(0, len(images), columns)],
                  upscale=max(1, 96 // tokenizer.image_size))
    logging.info("wrote %d samples of %s (step %d) to %s", len(images), workdir, generator.step, out)
    return images


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    labels = [int(x) for x in FLAGS.labels.split(",")] if FLAGS.labels else None
    try:
        images = sample_images(
            FLAGS.workdir, FLAGS.out, num_samples=FLAGS.num_samples, labels=labels, seed=FLAGS.seed,
            batch_size=FLAGS.batch_size, temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
            guidance_scale=FLAGS.guidance_scale, num_steps=FLAGS.num_steps, use_ema=FLAGS.use_ema)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {str(error).splitlines()[0]}")
    print(f"wrote {len(images)} samples to {FLAGS.out} (grid.png, sample_*.png, ids.npz)")


if __name__ == "__main__":
    define_flags()
    app.run(main)
