"""The trainer: ``train_and_evaluate(config, workdir)``, read top to bottom.

For each stage (one, or the Hierarchical Native Training stages): build the model on the mesh;
decide how to initialise (resume from this stage's newest checkpoint, else grow the previous
stage's final parameters, else start fresh); train with the sharded step; log, evaluate and
checkpoint on their schedules; stop cleanly on SIGTERM after saving. A non-finite loss stops
the run before anything bad is saved. Only process 0 writes logs, images and configs.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from nativetok_jax import checkpoints, sharding
from nativetok_jax.config import validate_training
from nativetok_jax.data.pipeline import SkippedImages, eval_images, train_iterator
from nativetok_jax.data.sources import open_sources
from nativetok_jax.evaluation.baselines import baseline_psnrs
from nativetok_jax.evaluation.grids import save_grid
from nativetok_jax.evaluation.reconstruction import evaluate_reconstruction
from nativetok_jax.models import build_model
from nativetok_jax.tokenizer import Tokenizer
from nativetok_jax.training import hnt, tensorboard
from nativetok_jax.training.adversarial import build_discriminator, uses_discriminator
from nativetok_jax.training.codebook import batches_needed, fit_codebook
from nativetok_jax.training.guards import Preempted, Preemption, check_finite
from nativetok_jax.training.networks import load_networks
from nativetok_jax.training.optimizer import make_optimizer
from nativetok_jax.training.progress import ReportProgress
from nativetok_jax.training.state import init_state, state_shardings
from nativetok_jax.training.step import label_sharding, make_train_step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
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
    for stage in stages:  # every stage's config, before anything is built
        validate_training(hnt.stage_config(config, stage))
    resolved = ml_collections.ConfigDict(config.to_dict())
    if multi_stage:
        resolved.hnt.stages = tuple(s.to_dict() for s in stages)
    if is_main:
        checkpoints.write_config(workdir, resolved)

    summary: dict[str, Any] = {"stages": []}
    previous: tuple[str, int] | None = None
    for stage in stages:
        stage_dir = hnt.stage_directory(workdir, stage, multi_stage)
        result = _train_stage(config, stage, stage_dir, previous, mesh, rules, train_source,
                              evaluation_images, skipped)
        summary["stages"].append(dict(name=stage.name or "main", num_tokens=stage.num_tokens, **result))
        previous = (stage_dir, stage.num_tokens)
    summary.update(summary["stages"][-1], skipped_images=skipped.count, skipped_examples=skipped.examples)
    if is_main:
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _train_stage(
    config: ml_collections.ConfigDict,
    stage: ml_collections.ConfigDict,
    stage_dir: str,
    previous: tuple[str, int] | None,
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
        checkpoints.write_config(stage_dir, config)
    logging.info("stage %s: %d tokens, %d steps, frozen %s", stage.name or "main", stage.num_tokens,
                 stage.num_steps, list(stage.frozen) or "nothing")

    # Model and parameters, initialised straight into their shardings.
    graphdef, params, param_shardings = sharding.init_sharded(
        lambda r: build_model(config.model, r), train.seed, mesh, rules
    )
    store = checkpoints.Checkpoints(checkpoints.checkpoint_directory(stage_dir), train.keep_checkpoints)
    latest = store.latest_step()
    num_old_tokens = previous[1] if previous else 0
    if latest is None and previous is not None:
        old_params, old_step = checkpoints.load_params(previous[0], use_ema=False)
        logging.info("growing %d -> %d tokens from %s (step %d)", num_old_tokens, stage.num_tokens, previous[0], old_step)
        params = jax.device_put(hnt.grow_params(old_params, params), param_shardings)

    # Optimiser and train state.
    frozen = tuple(stage.frozen)
    trainable = hnt.trainable_mask(params, frozen, num_old_tokens) if frozen else None
    optimizer = make_optimizer(train, stage.num_steps, params, trainable)
    keep_ema = train.ema_decay > 0
    shardings = state_shardings(param_shardings, optimizer, params, mesh, keep_ema)
    state = jax.jit(lambda p: init_state(p, optimizer, keep_ema), out_shardings=shardings)(params)
    del params
    discriminator = None
    if uses_discriminator(config):  # trained beside the tokenizer, in the same state and checkpoints
        discriminator, state["discriminator"], shardings["discriminator"] = build_discriminator(
            config, stage.num_steps, mesh, rules)

    # Data: this process's share of every global batch.
    local_batch = train.batch_size // jax.process_count()
    iterator = train_iterator(
        config.data, train_source, image_size=config.model.image_size, batch_size=local_batch,
        seed=train.seed, process_index=jax.process_index(), process_count=jax.process_count(), skipped=skipped,
    )
    if latest is not None:
        state = store.restore(latest, jax.tree.map(_abstract, state, shardings), iterator)
        logging.info("resumed from %s at step %d", store.directory, latest)
    step = int(jax.device_get(state["step"]))

    image_sharding = sharding.batch_sharding(mesh, (train.batch_size, config.model.image_size,
                                                    config.model.image_size, 3))
    labels_sharding = label_sharding(image_sharding)
    frozen_encoder = "mit" in frozen or "encoder" in frozen
    warmup = stage.quantizer_warmup_steps
    train_step = make_train_step(
        graphdef, optimizer, config, num_tokens=stage.num_tokens, quantizer_warmup_steps=warmup,
        frozen_encoder=frozen_encoder,
        frozen_experts=hnt.frozen_expert_count(frozen, num_old_tokens, stage.num_tokens)
        if config.model.kind == "nativetok" else 0,
        state_shardings=shardings, batch_sharding=image_sharding, networks=networks, discriminator=discriminator,
    )
    proxy_decoder = networks.module(networks.arrays, "proxy") if "proxy" in networks else None
    # Shares the arrays, no host copy.
    evaluator = Tokenizer.from_params(config, state["params"], mesh=mesh, proxy_decoder=proxy_decoder)
    writer = tensorboard.create_writer(stage_dir, just_logging=not is_main)
    progress = ReportProgress(num_train_steps=stage.num_steps, writer=writer,
                                               every_steps=train.log_every)
    preemption = Preemption()
    last_saved = latest
    metrics: dict[str, Any] = {}
    try:
        while step < stage.num_steps:
            if warmup and step == warmup:
                state = _fit_codebook(state, graphdef, iterator, config, image_sharding, shardings["params"])
            batch = next(iterator)
            batch = {
                "image": jax.make_array_from_process_local_data(image_sharding, batch["image"]),
                "label": jax.make_array_from_process_local_data(labels_sharding, batch["label"]),
            }
            with jax.set_mesh(mesh):
                state, step_metrics = train_step(state, batch)
            step += 1
            progress(step)
            last = step == stage.num_steps
            log = step % train.log_every == 0 or last
            stop = step % train.log_every == 0 and preemption.agreed()
            save = step % train.checkpoint_every == 0 or last or stop
            if log or save:  # every logged or saved state is checked first
                values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                check_finite(values, step, store.directory, last_saved)
            if log:
                writer.write_scalars(step, dict(values, skipped_images=skipped.count))
            if step % train.eval_every == 0 or last:
                with progress.timed("eval"):
                    metrics = _evaluate(evaluator, state, evaluation_images, config, step, stage_dir, writer)
            if save:
                store.save(step, state, iterator)
                last_saved = step
            if stop:
                raise Preempted(f"preempted at step {step}; checkpoint saved in {store.directory}")
        if not metrics:  # the stage was already complete: evaluate what it left.
            metrics = _evaluate(evaluator, state, evaluation_images, config, step, stage_dir, writer)
    finally:
        preemption.restore()
        writer.flush()
        store.close()
    return dict(step=step, **metrics)


def _fit_codebook(state, graphdef, iterator, config, image_sharding, param_shardings):
    """End of the quantiser warm-up: the codebook (and its EMA) become encoder outputs."""
    count = batches_needed(config.model.quantizer.codebook_size, config.train.batch_size, config.model.num_tokens)
    images = [jax.make_array_from_process_local_data(image_sharding, next(iterator)["image"]) for _ in range(count)]
    images = jax.numpy.concatenate(images) if count > 1 else images[0]
    key = jax.random.fold_in(jax.random.key(config.train.seed), int(jax.device_get(state["step"])))
    fit = jax.jit(lambda p, x: fit_codebook(graphdef, p, x, key), out_shardings=param_shardings, donate_argnums=0)
    params = fit(state["params"], images)
    ema = state["ema"]
    if ema:  # its own copy: the train step donates every buffer of the state once
        ema = {**ema, "quantizer": {**ema["quantizer"], "codebook": jax.numpy.copy(params["quantizer"]["codebook"])}}
    logging.info("fitted the codebook to %d encoder outputs at step %d", count * config.train.batch_size *
                 config.model.num_tokens, int(jax.device_get(state["step"])))
    return {**state, "params": params, "ema": ema}


def _abstract(array: jax.Array, sharding_: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=sharding_)


def _evaluate(
    evaluator: Tokenizer,
    state: dict[str, Any],
    images: np.ndarray,
    config: ml_collections.ConfigDict,
    step: int,
    stage_dir: str,
    writer: tensorboard.MetricWriter,
) -> dict[str, float]:
    """Held-out reconstruction quality (EMA weights when kept) next to the no-model baselines."""
    weights = state["ema"] if state["ema"] else state["params"]
    tokenizer = evaluator.with_params(weights)
    metrics, rows = evaluate_reconstruction(tokenizer, images, batch_size=min(len(images), 64))
    baselines = baseline_psnrs(images, config.model.num_tokens, config.model.quantizer.codebook_size)
    metrics.update({f"baseline_psnr_{name}": value for name, value in baselines.items()})
    writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    if jax.process_index() == 0:
        os.makedirs(os.path.join(stage_dir, "images"), exist_ok=True)
        path = os.path.join(stage_dir, "images", f"reconstructions_{step:07d}.png")
        upscale = max(1, 96 // config.model.image_size)
        writer.write_images(step, {"reconstructions": save_grid(path, rows, upscale=upscale)[None]})
    logging.info("step %d: held-out PSNR %.2f dB (first-token previews %s; baselines %s)", step, metrics["psnr"],
                 {k: round(v, 2) for k, v in metrics.items() if k.startswith("psnr_first")},
                 {k: round(v, 2) for k, v in baselines.items()})
    return metrics
