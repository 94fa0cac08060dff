"""``python -m nativetok_jax.experiments.dynamic_grain --workdir DIR [--steps N] [--inception FILE]``.

D²iT's claim for its second stage (paper Tables 4 and 5; docs/d2it.md "Numbers to compare with")
is that diffusing a mixed-grain latent (fine where the image is detailed) beats diffusing a
fixed-grain one of the same budget, and that the grain map matters (random 15.93, ground truth
4.35, the grain transformer's 4.47 FID on FFHQ). This trains, at equal training steps, batch,
width and seed, both arms from one config (``configs/dynamic_grain.py``; each resumable):

- ``dit_fixed_grain``: DiT on the *single-grain* VAE: every region coarse, ``round(C (4 r + 1 - r))``
  channels per code, as many latent floats as the routed latent at fine ratio r (the routing
  experiment's ``single_grain`` arm, :func:`nativetok_jax.experiments.grain_routing.arm_config`).
  It is trained by the D²iT trainer with D²iT's parts switched off (no grain embedding, no
  RefineNet, fixed sin-cos positions, uniform loss weights): on an all-coarse map that network
  *is* DiT/2 followed by 2 x 2 averaging (a test of ``models/d2it/content_transformer.py``), i.e. DiT on the coarse
  grid's codes;
- ``d2it``: D²iT (the config's content transformer, RefineNet, grain embedding, dynamic grain
  loss) on the entropy-routed Dynamic VAE.

The two VAEs are trained first (``DIR/vae/entropy``, ``DIR/vae/single_grain``), or taken from a
routing experiment's workdir (``--routing_dir``: its ``entropy`` and ``single_grain`` arms).

Each arm is judged on the same held-out crops: the epsilon-MSE at fixed steps (fixed noise), the
variational bound in bits per latent dimension (DiT's ``calc_bpd_loop``,
:mod:`nativetok_jax.diffusion.variational_bound`; each latent code counted once; D²iT's is the
latent's given its ground-truth grain map, the map's own cost is the grain transformer's NLL,
reported beside it), then samples: D²iT's with the grain maps from the grain transformer, from
the held-out data (ground truth) and at random (at the data's fine fraction), the paper's Table 5
rows; each set's per-class fine fraction against the data's; gFID / IS / precision / recall
against the held-out crops when ``--inception`` names the FID Inception weights. Bits per
dimension compare two *latent spaces* (different VAEs), so they say how hard each latent is to
model, not which images are likelier; at 32 px on a CPU, judge the pictures and the grain
statistics before FID (docs/d2it.md, "Numbers to compare with").

Writes ``DIR/dynamic_grain.json``, ``DIR/dynamic_grain.png`` (plots), ``DIR/dynamic_grain.md``
(the table) and each sample set's grid; reports whatever it measures.
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

from nativetok_jax import checkpoints, sample, sharding, storage
from nativetok_jax.config import ConfigError, validate_d2it, validate_dvae
from nativetok_jax.data.grain_latent_store import GrainLatentSource
from nativetok_jax.data.pipeline import SkippedImages
from nativetok_jax.diffusion.gaussian import build_diffusion
from nativetok_jax.diffusion.multi_grain import grain_loss_weights
from nativetok_jax.diffusion.variational_bound import variational_bound
from nativetok_jax.evaluation import fid
from nativetok_jax.evaluation.grain_statistics import fine_fraction_by_class
from nativetok_jax.evaluation.plots import new_figure, save_figure
from nativetok_jax.evaluation.precision_recall import precision_recall
from nativetok_jax.evaluation.tokenizer_metrics import inception_score_splits, inception_statistics
from nativetok_jax.experiments import grain_routing
from nativetok_jax.experiments.entry_point import run_and_report
from nativetok_jax.models.d2it.dynamic_diffusion_transformer import dynamic_diffusion_transformer_from_config
from nativetok_jax.pretrained.inception import load_inception
from nativetok_jax.training import d2it_trainer, grain_latent_extraction, loop
from nativetok_jax.training.d2it_trainer import content_apply, grain_noise
from nativetok_jax.training.diffusion_trainer import store_sources
from nativetok_jax.training.dvae_trainer import train_dvae
from nativetok_jax.training.grain_latent_extraction import store_directory
from nativetok_jax.training.token_extraction import example_image

FLAGS = flags.FLAGS
REPORT, PLOT, TABLE = "dynamic_grain.json", "dynamic_grain.png", "dynamic_grain.md"
ARMS = ("dit_fixed_grain", "d2it")
GRAIN_MAP_ROWS = ("model", "ground_truth", "random")  # Table 5's rows, as `sample --grain_maps` names them


def define_flags() -> None:
    """Command-line flags, defined only when run as a program (the functions stay importable)."""
    config_flags.DEFINE_config_file("config", "configs/dynamic_grain.py", "The experiment's config.")
    flags.DEFINE_string("workdir", None, "Directory for the VAEs, both arms and the report.")
    flags.DEFINE_integer("steps", 0, "Training steps of both diffusion arms (0: the config's).")
    flags.DEFINE_string("routing_dir", None, "A grain_routing experiment's workdir: reuse its entropy and "
                        "single_grain VAEs instead of training them.")
    flags.DEFINE_string("inception", None, "FID InceptionV3 weights (python -m nativetok_jax.convert): adds gFID, "
                        "IS, precision and recall.")
    flags.mark_flags_as_required(["workdir"])


def arm_config(config: ml_collections.ConfigDict, arm: str, vae_workdir: str, latent_channels: int,
               steps: int = 0) -> ml_collections.ConfigDict:
    """The D²iT run of ``arm`` on the VAE in ``vae_workdir`` (everything else equal)."""
    run = ml_collections.ConfigDict(config.d2it.to_dict())
    run.dvae.workdir = vae_workdir
    run.model.latent_channels = latent_channels
    if arm == "dit_fixed_grain":  # D²iT's parts off: DiT/2 on an all-coarse map (module docstring)
        run.model.update(grain_embedding=False, refine_depth=0, learnable_positions=False)
        run.model.depth = config.d2it.model.depth + config.d2it.model.refine_depth  # equal depth
        run.model.diffusion.grain_loss = (1.0, 1.0)
    if steps:
        t = run.train
        t.num_steps = steps
        t.eval_every, t.checkpoint_every = min(t.eval_every, steps), min(t.checkpoint_every, steps)
        t.warmup_steps = min(t.warmup_steps, steps // 4)
    return run


def validate(config: ml_collections.ConfigDict, steps: int = 0, routing_dir: str | None = None) -> None:
    """Raises ``ConfigError`` (one line) for a field of either VAE (unless ``routing_dir`` has
    them trained), either diffusion arm or the evaluation that cannot work, before anything
    trains: the D²iT arm's fields were first checked after both VAEs and the fixed-grain arm had
    trained, and the evaluation's after an arm had."""
    if steps < 0:
        raise ConfigError(f"--steps: must be >= 0, got {steps}")
    vaes = {}
    for vae in ("entropy", "single_grain"):
        if routing_dir:
            vaes[vae] = checkpoints.read_config(str(storage.path(routing_dir) / vae))
        else:
            vaes[vae] = grain_routing.arm_config(config.dvae, vae)
            validate_dvae(vaes[vae])
    e = config.evaluation
    for arm, vae in (("dit_fixed_grain", "single_grain"), ("d2it", "entropy")):
        channels = int(vaes[vae].model.latent_channels)
        run_config = arm_config(config, arm, f"(the {vae} VAE, trained first)", channels, steps)
        validate_d2it(run_config)
        try:
            sample.diffusion_settings(run_config.model, sampler=e.sampler, num_steps=e.num_steps,
                                      guidance_scale=e.guidance_scale, seed=e.seed, num_samples=e.num_samples,
                                      batch_size=e.batch_size)
        except ConfigError as error:  # named by its flag there; here it is the config's evaluation field
            raise ConfigError(f"evaluation.{str(error).removeprefix('--')}") from None
    terms = e.get("bound_terms")
    if terms is not None and (not isinstance(terms, int) or isinstance(terms, bool) or terms < 2):
        raise ConfigError(f"evaluation.bound_terms: must be None (every step) or an integer >= 2, got {terms!r}")


def vae_workdirs(config: ml_collections.ConfigDict, root: Any, routing_dir: str | None) -> dict[str, str]:
    """``{"entropy": dir, "single_grain": dir}``: trained now under ``root/vae`` unless finished, or
    a routing experiment's arms."""

    if routing_dir:
        return {arm: str(storage.path(routing_dir) / arm) for arm in ("entropy", "single_grain")}
    directories = {}
    for arm in ("entropy", "single_grain"):
        directories[arm] = os.fspath(root / "vae" / arm)
        train_dvae(grain_routing.arm_config(config.dvae, arm), directories[arm])
    return directories


def run(config: ml_collections.ConfigDict, workdir: str, steps: int = 0, routing_dir: str | None = None,
        inception_path: str | None = None) -> dict[str, Any]:
    """Trains (or resumes) and judges both arms; returns and writes the report."""

    validate(config, steps, routing_dir)
    if inception_path and not storage.path(inception_path).is_file():
        raise ConfigError(f"--inception: file not found: {inception_path}")
    root = storage.path(workdir)
    vaes = vae_workdirs(config, root, routing_dir)
    arms: dict[str, Any] = {}
    for arm, vae in (("dit_fixed_grain", vaes["single_grain"]), ("d2it", vaes["entropy"])):
        start = time.time()
        channels = int(checkpoints.read_config(vae).model.latent_channels)
        # The fixed-grain arm's maps are all coarse whatever draws them: its samples take the data's.
        rows = ("ground_truth",) if arm == "dit_fixed_grain" else GRAIN_MAP_ROWS
        arms[arm] = judge_arm(arm_config(config, arm, vae, channels, steps), os.fspath(root / arm), config.evaluation,
                              samples_dir=root / arm / "experiment_samples", inception_path=inception_path, rows=rows)
        arms[arm]["seconds"] = round(time.time() - start, 1)
        logging.info("arm %s: %s", arm, {k: v for k, v in arms[arm].items() if not isinstance(v, dict)})
    budget = arm_config(config, "d2it", "", 0, steps).train
    report = {
        "arms": arms,
        "budget": {"num_steps": budget.num_steps, "batch_size": budget.batch_size, "seed": budget.seed,
                   "width": config.d2it.model.width, "depth": config.d2it.model.depth + config.d2it.model.refine_depth,
                   "image_size": config.d2it.model.image_size, "vaes": vaes},
        "protocol": {
            "eps_mse": "held-out crops (unflipped posterior means x latent scale), fixed multi-grained noise per "
                       "example, each latent code weighted once",
            "bpd": f"DiT calc_bpd_loop: KL terms at {config.evaluation.bound_terms} evenly spaced steps (t=0 "
                   "included, the others weighted by the steps they stand for) + decoder NLL + prior, bits per "
                   "latent dimension (each code once); D²iT's given the ground-truth grain map",
            "samples": f"{config.evaluation.num_samples} per grain-map row, labels cycling the classes (ground "
                       f"truth: the held-out examples' labels), {config.evaluation.sampler} "
                       f"{config.evaluation.num_steps} steps, guidance {config.evaluation.guidance_scale}",
            "fid": "gFID/IS/precision/recall against the held-out crops (FID Inception) when --inception is given",
        },
    }
    storage.write_json(root / REPORT, report)
    plot(report, root / PLOT)
    storage.write_bytes(root / TABLE, (table(report) + "\n").encode())
    return report


def judge_arm(run_config: ml_collections.ConfigDict, run_dir: str, evaluation: ml_collections.ConfigDict, *,
              samples_dir: Any, inception_path: str | None, rows: tuple[str, ...] = GRAIN_MAP_ROWS) -> dict[str, Any]:
    """Trains one arm (resuming a finished run only evaluates) and measures it (module docstring);
    ``rows``: the grain-map sources its samples are drawn with."""
    import jax


    summary = d2it_trainer.train_d2it(run_config, run_dir)
    stores = grain_latent_extraction.store_directory(run_config)
    held_out = GrainLatentSource(stores / "eval").columns()
    num_classes = run_config.model.num_classes
    result: dict[str, Any] = {
        **{k: v for k, v in summary.items() if k.startswith("eps_mse_t")},
        "grain_nll": summary["grain_nll"], "step": summary["step"], "latent_scale": summary["latent_scale"],
        "latent_channels": int(run_config.model.latent_channels),
        "data_fine_fraction": summary["train_fine_fraction"],
        "data_fine_fraction_by_class": _listed(fine_fraction_by_class(held_out["grains"][:, 0], held_out["label"],
                                                                      num_classes)),
    }
    result.update(variational_bound_bpd(run_dir, run_config, held_out, evaluation))
    real = held_out_images(run_config) if inception_path else None
    inception = None
    if inception_path:

        inception = load_inception(inception_path)
    result["samples"] = {}
    for mode in rows:
        images, grains = sample.sample_d2it(
            run_dir, os.fspath(samples_dir / mode), grain_maps=mode, sampler=evaluation.sampler,
            num_steps=evaluation.num_steps, guidance_scale=evaluation.guidance_scale, seed=evaluation.seed,
            num_samples=evaluation.num_samples, batch_size=evaluation.batch_size)
        labels = np.asarray(np.load(os.fspath(samples_dir / mode / sample.SAMPLES_NPZ))["arr_1"])
        row = {"fine_fraction": float(np.mean(grains)),
               "fine_fraction_by_class": _listed(fine_fraction_by_class(grains, labels, num_classes))}
        if inception is not None:
            row.update(image_quality(real, images, inception))
        result["samples"][mode] = row
    jax.clear_caches()  # the next arm compiles other shapes
    return result


def variational_bound_bpd(run_dir: str, run_config: ml_collections.ConfigDict, held_out: dict[str, np.ndarray],
                          evaluation: ml_collections.ConfigDict) -> dict[str, float]:
    """The held-out variational bound (EMA weights), bits per latent dimension, and its parts."""
    import jax
    from flax import nnx


    model_config = run_config.model
    mesh, rules = sharding.make_mesh(run_config.mesh), sharding.rules_of(run_config)
    grain_shape = held_out["grains"].shape[2:]
    abstract = nnx.eval_shape(lambda: dynamic_diffusion_transformer_from_config(run_config, grain_shape, nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    params, _ = checkpoints.load_params(run_dir, placement=sharding.restore_placement(
        sharding.param_axes(abstract), mesh, rules))
    diffusion = build_diffusion(model_config.diffusion.schedule, model_config.diffusion.num_steps,
                                learn_sigma=model_config.learn_sigma)
    scale = GrainLatentSource(store_directory(run_config) / "eval").latent_scale
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    @jax.jit(out_shardings=replicated)
    def bound(params, x0, grains, labels, key):
        model = nnx.merge(graphdef, params)
        return variational_bound(content_apply(model, grains), diffusion, x0, labels, key,
                                 weights=grain_loss_weights(grains), noise_fn=grain_noise(grains),
                                 num_terms=evaluation.bound_terms)

    x0 = held_out["mean"][:, 0] * scale
    examples = {"x0": x0, "grains": held_out["grains"][:, 0], "label": held_out["label"]}
    values = loop.per_example(  # a batch's noise key is its first example's index (the batching is fixed)
        lambda batch, index: bound(params, batch["x0"], batch["grains"], batch["label"],
                                   jax.random.fold_in(jax.random.key(0), index[0])),
        examples, evaluation.batch_size, mesh, rules)
    return {f"bound_{name}": float(value.mean()) for name, value in values.items()}


def held_out_images(run_config: ml_collections.ConfigDict) -> np.ndarray:
    """uint8 ``[N, H, W, 3]``: the held-out crops the held-out store encodes (the real set for FID)."""

    sources = store_sources(run_config)
    skipped = SkippedImages()
    examples = [example_image(sources.held_out, i, sources.held_out_data, run_config.model.image_size,
                              run_config.train.seed + 1, skipped) for i in range(sources.num_held_out)]
    return np.stack([e[0] for e in examples if e is not None])


def image_quality(real: np.ndarray, generated: np.ndarray, inception: Any) -> dict[str, float]:
    """gFID, Inception Score, precision and recall of ``generated`` against ``real`` (uint8 images)."""

    batch = 64
    real_features: list = []
    generated_features: list = []
    real_stats, _, _ = inception_statistics((real[i:i + batch] for i in range(0, len(real), batch)), inception,
                                            features_out=real_features)
    stats, logits, count = inception_statistics((generated[i:i + batch] for i in range(0, len(generated), batch)),
                                                inception, features_out=generated_features)
    score, score_std = fid.inception_score(logits, splits=inception_score_splits(count))
    precision, recall = precision_recall(np.concatenate(real_features), np.concatenate(generated_features))
    return {"gfid": fid.frechet_distance(*stats, *real_stats), "inception_score": score,
            "inception_score_std": score_std, "precision": float(precision), "recall": float(recall)}


def _listed(values: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, np.float64)]


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table (also what the command prints)."""
    arms = report["arms"]
    steps = sorted({k for arm in arms.values() for k in arm if k.startswith("eps_mse_t")}, key=lambda k: int(k[9:]))
    header = ["arm", "grain maps", *[f"eps-MSE t={k[9:]}" for k in steps], "bound (bits/dim)", "grain NLL",
              "fine frac.", "data fine frac.", "gFID", "IS", "precision", "recall"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]

    def number(value: Any, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for name, arm in arms.items():
        for mode, row in arm["samples"].items():
            cells = [name, mode, *[number(arm.get(k)) for k in steps], number(arm.get("bound_total_bpd")),
                     number(arm.get("grain_nll")), number(row["fine_fraction"], 3),
                     number(arm["data_fine_fraction"], 3), number(row.get("gfid"), 2),
                     number(row.get("inception_score"), 2), number(row.get("precision"), 3),
                     number(row.get("recall"), 3)]
            lines.append("| " + " | ".join(cells) + " |")
    budget = report["budget"]
    lines.append("")
    lines.append(f"{budget['num_steps']} steps of {budget['batch_size']} per arm, width {budget['width']}, depth "
                 f"{budget['depth']}, {budget['image_size']} px. Per-class fine fraction (samples vs data) in "
                 f"{REPORT}.")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Any) -> None:
    """Three panels: held-out eps-MSE per step and arm; bits per dimension per arm; per-class fine
    fraction of the data against each D²iT sample set's."""

    arms = report["arms"]
    figure = new_figure(14, 3.8)
    left, middle, right = (figure.add_subplot(1, 3, i) for i in (1, 2, 3))
    for name, arm in arms.items():
        steps = sorted((int(k[9:]), v) for k, v in arm.items() if k.startswith("eps_mse_t"))
        left.plot([s for s, _ in steps], [v for _, v in steps], marker="o", label=name)
    left.set_xlabel("diffusion step t")
    left.set_ylabel("held-out eps-MSE")
    left.legend(fontsize=8)
    names = list(arms)
    parts = (("bound_prior_bpd", "prior"), ("bound_kl_bpd", "KL terms"), ("bound_decoder_bpd", "decoder"))
    bottom = np.zeros(len(names))
    for key, label in parts:
        values = np.array([arms[n].get(key, 0.0) for n in names])
        middle.bar(names, values, bottom=bottom, label=label)
        bottom += values
    middle.set_ylabel("variational bound (bits / latent dim)")
    middle.legend(fontsize=8)
    d2it = arms.get("d2it")
    if d2it:
        data = np.array([np.nan if v is None else v for v in d2it["data_fine_fraction_by_class"]])
        classes = np.arange(len(data))
        right.plot(classes, data, "k-o", label="data (held out)")
        for mode, row in d2it["samples"].items():
            values = np.array([np.nan if v is None else v for v in row["fine_fraction_by_class"]])
            right.plot(classes, values, marker=".", linestyle="--", label=f"samples: {mode}")
        right.set_xlabel("class")
        right.set_ylabel("fine fraction")
        right.legend(fontsize=7)
    for axis in (left, middle, right):
        axis.grid(alpha=0.3)
    save_figure(figure, path)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

    run_and_report(lambda: run(FLAGS.config, FLAGS.workdir, FLAGS.steps, FLAGS.routing_dir, FLAGS.inception), table,
                   f"{FLAGS.workdir}/{REPORT}, {PLOT}, {TABLE}")


if __name__ == "__main__":
    from nativetok_jax.command import config_flags_parser

    define_flags()
    app.run(main, flags_parser=config_flags_parser)
