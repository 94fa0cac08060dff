"""``python -m nativetok_jax.experiments.token_order --config configs/token_order.py --workdir DIR``.

NativeTok's claim (docs/nativetok.md, "Generators and the claim they test") is that tokens produced in a causal order are
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
``DIR/contrasts.png`` and ``DIR/token_order.md`` (a summary table). ``token_order.json`` has one
key per arm with ``nll_per_token``, ``nll_by_position``, ``psnr``, ``num_tokens``, ``nll_unigram``
(the no-context baseline of per-position code frequencies) and ``codebook_usage`` as before, and
the decomposition of ``evaluation/token_statistics.py`` (``context_gain``,
``captured_information``, ``entropy``, ``unigram_excess``, each also ``*_by_position``); with
``maskgit`` the MaskGIT generator's masked-token NLL at its sampler's cosine mask rates split the
same way (``maskgit_model_nll``, ``maskgit_unigram_nll``, ``maskgit_context_gain``,
``maskgit_*_by_rate``, ``maskgit_mask_rates``; own-order arms only). Figures are means over seeds;
``std`` holds their standard deviations (ddof 1; 0 for one seed) and ``per_seed`` each seed's.
Each arm also has ``parameters`` (``encoder``, ``tokenizer``, ``generator``), ``token_order``,
``encoder`` sizes and ``held_out_nll`` (its per-crop NLL files). Top level: ``arms``, ``seeds``,
``contrasts`` / ``maskgit_contrasts`` (``"<arm> - native"``: paired bootstrap intervals,
``evaluation/paired_bootstrap.py``), ``warnings`` (one-line strings) and ``budget`` (wall and CPU
seconds per stage, and the matrix-product rate measured at the start).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # else TF prints a notice on import; it computes nothing here

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from etils import epath  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from nativetok_jax import sharding, storage
from nativetok_jax.bench.train import matmul_flops_per_second
from nativetok_jax.command import boundary
from nativetok_jax.config import ConfigError, validate_generator, validate_training
from nativetok_jax.data.pipeline import SkippedImages
from nativetok_jax.data.sources import open_sources
from nativetok_jax.data.token_order import reading_order
from nativetok_jax.data.token_store import TokenSource, read_meta
from nativetok_jax.evaluation import token_likelihood, token_statistics
from nativetok_jax.evaluation.paired_bootstrap import paired_bootstrap_interval
from nativetok_jax.evaluation.plots import markdown_table, plot_by_position, plot_contrasts
from nativetok_jax.evaluation.tokenizer_metrics import evaluate_tokenizer
from nativetok_jax.generation.pretrained import TrainedGenerator
from nativetok_jax.models.generators.build import validate_sampling
from nativetok_jax.models.nativetok import id_count
from nativetok_jax.models.nativetok.parameter_matching import generator_parameters, match_encoder, tokenizer_parameters
from nativetok_jax.tokenizer import Tokenizer
from nativetok_jax.training.generator_trainer import HELD_OUT_NLL, held_out_crops, train_generator
from nativetok_jax.training.token_extraction import example_image
from nativetok_jax.training.trainer import train_and_evaluate

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
# Every arm's figures (means over seeds; ``std`` and ``per_seed`` beside them); ``*_by_position``
# lists go with the AR ones, ``maskgit_*`` ones (and ``*_by_rate`` lists) with MaskGIT.
FIGURES = ("nll_per_token", "nll_unigram", "context_gain", "captured_information", "entropy", "psnr", "codebook_usage")


def selected_arms(spec: str) -> list[str]:
    """The arms ``spec`` names (comma-separated), in the order given; a one-line error otherwise."""
    names = [name.strip() for name in str(spec).split(",") if name.strip()]
    unknown = [name for name in names if name not in ARMS]
    if unknown or not names:
        raise ConfigError(f"arms: unknown {unknown or 'empty list'}; choose among {', '.join(ARMS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"arms: {spec!r} names an arm twice")
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
            raise ConfigError(f"every tokenizer needs the same model.{field}, got {sorted(values)}")
    budgets = {(t.model.quantizer.codebook_size, t.train.num_steps, t.train.batch_size) for t in tokenizers.values()}
    if len(budgets) > 1:
        raise ConfigError("every tokenizer needs the same codebook size, steps and batch size (the same budget)")
    return tokenizers


def validate(config: ml_collections.ConfigDict) -> list[str]:
    """The selected arms, after checking every field the experiment adds (one-line errors)."""
    arms = selected_arms(config.arms)
    if not isinstance(config.seeds, int) or config.seeds < 1:
        raise ConfigError(f"seeds: must be an integer >= 1, got {config.seeds!r}")
    if not isinstance(config.permutation_seed, int):
        raise ConfigError(f"permutation_seed: must be an integer, got {config.permutation_seed!r}")
    samples = config.bootstrap_samples
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ConfigError(f"bootstrap_samples: must be an integer >= 1, got {samples!r}")
    # Every tokenizer and generator the run will train, checked now: the generators otherwise met
    # their first check after every tokenizer of seed 0 had trained (hours at the :full scale).
    tokenizers = tokenizer_configs(config, arms)  # validated there
    for arm in arms:
        for kind in generator_kinds(config, arm):
            generator = generator_config(config, arm, 0, epath.Path(os.sep), kind)
            validate_generator(generator, tokenizer_trained=False)
            validate_sampling(generator.generator.sample, kind,
                              vocab_size=tokenizers[ARMS[arm].tokenizer].model.quantizer.codebook_size)
    return arms


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains and measures every selected arm for every seed; returns (and writes) the report."""
    import jax.numpy as jnp


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
    per_crop: dict[str, dict[str, list[np.ndarray]]] = {arm: dict(ar=[], maskgit=[]) for arm in arms}
    for seed in range(config.seeds):
        reconstruction: dict[str, dict[str, float]] = {}
        for name, tokenizer_config in tokenizers.items():
            tokenizer_config = seeded(tokenizer_config, seed)
            directory = root / name / f"seed_{seed}" / "tokenizer"
            timed(f"{name}/seed_{seed}/tokenizer", lambda: train_and_evaluate(tokenizer_config, os.fspath(directory)))
            reconstruction[name] = timed(f"{name}/seed_{seed}/psnr",
                                         lambda: matched_reconstruction(directory, generator_config(config, name, seed, root)))
        for arm in arms:
            row: dict[str, Any] = dict(seed=seed, **reconstruction[ARMS[arm].tokenizer])
            for kind in generator_kinds(config, arm):
                g = generator_config(config, arm, seed, root, kind)
                directory = root / arm / f"seed_{seed}" / GENERATOR_DIRECTORIES[kind]
                timed(f"{arm}/seed_{seed}/{kind}", lambda: train_generator(g, os.fspath(directory)))
                nll, figures = held_out_figures(g, directory)
                per_crop[arm][kind].append(nll)
                row.update(figures)
            per_seed[arm].append(row)
            logging.info("%s seed %d: held-out NLL %.4f nats/token (unigram %.4f), tokenizer PSNR %.2f dB", arm, seed,
                         row["nll_per_token"], row["nll_unigram"], row["psnr"])

    report: dict[str, Any] = dict(arms=arms, seeds=config.seeds)
    for arm in arms:
        report[arm] = dict(over_seeds(per_seed[arm]), **arm_description(config, arm, tokenizers, root))
    report["contrasts"] = contrasts(per_crop, arms, "ar", config.bootstrap_samples)
    report["maskgit_contrasts"] = contrasts(per_crop, arms, "maskgit", config.bootstrap_samples)
    report["warnings"] = warnings(report, arms)
    budget.update(wall_seconds=round(time.time() - start_wall, 1), cpu_seconds=round(time.process_time() - start_cpu, 1))
    report["budget"] = budget
    write_report(report, root)
    return report


GENERATOR_DIRECTORIES = dict(ar="generator", maskgit="maskgit")


def generator_kinds(config: ml_collections.ConfigDict, arm: str) -> tuple[str, ...]:
    """The generators ``arm`` trains: the AR one, and MaskGIT (``config.maskgit``) for the arms in
    the tokenizer's own order (a bidirectional generator reads every order alike: a permuted arm
    would only relabel its position embeddings)."""
    return ("ar", "maskgit") if config.maskgit and ARMS[arm].order == "identity" else ("ar",)


def held_out_figures(generator: ml_collections.ConfigDict, directory: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """A trained generator's per-crop held-out NLLs (AR: ``[m, L]`` per token, from the trainer's
    ``held_out_nll.npz``; MaskGIT: ``[m, R]`` at its sampler's cosine mask rates) and its figures:
    for AR the NLL, unigram NLL, context gain and captured information (per position and
    overall, :func:`token_statistics.context_decomposition`), for MaskGIT the same split of the
    masked-token NLL per mask rate (``maskgit_*``). Ids are read in the generator's order."""
    import jax


    g = generator.generator
    train, held_out = (reading_order(TokenSource(storage.path(g.tokens_dir) / split), g.token_order.permutation)
                       for split in ("train", "eval"))
    train_ids, _ = train.arrays()
    held_out_ids, labels = held_out.arrays()
    if g.kind == "ar":
        with storage.path(directory / HELD_OUT_NLL).open("rb") as f:
            nll = np.load(f)["nll"]
        split = token_statistics.context_decomposition(train_ids, held_out_ids, nll, train.codebook_size)
        return nll, dict(nll_per_token=split["model_nll"], nll_by_position=split["model_nll_by_position"],
                         nll_unigram=split["unigram_nll"],
                         **{k: v for k, v in split.items() if k not in ("model_nll", "model_nll_by_position", "unigram_nll")})
    # A sampler with more steps than tokens has steps whose input hides nothing: nothing to score.
    rates = [rate for rate in token_likelihood.decoding_mask_rates(g.sample.num_steps, train.num_tokens) if rate > 0]
    key = jax.random.key(0)  # one key for every arm: the same masks, paired
    model = TrainedGenerator.from_checkpoint(os.fspath(directory))
    nll = token_likelihood.trained_generator_nll(model, held_out_ids, labels, mask_rates=rates, key=key)
    masks = token_likelihood.rate_masks(key, len(held_out_ids), train.num_tokens, rates)
    split = token_statistics.masked_context_decomposition(train_ids, held_out_ids, masks, nll, train.codebook_size, rates)
    return nll, {f"maskgit_{k}": v for k, v in split.items()}


def arm_description(config: ml_collections.ConfigDict, arm: str, tokenizers: dict[str, ml_collections.ConfigDict],
                    root: Any) -> dict[str, Any]:
    """What an arm is: its tokenizer's kind and sizes, its reading order, its parameter counts and
    the paths of its per-crop NLLs."""

    model = tokenizers[ARMS[arm].tokenizer].model
    counts = tokenizer_parameters(model)
    g = generator_config(config, arm, 0, root)
    counts["generator"] = generator_parameters(g.generator, vocab_size=model.quantizer.codebook_size,
                                               num_tokens=id_count(model), num_classes=num_classes_of(g))
    return dict(
        num_tokens=id_count(model),
        tokenizer_kind=model.kind,
        latent_causal_mask=bool(model.get("latent_causal_mask", False)),
        encoder=dict(width=model.encoder.width, depth=model.encoder.depth),
        token_order=permutation_of(arm, config),
        parameters=counts,
        held_out_nll=[os.fspath(root / arm / f"seed_{seed}" / "generator" / HELD_OUT_NLL) for seed in range(config.seeds)],
    )


def contrasts(per_crop: dict[str, dict[str, list[np.ndarray]]], arms: list[str], kind: str,
              num_resamples: int) -> dict[str, dict[str, float]]:
    """Paired bootstrap 95 % intervals of ``mean(arm - baseline)`` per-crop NLL for each of
    ``CONTRASTS`` both of whose arms ran ``kind`` generators (positive: the baseline, NativeTok,
    is lower). Items are (seed, crop) pairs: every seed's held-out crops, concatenated, each
    paired across arms (the same crops in the same order within a seed), so the interval covers
    the choice of crops; the spread over seeds is the report's ``std``."""

    result = {}
    for arm, baseline in CONTRASTS:
        if arm in arms and baseline in arms and per_crop[arm][kind] and per_crop[baseline][kind]:
            result[f"{arm} - {baseline}"] = paired_bootstrap_interval(
                np.concatenate(per_crop[arm][kind]), np.concatenate(per_crop[baseline][kind]),
                num_resamples=num_resamples)
    return result


def seeded(tokenizer: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """A copy of a run's config trained with ``train.seed = seed``."""
    copy = ml_collections.ConfigDict(tokenizer.to_dict())
    copy.train.seed = seed
    return copy


def generator_config(config: ml_collections.ConfigDict, arm: str, seed: int, root: Any,
                     kind: str = "ar") -> ml_collections.ConfigDict:
    """The ``kind`` generator config of ``arm`` (or of a tokenizer's name: its own-order arm) for
    ``seed``: the experiment's one generator size and schedule, its tokenizer's workdir and shared
    token store, its reading order, ``train.seed = seed``."""
    tokenizer = ARMS[arm].tokenizer
    g = seeded(config.generator, seed)
    g.generator.kind = kind
    g.generator.tokenizer = os.fspath(root / tokenizer / f"seed_{seed}" / "tokenizer")
    g.generator.tokens_dir = os.fspath(root / tokenizer / f"seed_{seed}" / "tokens")  # shared by its arms
    g.generator.token_order.permutation = permutation_of(arm, config)
    return g


def matched_reconstruction(tokenizer_dir: Any, generator: ml_collections.ConfigDict) -> dict[str, float]:
    """``psnr`` (dB; per image, averaged over images: the project's one PSNR) and
    ``codebook_usage`` of the tokenizer in ``tokenizer_dir`` on exactly the held-out crops the
    ``generator`` config's NLL is measured on (``generator_trainer.held_out_crops``)."""

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

    g = generator.generator
    return int(g.num_classes or read_meta(storage.path(g.tokens_dir) / "train")["num_classes"])


def over_seeds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds of every figure (numbers and per-position / per-rate lists), their
    standard deviations (ddof 1; 0 with one seed) under ``std``, and the rows under ``per_seed``."""
    summary: dict[str, Any] = {}
    deviations: dict[str, Any] = {}
    for key in rows[0]:
        if key == "seed":
            continue
        values = np.asarray([row[key] for row in rows], np.float64)
        summary[key] = values.mean(axis=0).tolist()
        deviations[key] = (values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros_like(values[0])).tolist()
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


TABLE_COLUMNS = dict(  # report figure -> the summary table's column
    nll_per_token="AR NLL (nats/token)", nll_unigram="unigram NLL", context_gain="context gain",
    maskgit_model_nll="MaskGIT masked NLL", maskgit_context_gain="MaskGIT context gain", psnr="PSNR (dB)",
    codebook_usage="codebook usage")


def write_report(report: dict[str, Any], root: Any) -> None:
    """``token_order.json``, ``nll_by_position.png`` (every arm, mean +- std over seeds),
    ``contrasts.png`` (the paired intervals) and ``token_order.md`` (the summary table) in ``root``."""

    storage.write_json(root / "token_order.json", report)
    arms = report["arms"]
    plot_by_position({arm: [row["nll_by_position"] for row in report[arm]["per_seed"]] for arm in arms},
                     root / "nll_by_position.png", xlabel="token position (as the generator reads it)",
                     title=f"AR generator: held-out NLL by position ({report['seeds']} seed(s))")
    if report["contrasts"]:
        plot_contrasts(report["contrasts"], root / "contrasts.png",
                       title="arm - native: paired per-crop NLL differences, 95 % bootstrap intervals")
    storage.write_text(root / "token_order.md", summary_table(report))


def summary_table(report: dict[str, Any]) -> str:
    """The Markdown summary: figures (mean ± std over seeds) and parameter counts per arm, the
    contrasts' intervals, the warnings and the time taken."""

    seeds = report["seeds"]
    rows = {}
    for arm in report["arms"]:
        r = report[arm]
        cells = {column: (r[key], r["std"][key] if seeds > 1 else None) for key, column in TABLE_COLUMNS.items() if key in r}
        cells.update({f"{part} params (M)": r["parameters"][part] / 1e6 for part in ("encoder", "tokenizer", "generator")})
        rows[arm] = cells
    lines = [f"# Token order: the same generators on each arm's tokens ({seeds} seed(s))", "", markdown_table(rows)]
    for title, key in (("AR", "contrasts"), ("MaskGIT", "maskgit_contrasts")):
        if report[key]:
            lines += [f"{title} paired differences of per-crop held-out NLL (nats/token; positive: native lower), "
                      "95 % bootstrap intervals over (seed, crop) pairs:", ""]
            lines += [f"- {name}: {c['mean_difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] ({c['num_pairs']} pairs)"
                      for name, c in report[key].items()] + [""]
    if report["warnings"]:
        lines += ["Warnings:", ""] + [f"- {line}" for line in report["warnings"]] + [""]
    budget = report["budget"]
    lines.append(f"Ran in {budget['wall_seconds'] / 60:.1f} min wall, {budget['cpu_seconds'] / 60:.1f} CPU-minutes "
                 f"(a 2048^2 float32 product at {budget['matmul_gflops']} GFLOP/s at the start).")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

    config = FLAGS.config
    for name in ("arms", "seeds", "match_parameters"):
        if getattr(FLAGS, name) is not None:
            config[name] = getattr(FLAGS, name)
    start = time.time()
    with boundary():
        report = run(config, FLAGS.workdir)
    print(f"done in {time.time() - start:.0f} s ({FLAGS.workdir}/token_order.json, token_order.md):")
    print(summary_table(report))


if __name__ == "__main__":
    from nativetok_jax.command import config_flags_parser

    define_flags()
    app.run(main, flags_parser=config_flags_parser)
