"""The tokenizer trainer: ``train_and_evaluate(config, workdir)``, read top to bottom.

For each stage (one, or the Hierarchical Native Training stages): build the state on the mesh
(``build_state``, freezing what the stage names), state the objective (``tokenizer_objective``),
and hand both to the shared loop (``loop.run``), which resumes from the stage's newest
checkpoint, else grows the previous stage's final state (raw from raw, EMA from EMA), else starts
fresh; trains; logs, evaluates and checkpoints on their schedules; stops cleanly when preempted.
What is particular to the tokenizer is here: the codebook fit at the end of the quantiser
warm-up, and held-out reconstructions next to the no-model baselines. Only process 0 writes
logs, images and configs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from nativetok_jax.workdir import write_config
from nativetok_jax import sharding
from nativetok_jax.config import validate_training
from nativetok_jax.data.pipeline import SkippedImages, eval_images, train_iterator
from nativetok_jax.data.sources import describe_data, open_sources
from nativetok_jax.evaluation.metrics import psnr
from nativetok_jax.evaluation.plots import plot_rate_distortion
from nativetok_jax.evaluation.rate_distortion import MEAN_COLOUR
from nativetok_jax.evaluation.reconstruction import evaluate_reconstruction
from nativetok_jax.layers.partitioning import axis_rules
from nativetok_jax.models.nativetok import build_model, colour_id_count
from nativetok_jax.tokenizer import Tokenizer
from nativetok_jax.training import hnt, loop
from nativetok_jax.training.adversarial import build_discriminator, uses_discriminator
from nativetok_jax.training.codebook import (batches_needed, care_at, encoder_outputs, fit_codebook,
                                             restart_dead_codes)
from nativetok_jax.training.loop import Task
from nativetok_jax.training.networks import load_networks, needs_lpips, needs_vqgan
from nativetok_jax.training.state import BuiltState, TrainState, build_state, map_params_state
from nativetok_jax.training.tokenizer_objective import image_batch_shardings, tokenizer_objective


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, Any]:
    """Trains every stage of ``config`` in ``workdir``; returns the final evaluation summary."""
    validate_training(config)
    stages = hnt.stage_list(config)
    multi_stage = bool(config.hnt.stages)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_of(config)

    train_source, eval_source = open_sources(config.data, config.data.num_eval_images)
    skipped = SkippedImages()
    evaluation_images = eval_images(
        config.data, eval_source, image_size=config.model.image_size,
        num_images=config.data.num_eval_images, seed=config.train.seed, skipped=skipped,
    )
    stage_configs = [hnt.stage_config(config, stage) for stage in stages]
    for stage_config in stage_configs:  # every stage's config, before anything is built
        validate_training(stage_config)
    if multi_stage:  # a stage's overrides that change a shape, before any stage trains
        hnt.check_growth(stage_configs, build_model)
    # A later stage's pretrained files are read now, not after the stages before it have trained
    # (the recipe's decoder fine-tune is the first to use LPIPS: a file of another kind failed
    # after the proxy-code stage's million steps). The first stage reads its own when it starts.
    first = stage_configs[0]
    for later in stage_configs[1:]:
        if (needs_lpips(later) and not needs_lpips(first)) or (needs_vqgan(later) and not needs_vqgan(first)):
            load_networks(later)
    resolved = ml_collections.ConfigDict(config.to_dict())
    if multi_stage:
        resolved.hnt.stages = tuple(s.to_dict() for s in stages)
    if is_main:
        write_config(workdir, resolved)

    summary: dict[str, Any] = {"stages": []}
    colour_ids = colour_id_count(config.model)
    previous: tuple[epath.Path, int] | None = None
    for index, stage in enumerate(stages):
        stage_dir = hnt.stage_directory(workdir, stage, multi_stage)
        result = _train_stage(config, stage, index, stage_dir, previous, mesh, rules, train_source,
                              evaluation_images, skipped)
        # The code's length: the stage's learned tokens and the mean-colour shortcut's ids, if any.
        colour = {"colour_ids": colour_ids} if colour_ids else {}
        summary["stages"].append(dict(name=stage.name or "main", num_tokens=stage.num_tokens + colour_ids, **colour,
                                      **result))
        previous = (stage_dir, stage.num_tokens)
    summary.update(summary["stages"][-1], skipped_images=skipped.count, skipped_examples=skipped.examples,
                   data=describe_data(config.data, train_source, eval_source))
    loop.write_summary(workdir, summary)
    return summary


def _train_stage(
    config: ml_collections.ConfigDict,
    stage: ml_collections.ConfigDict,
    index: int,
    stage_dir: epath.Path,
    previous: tuple[epath.Path, int] | None,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules,
    train_source: Any,
    evaluation_images: np.ndarray,
    skipped: SkippedImages,
) -> dict[str, Any]:
    is_main = jax.process_index() == 0
    config = hnt.stage_config(config, stage)
    networks = load_networks(config)
    train = config.train
    if is_main:
        write_config(stage_dir, config)
    logging.info("stage %s: %d tokens, %d steps, frozen %s", stage.name or "main", stage.num_tokens,
                 stage.num_steps, list(stage.frozen) or "nothing")

    frozen = tuple(stage.frozen)
    num_old_tokens = previous[1] if previous else 0
    built = build_state(lambda r: build_model(config.model, r), train=train, mesh=mesh, rules=rules,
                        freeze=(lambda p: hnt.trainable_mask(p, frozen, num_old_tokens)) if frozen else None)
    discriminator = None
    if uses_discriminator(config):  # trained beside the tokenizer, in the same state and checkpoints
        discriminator, part, part_shardings = build_discriminator(config, stage.num_steps, mesh, rules)
        built.add_part("discriminator", part, part_shardings)

    # Each stage draws its own batches, crops and per-step randomness: stages count their steps from
    # 0, so with the run's seed every later stage replayed the first stage's stream from its start.
    # The first stage (and a one-stage run) keeps train.seed; config.json records the run's seed.
    seeded = ml_collections.ConfigDict(config.to_dict())
    seeded.train.seed = hnt.stage_seed(train.seed, index)
    # Data: this process's share of every global batch.
    iterator = train_iterator(
        config.data, train_source, image_size=config.model.image_size,
        batch_size=train.batch_size // jax.process_count(), seed=seeded.train.seed,
        process_index=jax.process_index(), process_count=jax.process_count(), skipped=skipped,
    )
    shardings = image_batch_shardings(mesh, config, train.batch_size)
    warmup = stage.quantizer_warmup_steps
    objective = tokenizer_objective(
        built.graphdef, seeded, num_tokens=stage.num_tokens, quantizer_warmup_steps=warmup,
        frozen_experts=hnt.frozen_expert_count(frozen, num_old_tokens, stage.num_tokens)
        if config.model.kind == "nativetok" else 0,
        networks=networks, discriminator=discriminator,
    )
    proxy_decoder = networks.module(networks.arrays, "proxy") if "proxy" in networks else None
    # Shares the arrays, no host copy.
    evaluator = Tokenizer.from_params(config, built.state["params"], mesh=mesh, proxy_decoder=proxy_decoder)
    restart_every = 0 if "quantizer" in frozen else train.codebook.restart_dead_every  # a frozen codebook stays
    care = CodebookFit(built, seeded, shardings["image"]) if warmup or restart_every else None

    def before_step(state: TrainState, step: int) -> TrainState:
        event = care_at(step, warmup, restart_every)
        if event == "fit":
            return care(state, iterator)
        return care.restart(state, iterator) if event == "restart" else state

    task = Task(
        built, objective, iterator, shardings,
        evaluate=lambda state, step, outputs: _evaluate(evaluator, state, evaluation_images, config, step, outputs,
                                                        quantizer_warmup_steps=warmup),
        grow=(lambda state: hnt.grow_state(state, built, previous[0])) if previous else None,
        before_step=before_step if care else None,
        log_scalars=lambda: {"skipped_images": skipped.count},
        name=f"stage {stage.name}" if stage.name else "tokenizer",
    )
    result = loop.run(task, train, stage_dir)
    return dict(step=result.step, **result.metrics)


class CodebookFit:
    """The codebook's care during training (training/codebook.py): at the end of the quantiser
    warm-up the codebook (and its EMA) is fitted to encoder outputs and its Adam moments are zeroed
    (the old codebook's moments say nothing about the new one). optax keeps one step count for
    every parameter, so the zeroed moments get no bias correction: with betas 0.9 / 0.99 a row's
    updates are up to 2.13x a fresh Adam's (its 13th), 1.26x by its 100th (for a steady gradient). Every
    ``train.codebook.restart_dead_every`` quantised steps after that, the dead codes are re-seeded
    and their moments zeroed. Both read batches of their own from the training iterator."""

    def __init__(self, built: BuiltState, config: ml_collections.ConfigDict, image_sharding: jax.sharding.NamedSharding):
        self.config, self.image_sharding = config, image_sharding
        care = config.train.codebook
        size = config.model.quantizer.codebook_size
        self.count = batches_needed(size, config.train.batch_size, config.model.num_tokens,
                                    per_code=care.samples_per_code)
        graphdef, optimizer = built.graphdef, built.optimizer
        is_codebook = traverse_util.unflatten_dict({
            path: path == ("quantizer", "codebook") for path in traverse_util.flatten_dict(built.state["params"])})

        def replace(state: TrainState, codebook: jax.Array, renewed: jax.Array) -> TrainState:
            """``state`` with ``codebook``; the rows where ``renewed`` ``[K]`` holds take the codebook
            into the EMA too, and lose their Adam moments."""
            params = {**state["params"], "quantizer": {**state["params"]["quantizer"], "codebook": codebook}}
            opt_state = map_params_state(
                optimizer, lambda moment, own: jnp.where(renewed[:, None], 0.0, moment).astype(moment.dtype) if own else moment,
                state["opt_state"], is_codebook, transform_non_params=lambda x: x)
            ema = state["ema"]
            if ema:
                old = ema["quantizer"]["codebook"]
                ema = {**ema, "quantizer": {**ema["quantizer"], "codebook": jnp.where(renewed[:, None], codebook, old)}}
            return {**state, "params": params, "ema": ema, "opt_state": opt_state}

        def fit(state: TrainState, points: jax.Array) -> TrainState:
            key = jax.random.fold_in(jax.random.key(config.train.seed), state["step"])
            codebook = fit_codebook(points, size, key, care.kmeans_iterations)
            return replace(state, codebook, jnp.ones((size,), bool))

        def restart(state: TrainState, points: jax.Array) -> tuple[TrainState, jax.Array]:
            key = jax.random.fold_in(jax.random.key(config.train.seed + 1), state["step"])
            codebook, dead = restart_dead_codes(points, state["params"]["quantizer"]["codebook"], key)
            return replace(state, codebook, dead), dead.sum()

        self._encode = jax.jit(lambda params, images: encoder_outputs(graphdef, params, images))
        self._fit = jax.jit(fit, out_shardings=built.shardings, donate_argnums=0)
        self._restart = jax.jit(restart, out_shardings=(built.shardings, None), donate_argnums=0)
        self.mesh, self.rules = built.mesh, built.rules

    def _points(self, state: TrainState, iterator: Any) -> jax.Array:
        """Encoder outputs of ``self.count`` batches drawn from ``iterator``, ``[N, D]``."""
        points = []
        for _ in range(self.count):
            images = jax.make_array_from_process_local_data(self.image_sharding, next(iterator)["image"])
            points.append(self._encode(state["params"], images))
        return jnp.concatenate(points) if len(points) > 1 else points[0]

    def __call__(self, state: TrainState, iterator: Any) -> TrainState:
        """The fit at the end of the warm-up."""
        with jax.set_mesh(self.mesh), axis_rules(self.rules):  # the encoder's activation constraints
            points = self._points(state, iterator)
            state = self._fit(state, points)
        logging.info("fitted the codebook to %d encoder outputs (%d k-means iterations) at step %d; its Adam "
                     "moments zeroed", points.shape[0], self.config.train.codebook.kmeans_iterations,
                     int(jax.device_get(state["step"])))
        return state

    def restart(self, state: TrainState, iterator: Any) -> TrainState:
        """Dead codes re-seeded (training/codebook.py ``restart_dead_codes``)."""
        with jax.set_mesh(self.mesh), axis_rules(self.rules):
            points = self._points(state, iterator)
            state, dead = self._restart(state, points)
        logging.info("step %d: re-seeded %d codes that none of %d encoder outputs chose",
                     int(jax.device_get(state["step"])), int(jax.device_get(dead)), points.shape[0])
        return state


def _evaluate(
    evaluator: Tokenizer,
    state: TrainState,
    images: np.ndarray,
    config: ml_collections.ConfigDict,
    step: int,
    outputs: loop.Outputs,
    quantizer_warmup_steps: int = 0,
) -> dict[str, float]:
    """Held-out reconstruction quality (EMA weights when kept) next to the no-model baselines: the
    same-bits thumbnail and the mean colour at every prefix length (``rate_distortion``, plotted to
    ``images/rate_distortion_<step>.png``), and at all tokens as ``baseline_psnr_<codec>``.

    With a pixel head, also ``psnr_continuous``: the same images through the continuous tokens.
    Up to step ``quantizer_warmup_steps`` that is what trains (``quantized`` is 0 then): the
    codebook is not fitted yet, so the codes' ``psnr`` says nothing about the model and the log
    line leads with the continuous figure."""
    weights = loop.evaluation_params(state)
    tokenizer = evaluator.with_params(weights)
    batch_size = min(len(images), 64)
    metrics, rows = evaluate_reconstruction(tokenizer, images, batch_size=batch_size)
    whole = metrics["rate_distortion"][-1]  # all tokens
    baselines = {MEAN_COLOUR: whole[f"{MEAN_COLOUR}_psnr"], whole["same_bits_codec"]: whole["thumbnail_psnr"]}
    metrics.update({f"baseline_psnr_{name}": value for name, value in baselines.items()})
    # How often the codes beat the same-bits codec, beside the means (evaluation/rate_distortion.py).
    metrics["psnr_win_rate"] = whole["psnr_win_rate"]
    metrics["psnr_margin"] = whole["psnr_margin"]
    metrics["psnr_margin_ci95_low"], metrics["psnr_margin_ci95_high"] = whole["psnr_margin_ci95"]
    # The loop evaluates after step ``step`` and fits the codebook before the next one, so at the
    # warm-up's last step the codes are still unfitted.
    quantized = not quantizer_warmup_steps or step > quantizer_warmup_steps
    metrics["quantized"] = float(quantized)
    if config.model.decoder.head != "proxy_codes":
        continuous = [np.asarray(tokenizer.reconstruct_continuous(images[i : i + batch_size]))
                      for i in range(0, len(images), batch_size)]
        metrics["psnr_continuous"] = psnr(images, np.concatenate(continuous))
    outputs.grid("reconstructions", step, rows, upscale=max(1, 96 // config.model.image_size))
    outputs.plot("rate_distortion", step, lambda path: plot_rate_distortion(metrics["rate_distortion"], path))
    previews = {k: round(v, 2) for k, v in metrics.items() if k.startswith("psnr_first")}
    rounded = {k: round(v, 2) for k, v in baselines.items()}
    if quantized:
        logging.info("step %d: held-out PSNR %.2f dB (first-token previews %s; baselines %s; %+.2f dB from the "
                     "same-bits codec, 95 %% interval %+.2f to %+.2f, above it on %.0f %% of the images)", step,
                     metrics["psnr"], previews, rounded, metrics["psnr_margin"], metrics["psnr_margin_ci95_low"],
                     metrics["psnr_margin_ci95_high"], 100 * metrics["psnr_win_rate"])
    else:
        logging.info("step %d: held-out PSNR %.2f dB through the continuous tokens (the quantiser starts at step %d; "
                     "through the not yet fitted codebook %.2f dB; baselines %s)", step, metrics.get("psnr_continuous", np.nan),
                     quantizer_warmup_steps, metrics["psnr"], rounded)
    return metrics
