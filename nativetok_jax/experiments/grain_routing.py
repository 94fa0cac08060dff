"""``python -m nativetok_jax.experiments.grain_routing --workdir DIR [--config C] [--steps N]``.

D²iT's claim for its first stage (docs/d2it.md "Stage 1") is that spending the fine grain where
the information is (entropy routing) reconstructs better than spending it anywhere. This trains,
at equal steps, batch and seed, five Dynamic VAEs from one config (``DIR/<arm>``, each resumable):

- ``entropy``: routed by region entropy at fine ratio r (D²iT);
- ``random``: each region fine with probability r, independently, at every step and evaluation;
- ``fine`` / ``coarse``: every region at one grain (more / fewer latent floats than r);
- ``single_grain``: a fixed single-grain VAE (every region coarse) whose latent has as many floats
  as the routed ones at r: ``round(C (4 r + 1 - r))`` channels per coarse cell for C fine channels.

Each is judged on the same held-out images with its posterior mean: PSNR per image averaged over
the set, PSNR over the regions it routed fine and coarse, and PSNR over the regions
the *entropy* router calls fine and coarse (the same pixels for every arm, so the arms compare
there directly), and the block means of its own routing (``block_mean_psnr``: does the trained
arm beat the model-free codec of the same routing?). Beside them, the model-free version (block means at the two grains, routed by
entropy versus at random: :mod:`nativetok_jax.evaluation.block_mean_routing`), which runs in
seconds. Writes ``DIR/grain_routing.json`` and ``DIR/grain_routing.png``; reports whatever it
measures. The default config (``configs/grain_routing.py``) is the demo DVAE with a short
schedule; ``--steps`` overrides ``train.num_steps`` for every arm.
"""

from __future__ import annotations

import os
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # else TF prints a notice on import; it computes nothing here

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from nativetok_jax import storage
from nativetok_jax.command import boundary
from nativetok_jax.config import ConfigError, validate_dvae
from nativetok_jax.data.pipeline import eval_images
from nativetok_jax.data.sources import open_sources
from nativetok_jax.dvae import DVAE
from nativetok_jax.evaluation.block_mean_routing import block_mean_routing, routed_block_means
from nativetok_jax.evaluation.dvae_metrics import region_squared_errors
from nativetok_jax.evaluation.metrics import psnr_of_squared_error, psnr_per_image
from nativetok_jax.models.d2it import grain_router
from nativetok_jax.models.d2it.dvae import DVAEConfig
from nativetok_jax.training.dvae_trainer import train_dvae

FLAGS = flags.FLAGS
ARMS = ("entropy", "random", "fine", "coarse", "single_grain")
REPORT, PLOT = "grain_routing.json", "grain_routing.png"


def define_flags() -> None:
    """Command-line flags, defined only when run as a program (the functions stay importable)."""
    config_flags.DEFINE_config_file("config", "configs/grain_routing.py", "A DVAE config (entropy routing).")
    flags.DEFINE_string("workdir", None, "Directory for the five DVAEs and the report.")
    flags.DEFINE_integer("steps", 0, "Training steps of every arm (0: the config's train.num_steps).")
    flags.mark_flags_as_required(["workdir"])


def arm_config(config: ml_collections.ConfigDict, arm: str) -> ml_collections.ConfigDict:
    """``config`` with the routing of ``arm`` (everything else, the budget and seed included, equal)."""
    config = ml_collections.ConfigDict(config.to_dict())
    g = config.model.grain
    if arm == "single_grain":
        ratio = g.fine_ratio
        config.model.latent_channels = round(config.model.latent_channels * (4 * ratio + 1 - ratio))
        g.routing = "coarse"
    elif arm != "entropy":
        g.routing = arm
    return config


def run(config: ml_collections.ConfigDict, workdir: str, steps: int = 0) -> dict[str, Any]:
    """Trains and judges every arm (finished ones are only judged); returns and writes the report."""

    if steps < 0:
        raise ConfigError(f"--steps: must be >= 0, got {steps}")
    config = ml_collections.ConfigDict(config.to_dict())
    if steps:
        t = config.train
        t.num_steps = steps
        t.eval_every, t.checkpoint_every = min(t.eval_every, steps), min(t.checkpoint_every, steps)
        t.warmup_steps = min(t.warmup_steps, steps // 4)
    validate_dvae(config)
    if config.model.grain.routing != "entropy":
        raise ConfigError(f"config.model.grain.routing: the experiment's base arm routes by entropy, got "
                          f"{config.model.grain.routing!r}")
    entropy_router = DVAEConfig.from_model_config(config.model).router()
    _, eval_source = open_sources(config.data, config.data.num_eval_images)
    images = eval_images(config.data, eval_source, image_size=config.model.image_size,
                         num_images=config.data.num_eval_images, seed=config.train.seed)
    entropy_grains = np.asarray(entropy_router(images))
    root = storage.path(workdir)
    arms: dict[str, Any] = {}
    for arm in ARMS:
        start = time.time()
        train_dvae(arm_config(config, arm), os.fspath(root / arm))
        dvae = DVAE.from_checkpoint(os.fspath(root / arm))
        arms[arm] = judge(dvae, images, entropy_grains, seed=config.train.seed)
        arms[arm]["seconds"] = round(time.time() - start, 1)
        logging.info("arm %s: %s", arm, arms[arm])
    report = {
        "arms": arms,
        "model_free": block_mean_routing(images, entropy_router, seed=config.train.seed),
        "budget": {"num_steps": config.train.num_steps, "batch_size": config.train.batch_size,
                   "seed": config.train.seed, "image_size": config.model.image_size,
                   "fine_ratio": config.model.grain.fine_ratio, "num_eval_images": int(len(images)),
                   "data": config.data.source},
        "protocol": ("held-out crops, posterior means decoded; psnr: the mean over images of each image's PSNR (dB); "
                     "region PSNRs from the squared error pooled over the set (the arm's own fine/coarse regions, "
                     "the entropy router's fine/coarse regions); "
                     "latent_floats per image counts each coarse code once"),
    }
    storage.write_json(root / REPORT, report)
    plot(report, root / PLOT)
    return report


def judge(dvae: Any, images: np.ndarray, entropy_grains: np.ndarray, seed: int, batch_size: int = 64) -> dict[str, Any]:
    """One arm's held-out PSNRs, its fine fraction and latent floats per image, and
    ``block_mean_psnr``: the block means of the arm's own routing (the codec with no model).

    ``psnr`` is the project's one PSNR, the mean over images (``evaluation.metrics.psnr``, as the
    trainer's evaluation reports it); the region PSNRs pool the squared error over the regions'
    pixels of the whole set, since an image may have no region of a grain.
    """

    totals = {name: [0.0, 0] for name in ("fine", "coarse", "entropy_fine", "entropy_coarse")}
    fine, floats, per_image, block_means = [], [], [], []
    for index in range(0, len(images), batch_size):
        batch = images[index:index + batch_size]
        latents, grains = dvae.encode(batch, seed=seed + index)
        rebuilt, grains = np.asarray(dvae.decode(latents, grains)), np.asarray(grains)
        per_image.append(np.asarray(psnr_per_image(batch, rebuilt), np.float64))
        # The model-free codec of the arm's own routing, at the same codes: is the training worth it?
        block_means.append(np.asarray(psnr_per_image(batch, routed_block_means(batch, grains, dvae.router.factors)),
                                      np.float64))
        for prefix, routed in (("", grains), ("entropy_", entropy_grains[index:index + batch_size])):
            for name, (error, count) in region_squared_errors(batch, rebuilt, routed).items():
                totals[prefix + name][0] += error
                totals[prefix + name][1] += count
        fine.append(grains.mean())
        floats.append(np.asarray(grain_router.code_weights(grains, (2, 1))).sum(axis=(1, 2)) * dvae.latent_shape[-1])
    return {"psnr": float(np.concatenate(per_image).mean()),
            "block_mean_psnr": float(np.concatenate(block_means).mean()),
            **{f"psnr_{name}_regions": psnr_of_squared_error(*value) for name, value in totals.items()},
            "fine_fraction": float(np.mean(fine)), "latent_floats_per_image": float(np.concatenate(floats).mean()),
            "latent_scale": dvae.latent_scale}


def plot(report: dict[str, Any], path: Any) -> None:
    """Bars per arm: PSNR overall and over the entropy router's fine and coarse regions; the
    model-free arms beside them."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    columns = (("psnr", "all pixels"), ("psnr_entropy_fine_regions", "entropy-fine regions"),
               ("psnr_entropy_coarse_regions", "entropy-coarse regions"))
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=110)
    names = list(report["arms"])
    for offset, (key, label) in enumerate(columns):
        values = [report["arms"][arm][key] or 0.0 for arm in names]
        left.bar(np.arange(len(names)) + (offset - 1) * 0.27, values, 0.27, label=label)
    left.set_xticks(range(len(names)), names)
    left.set_ylabel("held-out PSNR (dB)")
    left.set_title(f"trained DVAEs, {report['budget']['num_steps']} steps each")
    left.legend(fontsize=8)
    free = report["model_free"]["arms"]
    free_names = list(free)
    for offset, (key, label) in enumerate((("psnr", "all pixels"), ("psnr_fine_regions", "own fine regions"),
                                           ("psnr_coarse_regions", "own coarse regions"))):
        values = [free[arm][key] or 0.0 for arm in free_names]
        right.bar(np.arange(len(free_names)) + (offset - 1) * 0.27, values, 0.27, label=label)
    right.set_xticks(range(len(free_names)), free_names)
    right.set_title("model-free: block means routed per region")
    right.legend(fontsize=8)
    for axis in (left, right):
        axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    storage.write_bytes(path, buffer.getvalue())


def table(report: dict[str, Any]) -> str:
    """The report as a text table (what the command prints)."""
    def db(value: float | None) -> str:
        return f"{value:8.2f}" if value is not None else f"{'-':>8s}"

    lines = [f"{'arm':13s} {'PSNR':>8s} {'own fine':>8s} {'own crs':>8s} {'ent fine':>8s} {'ent crs':>8s} "
             f"{'fine %':>6s} {'floats':>7s} {'blk mean':>8s}"]
    for arm, r in report["arms"].items():  # blk mean: block means of the arm's own routing
        lines.append(f"{arm:13s} {db(r['psnr'])} {db(r['psnr_fine_regions'])} {db(r['psnr_coarse_regions'])} "
                     f"{db(r['psnr_entropy_fine_regions'])} {db(r['psnr_entropy_coarse_regions'])} "
                     f"{100 * r['fine_fraction']:6.1f} {r['latent_floats_per_image']:7.0f} {db(r['block_mean_psnr'])}")
    lines.append("model-free (block means):")
    for arm, r in report["model_free"]["arms"].items():
        lines.append(f"{arm:13s} {db(r['psnr'])} {db(r['psnr_fine_regions'])} {db(r['psnr_coarse_regions'])} "
                     f"{'':8s} {'':8s} {100 * r['fine_fraction']:6.1f} {r['codes_per_image']:7.0f}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

    start = time.time()
    with boundary():
        report = run(FLAGS.config, FLAGS.workdir, FLAGS.steps)
    print(f"done in {time.time() - start:.0f} s ({FLAGS.workdir}/{REPORT}, {PLOT}):")
    print(table(report))


if __name__ == "__main__":
    from nativetok_jax.command import config_flags_parser

    define_flags()
    app.run(main, flags_parser=config_flags_parser)
