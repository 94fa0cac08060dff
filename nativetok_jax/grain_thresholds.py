"""``python -m nativetok_jax.grain_thresholds --config configs/dvae_demo.py --out thresholds.json``.

D²iT routes a region to the fine grain iff its entropy exceeds a percentile of the entropies of
all training regions (docs/d2it.md; [A] DQ-VAE's ``calculate_entropy_thresholds.py``). This streams
``--num_images`` training crops, exactly as training draws them (``config.data``'s source, crop
range and flips at ``model.image_size``, seeded by ``train.seed``), through the entropy of
:mod:`nativetok_jax.models.d2it.grain_router` with the config's settings (region side = the coarse factor,
``model.grain.num_bins``, ``sigma``, ``low``, ``high``) and writes a JSON file with the
percentiles 1..99, the entropy settings, the data description and the number of regions. Point
``model.grain.thresholds`` at it; ``model.grain.fine_ratio`` r then picks the ``100 (1 - r)``-th
percentile, and a file measured with other entropy settings is refused. Paths may be ``gs://``.
Run it on one process.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # else TF prints a notice on import; it computes nothing here

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from nativetok_jax.command import boundary
from nativetok_jax import storage, workdir
from nativetok_jax.config import ConfigError, validate_crops, validate_data_source  # noqa: E402
from nativetok_jax.data import pipeline, sources
from nativetok_jax.models.d2it import grain_router
from nativetok_jax.models.d2it.dvae import DVAEConfig, validate_dvae_model

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a program (the functions stay importable)."""
    config_flags.DEFINE_config_file("config", None, "A DVAE config, e.g. configs/dvae_demo.py.", lock_config=True)
    flags.DEFINE_string("out", None, "The thresholds JSON to write (local or gs://).")
    flags.DEFINE_integer("num_images", 10_000, "Training crops to measure.")
    flags.DEFINE_integer("batch_size", 64, "Crops per entropy batch.")
    flags.mark_flags_as_required(["config", "out"])


def data_description(config: ml_collections.ConfigDict, num_images: int) -> dict[str, Any]:
    """What the thresholds were measured on, stored in the file beside them."""
    data = config.data
    description = dict(source=data.source, image_size=config.model.image_size, crop_min=data.crop_min,
                       crop_max=data.crop_max, flip=data.flip, num_images=num_images, seed=config.train.seed)
    if data.source == "folder":
        description["path"] = data.path
    elif data.source == "tfds":
        description.update(tfds_name=data.tfds_name, split=data.train_split)
    return description


def compute_thresholds(config: ml_collections.ConfigDict, num_images: int, batch_size: int = 64):
    """Entropy percentiles of ``num_images`` training crops: a :class:`grain_router.GrainThresholds`.

    Raises ``DataError`` (unreadable data), ``GrainError`` / ``ValueError`` (bad settings) with one line.
    """

    if num_images < 1 or batch_size < 1:
        raise ConfigError(f"--num_images and --batch_size must be positive, got {num_images} and {batch_size}")
    if "grain" not in config.get("model", {}):
        raise ConfigError("--config: its model routes no grains (no model.grain); grain_thresholds measures the crops of "
                          f"a Dynamic VAE config (configs/dvae_demo.py), not of {workdir.describe_run(config)}")
    model = ml_collections.ConfigDict(config.model.to_dict())
    model.grain.thresholds = model.grain.get("thresholds") or "(the file being made)"  # what this command writes
    validate_dvae_model(model)
    validate_data_source(config.data)
    validate_crops(config.data)
    settings = DVAEConfig.from_model_config(config.model).entropy_settings
    train, _ = sources.open_sources(config.data, config.data.num_eval_images)
    iterator = pipeline.train_iterator(config.data, train, image_size=config.model.image_size,
                                       batch_size=batch_size, seed=config.train.seed)
    entropies, seen = [], 0
    while seen < num_images:
        # Whole batches keep one compiled shape; the surplus of the last one is dropped.
        batch = np.asarray(next(iterator)["image"])
        take = min(len(batch), num_images - seen)
        entropies.append(np.asarray(grain_router.region_entropy(batch, settings))[:take].reshape(-1))
        seen += take
        logging.log_every_n_seconds(logging.INFO, "entropy of %d / %d crops", 10, seen, num_images)
    return grain_router.GrainThresholds.from_entropies(np.concatenate(entropies), settings,
                                                data_description(config, num_images))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

    with boundary():
        storage.check_writable(FLAGS.out, "--out")  # in seconds, not after the crops' entropies
        thresholds = compute_thresholds(FLAGS.config, FLAGS.num_images, FLAGS.batch_size)
        thresholds.save(FLAGS.out)
    median = thresholds.threshold_at(50)
    print(f"wrote {FLAGS.out}: entropy percentiles 1..99 of {thresholds.num_regions} regions "
          f"({FLAGS.num_images} crops); median {median:.4f} nats (fine ratio 0.5 threshold)")


if __name__ == "__main__":
    from nativetok_jax.command import config_flags_parser

    define_flags()
    app.run(main, flags_parser=config_flags_parser)
