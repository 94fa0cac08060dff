"""``python -m nativetok_jax.experiments.token_order --config configs/token_order.py --workdir DIR``.

NativeTok's claim (NATIVETOK.md, "Second stage") is that tokens produced in a causal order are
easier for an autoregressive generator to model than order-free ones. This separates "causal
order" from "easier codes" with several arms (``--arms``, comma-separated), each trained
``--seeds N`` times (tokenizer and generator seed ``i = 0..N-1``):

- ``native``: NativeTok (MIT + causal experts);
- ``order_free``: the TiTok-style baseline, latent tokens inside one bidirectional encoder;
- ``causal_mask``: the same encoder with latent token i attending to the image and latents
  ``<= i`` only (``model.latent_causal_mask``; the paper's "plain causal masks in an ordinary
  encoder do not give the gain"), parameter-identical to ``order_free``;
- ``native_permuted`` / ``native_reversed``: NativeTok's own ids (its tokenizer and token store,
  not re-encoded) read by the generator in a fixed random (``permutation_seed``) / reversed order
  (``generator.token_order.permutation``): the same information in another order.

Every tokenizer has the same data, budget, schedule, codebook and token count; every generator the
same size and steps. Each arm's held-out NLL is measured on the same held-out crops in the same
order (per seed), so arms are paired crop by crop; each tokenizer's PSNR is measured on those
crops too (per image, averaged; a warning when two compared arms differ by more than 0.5 dB).

Layout: ``DIR/<tokenizer>/seed_<i>/{tokenizer,tokens}`` (``tokenizer`` is ``native``,
``order_free`` or ``causal_mask``), ``DIR/<arm>/seed_<i>/generator`` (its ``held_out_nll.npz``:
every held-out crop's per-token NLLs). Every stage resumes (rerun the command); finished stages
are not redone. Writes ``DIR/token_order.json``, ``DIR/nll_by_position.png`` and
``DIR/token_order.md`` (a summary table). ``token_order.json`` has one key per arm with
``nll_per_token``, ``nll_by_position``, ``psnr``, ``num_tokens``, ``nll_unigram`` (the no-context
baseline of per-position code frequencies), ``codebook_usage`` (means over seeds), ``std`` (the
same figures' standard deviations over seeds, ddof 1; 0 for one seed), ``per_seed`` (each seed's
figures) and ``parameters`` (``encoder``, ``tokenizer``, ``generator``); and ``arms``, ``seeds``,
``warnings`` (a list of one-line strings) and ``budget`` (wall and CPU seconds per stage and the
matrix-product rate measured at the start).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a program (the functions stay importable)."""
    config_flags.DEFINE_config_file("config", "configs/token_order.py", "Experiment config (configs/token_order.py[:imagenet]).")
    flags.DEFINE_string("workdir", None, "Directory for every arm's tokenizer and generator, and the report.")
    flags.DEFINE_string("arms", None, f"Comma-separated arms (default: the config's arms) among {', '.join(ARMS)}.")
    flags.DEFINE_integer("seeds", None, "Train every arm this many times (seeds 0..N-1; default: the config's seeds).")
    flags.DEFINE_enum("match_parameters", None, ["", "depth", "width"],
                      "Grow the order-free encoders' depth or width to NativeTok's encoder size.")
    flags.mark_flags_as_required(["workdir"])


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm: which tokenizer makes its ids (a section of the config) and in which order the
    generator reads them (``"identity"``, ``"reversed"``, or ``"random"``: the config's
    ``permutation_seed``)."""

    tokenizer: str
    order: str
    label: str


ARMS = {
    "native": Arm("native", "identity", "NativeTok (causal experts)"),
    "order_free": Arm("order_free", "identity", "TiTok-style (order-free)"),
    "causal_mask": Arm("causal_mask", "identity", "TiTok-style + causal mask"),
    "native_permuted": Arm("native", "random", "NativeTok ids, permuted"),
    "native_reversed": Arm("native", "reversed", "NativeTok ids, reversed"),
}
# The contrasts the report gives intervals for (when both arms ran): (arm, baseline).
CONTRASTS = (("order_free", "native"), ("causal_mask", "native"), ("native_permuted", "native"))
PSNR_WARNING_DB = 0.5  # matched reconstruction: arms further apart than this are not compared fairly
FIGURES = ("nll_per_token", "nll_unigram", "psnr", "codebook_usage")


def selected_arms(spec: str) -> list[str]:
    """The arms ``spec`` names (comma-separated), in the order given; a one-line error otherwise."""
    names = [name.strip() for name in str(spec).split(",") if name.strip()]
    unknown = [name for name in names if name not in ARMS]
    if unknown or not names:
        raise ValueError(f"arms: unknown {unknown or 'empty list'}; choose among {', '.join(ARMS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"arms: {spec!r} names an arm twice")
    return names


def permutation_of(arm: str, config: ml_collections.ConfigDict) -> str:
    """The ``generator.token_order.permutation`` of ``arm``."""
    order = ARMS[arm].order
    return f"random:{config.permutation_seed}" if order == "random" else order


def tokenizer_configs(config: ml_collections.ConfigDict, arms: list[str]) -> dict[str, ml_collections.ConfigDict]:
    """The tokenizer config of every tokenizer the ``arms`` use (order-free encoders grown to
    NativeTok's encoder size when ``match_parameters`` says so), checked to share the budget.

    Raises:
      ValueError: the tokenizers differ in token count, image size, codebook, steps or batch size,
        or ``match_parameters`` is not "", "depth" or "width".
    """
    from nativetok_jax.config import validate_training
    from nativetok_jax.models.parameter_matching import match_encoder

    names = sorted({ARMS[arm].tokenizer for arm in arms})
    tokenizers = {}
    for name in names:
        tokenizer = ml_collections.ConfigDict(config[name].to_dict())
        if name != "native" and config.match_parameters:
            tokenizer.model = match_encoder(tokenizer.model, config.native.model, config.match_parameters)
        validate_training(tokenizer)
        tokenizers[name] = tokenizer
    for field in ("num_tokens", "image_size"):
        values = {t.model[field] for t in tokenizers.values()}
        if len(values) > 1:
            raise ValueError(f"every tokenizer needs the same model.{field}, got {sorted(values)}")
    budgets = {(t.model.quantizer.codebook_size, t.train.num_steps, t.train.batch_size) for t in tokenizers.values()}
    if len(budgets) > 1:
        raise ValueError("every tokenizer needs the same codebook size, steps and batch size (the same budget)")
    return tokenizers


def validate(config: ml_collections.ConfigDict) -> list[str]:
    """The selected arms, after checking every field the experiment adds (one-line errors)."""
    arms = selected_arms(config.arms)
    if not isinstance(config.seeds, int) or config.seeds < 1:
        raise ValueError(f"seeds: must be an integer >= 1, got {config.seeds!r}")
    if not isinstance(config.permutation_seed, int):
        raise ValueError(f"permutation_seed: must be an integer, got {config.permutation_seed!r}")
    return arms


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains and measures every selected arm for every seed; returns (and writes) the report."""
    import jax.numpy as jnp

    from nativetok_jax import storage
    from nativetok_jax.bench.train import matmul_flops_per_second
    from nativetok_jax.models.parameter_matching import generator_parameters, tokenizer_parameters
    from nativetok_jax.training.generator_trainer import HELD_OUT_NLL, train_generator
    from nativetok_jax.training.trainer import train_and_evaluate

    arms = validate(config)
    tokenizers = tokenizer_configs(config, arms)
    root = storage.path(workdir)
    budget: dict[str, Any] = dict(matmul_gflops=round(matmul_flops_per_second(jnp.float32) / 1e9, 1), stages={})
    start_wall, start_cpu = time.time(), time.process_time()

    def timed(stage: str, work):
        wall, cpu = time.time(), time.process_time()
        result = work()
        budget["stages"][stage] = dict(wall_seconds=round(time.time() - wall, 1),
                                       cpu_seconds=round(time.process_time() - cpu, 1))
        return result

    per_seed: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    held_out: dict[str, list[str]] = {arm: [] for arm in arms}
    for seed in range(config.seeds):
        reconstruction: dict[str, dict[str, float]] = {}
        for name, tokenizer_config in tokenizers.items():
            tokenizer_config = seeded(tokenizer_config, seed)
            directory = root / name / f"seed_{seed}" / "tokenizer"
            timed(f"{name}/seed_{seed}/tokenizer", lambda: train_and_evaluate(tokenizer_config, os.fspath(directory)))
            reconstruction[name] = timed(f"{name}/seed_{seed}/psnr",
                                         lambda: matched_reconstruction(directory, generator_config(config, name, seed, root)))
        for arm in arms:
            g = generator_config(config, arm, seed, root)
            directory = root / arm / f"seed_{seed}" / "generator"
            result = timed(f"{arm}/seed_{seed}/generator", lambda: train_generator(g, os.fspath(directory)))
            tokenizer = ARMS[arm].tokenizer
            per_seed[arm].append(dict(
                seed=seed,
                nll_per_token=result["nll_per_token"],
                nll_by_position=result["nll_by_position"],
                nll_unigram=unigram_nll(g.generator.tokens_dir),
                **reconstruction[tokenizer],
            ))
            held_out[arm].append(os.fspath(directory / HELD_OUT_NLL))
            logging.info("%s seed %d: held-out NLL %.4f nats/token, tokenizer PSNR %.2f dB", arm, seed,
                         result["nll_per_token"], reconstruction[tokenizer]["psnr"])

    report: dict[str, Any] = dict(arms=arms, seeds=config.seeds)
    for arm in arms:
        tokenizer = tokenizers[ARMS[arm].tokenizer]
        counts = tokenizer_parameters(tokenizer.model)
        counts["generator"] = generator_parameters(
            config.generator.generator, vocab_size=tokenizer.model.quantizer.codebook_size,
            num_tokens=tokenizer.model.num_tokens, num_classes=num_classes_of(generator_config(config, arm, 0, root)))
        report[arm] = dict(
            over_seeds(per_seed[arm]),
            num_tokens=tokenizer.model.num_tokens,
            tokenizer_kind=tokenizer.model.kind,
            latent_causal_mask=bool(tokenizer.model.get("latent_causal_mask", False)),
            encoder=dict(width=tokenizer.model.encoder.width, depth=tokenizer.model.encoder.depth),
            token_order=permutation_of(arm, config),
            parameters=counts,
            held_out_nll=held_out[arm],
        )
    report["warnings"] = warnings(report, arms)
    budget.update(wall_seconds=round(time.time() - start_wall, 1), cpu_seconds=round(time.process_time() - start_cpu, 1))
    report["budget"] = budget
    storage.write_json(root / "token_order.json", report)
    plot_nll_by_position(report, root / "nll_by_position.png")
    storage.write_text(root / "token_order.md", summary_table(report))
    return report


def seeded(tokenizer: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """A copy of a run's config trained with ``train.seed = seed``."""
    copy = ml_collections.ConfigDict(tokenizer.to_dict())
    copy.train.seed = seed
    return copy


def generator_config(config: ml_collections.ConfigDict, arm: str, seed: int, root: Any) -> ml_collections.ConfigDict:
    """The generator config of ``arm`` (or of a tokenizer's name: its own-order arm) for ``seed``:
    its tokenizer's workdir and shared token store, its reading order, ``train.seed = seed``."""
    tokenizer = ARMS[arm].tokenizer
    g = seeded(config.generator, seed)
    g.generator.tokenizer = os.fspath(root / tokenizer / f"seed_{seed}" / "tokenizer")
    g.generator.tokens_dir = os.fspath(root / tokenizer / f"seed_{seed}" / "tokens")  # shared by its arms
    g.generator.token_order.permutation = permutation_of(arm, config)
    return g


def matched_reconstruction(tokenizer_dir: Any, generator: ml_collections.ConfigDict) -> dict[str, float]:
    """``psnr`` (dB; per image, averaged over images: the project's one PSNR) and
    ``codebook_usage`` of the tokenizer in ``tokenizer_dir`` on exactly the held-out crops the
    ``generator`` config's NLL is measured on (``generator_trainer.held_out_crops``)."""
    from nativetok_jax import sharding
    from nativetok_jax.data.pipeline import SkippedImages
    from nativetok_jax.data.sources import open_sources
    from nativetok_jax.evaluation.tokenizer_metrics import evaluate_tokenizer
    from nativetok_jax.tokenizer import Tokenizer
    from nativetok_jax.training.generator_trainer import held_out_crops
    from nativetok_jax.training.token_extraction import example_image

    tokenizer = Tokenizer.from_checkpoint(tokenizer_dir, use_ema=generator.generator.use_ema,
                                          mesh=sharding.make_mesh(generator.mesh))
    _, eval_source = open_sources(generator.data, generator.data.num_eval_images)
    data, num_examples, seed = held_out_crops(generator, eval_source)
    skipped = SkippedImages()
    crops = [example_image(eval_source, i, data, tokenizer.image_size, seed, skipped) for i in range(num_examples)]
    images = np.stack([crop[0] for crop in crops if crop is not None])
    batch_size = generator.generator.extract_batch_size
    metrics, _ = evaluate_tokenizer(tokenizer, (images[i : i + batch_size] for i in range(0, len(images), batch_size)),
                                    prefix=False)
    return dict(psnr=float(metrics["psnr"]), codebook_usage=float(metrics["codebook_usage"]))


def num_classes_of(generator: ml_collections.ConfigDict) -> int:
    """The class count a generator is built with: its config's, else its training token store's."""
    from nativetok_jax import storage
    from nativetok_jax.data.token_store import read_meta

    g = generator.generator
    return int(g.num_classes or read_meta(storage.path(g.tokens_dir) / "train")["num_classes"])


def over_seeds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds of every figure (and of ``nll_by_position``), their standard deviations
    (ddof 1; 0 with one seed) under ``std``, and the rows themselves under ``per_seed``."""
    def spread(values: np.ndarray) -> np.ndarray:
        return values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros_like(values[0])

    summary: dict[str, Any] = {}
    deviations: dict[str, Any] = {}
    for key in FIGURES + ("nll_by_position",):
        values = np.asarray([row[key] for row in rows], np.float64)
        summary[key] = values.mean(axis=0).tolist()
        deviations[key] = spread(values).tolist()
    return dict(summary, std=deviations, per_seed=rows)


def warnings(report: dict[str, Any], arms: list[str]) -> list[str]:
    """One line per compared pair whose tokenizers' matched PSNRs differ by more than 0.5 dB (a
    lower NLL may then just be coarser codes), and one where the order-free encoder has fewer
    parameters than NativeTok's MIT + experts."""
    lines = []
    for arm, baseline in CONTRASTS:
        if arm in arms and baseline in arms:
            gap = report[arm]["psnr"] - report[baseline]["psnr"]
            if abs(gap) > PSNR_WARNING_DB:
                lines.append(f"{arm} vs {baseline}: tokenizer PSNRs differ by {gap:+.2f} dB (> {PSNR_WARNING_DB} dB): "
                             "reconstruction is not matched, so the NLL contrast mixes order and code coarseness")
    if "native" in arms:
        native = report["native"]["parameters"]["encoder"]
        for arm in ("order_free", "causal_mask"):
            if arm in arms and report[arm]["parameters"]["encoder"] < native:
                lines.append(f"{arm}: encoder has {report[arm]['parameters']['encoder']:,} parameters against "
                             f"NativeTok's MIT + experts' {native:,} (match_parameters=depth|width grows it)")
    return lines


def unigram_nll(tokens_dir: str | os.PathLike) -> float:
    """Held-out NLL under the training set's code frequencies at each position (add-one smoothed):
    the no-context baseline, since a tokenizer that uses fewer codes is easier to model anyway.
    The mean over positions does not depend on the order the generator reads them in."""
    from nativetok_jax import storage
    from nativetok_jax.data.token_store import TokenSource

    train, held_out = (TokenSource(storage.path(tokens_dir) / split) for split in ("train", "eval"))
    train_ids, _ = train.arrays()
    eval_ids, _ = held_out.arrays()
    total = 0.0
    for position in range(train_ids.shape[1]):
        counts = np.bincount(train_ids[:, position], minlength=train.codebook_size) + 1.0
        total += -np.log(counts[eval_ids[:, position]] / counts.sum()).mean()
    return float(total / train_ids.shape[1])


def plot_nll_by_position(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Every arm's held-out NLL by (reading) position, mean over seeds with a +-1 std band."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nativetok_jax import storage

    figure, axis = plt.subplots(figsize=(6.5, 3.8), dpi=120)
    for arm in report["arms"]:
        values, spread = np.asarray(report[arm]["nll_by_position"]), np.asarray(report[arm]["std"]["nll_by_position"])
        positions = np.arange(1, len(values) + 1)
        axis.plot(positions, values, marker=".", label=f"{ARMS[arm].label}: {report[arm]['nll_per_token']:.3f}")
        if report["seeds"] > 1:
            axis.fill_between(positions, values - spread, values + spread, alpha=0.2)
    axis.set_xlabel("token position (as the generator reads it)")
    axis.set_ylabel("held-out NLL (nats)")
    axis.set_title(f"AR generator: NLL by position ({report['seeds']} seed{'s' if report['seeds'] > 1 else ''})")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    storage.write_bytes(path, buffer.getvalue())


def _mean_std(entry: dict[str, Any], key: str, digits: int, seeds: int) -> str:
    mean = f"{entry[key]:.{digits}f}"
    return mean if seeds == 1 else f"{mean} ± {entry['std'][key]:.{digits}f}"


def summary_table(report: dict[str, Any]) -> str:
    """The Markdown summary: one row per arm (means ± std over seeds), parameters, warnings."""
    seeds = report["seeds"]
    lines = [f"# Token order: held-out NLL of the same AR generator ({seeds} seed{'s' if seeds > 1 else ''})", "",
             "| arm | NLL (nats/token) | unigram NLL | context gain | PSNR (dB) | codebook usage | "
             "encoder params | tokenizer params | generator params |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm in report["arms"]:
        r = report[arm]
        gain = r["nll_unigram"] - r["nll_per_token"]
        p = r["parameters"]
        lines.append(f"| {arm} | {_mean_std(r, 'nll_per_token', 3, seeds)} | {_mean_std(r, 'nll_unigram', 3, seeds)} | "
                     f"{gain:.3f} | {_mean_std(r, 'psnr', 2, seeds)} | {100 * r['codebook_usage']:.1f} % | "
                     f"{p['encoder'] / 1e6:.2f} M | {p['tokenizer'] / 1e6:.2f} M | {p['generator'] / 1e6:.2f} M |")
    if report["warnings"]:
        lines += ["", "Warnings:", ""] + [f"- {line}" for line in report["warnings"]]
    budget = report["budget"]
    lines += ["", f"Ran in {budget['wall_seconds'] / 60:.1f} min wall, {budget['cpu_seconds'] / 60:.1f} CPU-minutes "
              f"(2048^2 float32 product at {budget['matmul_gflops']} GFLOP/s at the start)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from nativetok_jax.config import ConfigError
    from nativetok_jax.data.sources import DataError

    from nativetok_jax.training.guards import ends_preempted_runs

    config = FLAGS.config
    for name in ("arms", "seeds", "match_parameters"):
        if getattr(FLAGS, name) is not None:
            config[name] = getattr(FLAGS, name)
    start = time.time()
    try:
        with ends_preempted_runs():
            report = run(config, FLAGS.workdir)
    except (ConfigError, DataError, ValueError) as error:
        sys.exit(f"error: {str(error).splitlines()[0]}")
    print(f"done in {time.time() - start:.0f} s ({FLAGS.workdir}/token_order.json, token_order.md):")
    print(summary_table(report))


if __name__ == "__main__":
    define_flags()
    app.run(main)
