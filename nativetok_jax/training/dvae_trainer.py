"""The Dynamic VAE trainer (``task="dvae"``): ``train_dvae(config, workdir)``, on the shared loop.

Objective (:func:`dvae_objective`): each batch is routed by the config's router (entropy
thresholds, or a fixed-grain mode), encoded to the routed posterior, sampled (noise drawn per
grain and neighbour-copied) and decoded; the loss is the project's pixel loss (L1 or L2), LPIPS
and hinge patch GAN with VQGAN's adaptive weight (``tokenizer_objective.reconstruction_terms``,
the discriminator an extra part of the state), plus the KL in which a coarse code counts once.

KL scale [A: LDM's ``LPIPSWithDiscriminator``]: LDM sums the pixel loss and the KL over each
image and weighs the KL by 1e-6; our pixel loss is a mean over pixels and channels, so the KL
term is ``kl_weight * KL nats per image / (H * W * 3)``, the same ratio.

At the end the latent scale (``1 / std`` of routed training latents, each code once) is
estimated with the final (EMA) weights on ``train.latent_scale_batches`` training batches (the
first ones the run saw, posterior samples), with the realised fine fraction of those crops
overall and per class, and written to ``<workdir>/latent_scale.json`` beside the checkpoints
(``DVAE.from_checkpoint`` reads it). Held-out evaluation: PSNR overall and per routed grain, the
fine fraction, SSIM; grids of inputs, reconstructions and grain maps.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from nativetok_jax.workdir import write_config
from nativetok_jax import sharding, storage
from nativetok_jax.config import ConfigError, adversarial_start_step, validate_dvae
from nativetok_jax.data.pipeline import SkippedImages, eval_images, train_iterator
from nativetok_jax.data.sources import describe_data, open_sources
from nativetok_jax.dvae import DVAE, LATENT_SCALE_FILE
from nativetok_jax.evaluation.dvae_metrics import evaluate_dvae
from nativetok_jax.models.d2it import grain_router
from nativetok_jax.models.d2it.dvae import DVAEConfig, DynamicVAE, build_dvae, kl_divergence, latent_scale_of, sample_latents
from nativetok_jax.models.pixels import images_to_model
from nativetok_jax.training import loop
from nativetok_jax.training.adversarial import Discriminator, build_discriminator, uses_discriminator
from nativetok_jax.training.networks import FrozenNetworks, load_networks
from nativetok_jax.training.state import BuiltState, TrainState, build_state
from nativetok_jax.training.step import Objective, StepContext
from nativetok_jax.training.tokenizer_objective import (
    discriminator_update,
    image_batch_shardings,
    reconstruction_terms,
)


def dvae_objective(
    graphdef: nnx.GraphDef,
    config: ml_collections.ConfigDict,
    router: grain_router.GrainRouter,
    networks: FrozenNetworks | None = None,
    discriminator: Discriminator | None = None,
) -> Objective:
    """The DVAE's loss of ``config.train.losses`` (and the discriminator's update when there is one);
    batches ``{"image": uint8 [B, H, W, 3]}``. Metrics add ``kl`` (nats per image) and
    ``fine_fraction`` (of the batch's regions)."""
    weights = config.train.losses
    networks = networks or FrozenNetworks({}, {})

    def loss(params: Any, batch: dict[str, jax.Array], context: StepContext):
        route_key, sample_key = jax.random.split(context.key)
        grains = router(batch["image"], route_key)
        images = images_to_model(batch["image"])
        model: DynamicVAE = nnx.merge(graphdef, params)
        posterior = model.posterior(images, grains)
        latents = sample_latents(posterior, grains, sample_key)
        features, shortcut = model.decoder_parts(latents, grains)  # shortcut 0.0 without the block-mean one

        def readout(features, kernel):
            return model.decoder_readout(features, kernel) + shortcut

        terms, metrics, reconstruction = reconstruction_terms(
            weights, images, features, model.last_kernel, readout, context, networks, discriminator,
            adversarial_start_step(config.train))
        kl = jnp.mean(kl_divergence(posterior, grains))
        terms["kl_loss"] = weights.kl_weight * kl / np.prod(images.shape[1:])
        metrics.update(kl=kl, fine_fraction=jnp.mean((grains > 0).astype(jnp.float32)))
        return sum(terms.values()), (dict(metrics, **terms), reconstruction)

    return Objective(loss, discriminator_update(discriminator, adversarial_start_step(config.train)),
                     networks.arrays if networks.arrays else None)


def build_dvae_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     rules: sharding.Rules) -> tuple[BuiltState, Discriminator | None]:
    """The DVAE of ``config.model`` with its optimiser and EMA on ``mesh``, and the patch
    discriminator (an extra part of the state) when the losses use one."""
    built = build_state(lambda r: build_dvae(config.model, r), train=config.train, mesh=mesh, rules=rules)
    discriminator = None
    if uses_discriminator(config):
        discriminator, part, part_shardings = build_discriminator(config, config.train.num_steps, mesh, rules)
        built.add_part("discriminator", part, part_shardings)
    return built, discriminator


THRESHOLDS_FILE = "grain_thresholds.json"  # the run's own copy of the thresholds it routes with
# What a thresholds file must have been measured on to route this run's crops at its fine ratio.
MEASURED_ON = (("image_size", "model.image_size"), ("crop_min", "data.crop_min"), ("crop_max", "data.crop_max"))


def pin_thresholds(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> ml_collections.ConfigDict:
    """The config to record in ``config.json``: with entropy routing, ``model.grain.thresholds``
    names the run's own copy of the thresholds file (``WORKDIR/grain_thresholds.json``, written at
    the first start), so a file regenerated later at the original path cannot re-route the trained
    model (``DVAE.from_checkpoint`` and D²iT read the copy). Other routings: ``config`` unchanged.

    Raises:
      ConfigError: the file was measured on other images than this run's (image size, crop
        scales: its regions' entropies, hence its fine fraction, differ), or a resumed run is
        given a file whose thresholds differ from the copy it trained with.
      GrainError: the file is missing, unreadable, or of other entropy settings.
    """
    model = config.model
    if model.grain.routing != "entropy":
        return config
    named = storage.path(model.grain.thresholds)
    measured = grain_router.GrainThresholds.load(str(named), DVAEConfig.from_model_config(model).entropy_settings)
    wanted = dict(image_size=model.image_size, crop_min=config.data.crop_min, crop_max=config.data.crop_max)
    other = [f"{field} {measured.data[key]!r} (this run: {wanted[key]!r})" for key, field in MEASURED_ON
             if key in measured.data and measured.data[key] != wanted[key]]
    if other:
        raise ConfigError(f"config.model.grain.thresholds: {named} was measured on other images: {', '.join(other)}; "
                          "measure this run's with `python -m nativetok_jax.grain_thresholds --config C --out T.json`")
    copy = storage.path(workdir) / THRESHOLDS_FILE
    if copy.exists():
        trained = grain_router.GrainThresholds.load(str(copy))
        if named != copy and trained.percentiles != measured.percentiles:
            raise ConfigError(f"config.model.grain.thresholds: {named} differs from the thresholds this run trained "
                              f"with ({copy}); name that copy to resume, or give a new --workdir")
    elif jax.process_index() == 0:
        storage.write_text(copy, named.read_text())
    pinned = config.copy_and_resolve_references()
    pinned.model.grain.thresholds = str(copy)
    return pinned


def train_dvae(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, Any]:
    """Trains the Dynamic VAE of ``config`` in ``workdir`` (resuming when it holds checkpoints);
    writes ``latent_scale.json`` and ``eval.json``; returns the final evaluation summary."""
    validate_dvae(config)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_of(config)
    train, data = config.train, config.data
    size = config.model.image_size
    train_source, eval_source = open_sources(data, data.num_eval_images)
    skipped = SkippedImages()
    held_out = eval_images(data, eval_source, image_size=size, num_images=data.num_eval_images, seed=train.seed,
                           skipped=skipped)
    pinned = pin_thresholds(config, workdir)  # before anything else is written to the workdir
    if is_main:
        write_config(workdir, pinned)
    networks = load_networks(config)
    built, discriminator = build_dvae_state(config, mesh, rules)

    def batches(seed: int) -> Any:
        return train_iterator(data, train_source, image_size=size, batch_size=train.batch_size // jax.process_count(),
                              seed=seed, process_index=jax.process_index(), process_count=jax.process_count(),
                              skipped=skipped)

    evaluator = DVAE.from_params(config, built.state["params"], mesh=mesh)
    objective = dvae_objective(built.graphdef, config, evaluator.router, networks, discriminator)
    task = loop.Task(
        built, objective, batches(train.seed), image_batch_shardings(mesh, config, train.batch_size),
        evaluate=lambda state, step, outputs: _evaluate(evaluator, state, held_out, step, outputs, train.seed),
        log_scalars=lambda: {"skipped_images": skipped.count}, name="dvae",
    )
    result = loop.run(task, train, workdir)
    final = evaluator.with_params(result.state["ema"] or result.state["params"])
    scale = estimate_latent_scale(final, batches(train.seed), train.latent_scale_batches, train.seed)
    scale.update(step=result.step, use_ema=bool(result.state["ema"]))
    if is_main:
        storage.write_json(epath.Path(workdir) / LATENT_SCALE_FILE, scale)
    summary = dict(step=result.step, **result.metrics, latent_scale=scale["latent_scale"],
                   train_fine_fraction=scale["fine_fraction"],
                   train_fine_fraction_per_class=scale["fine_fraction_per_class"],
                   skipped_images=skipped.count, skipped_examples=skipped.examples,
                   data=describe_data(data, train_source, eval_source))
    loop.write_summary(workdir, summary)
    logging.info("latent scale %.4f from %d training crops; their fine fraction %.4f (per class %s)",
                 scale["latent_scale"], scale["num_images"], scale["fine_fraction"], scale["fine_fraction_per_class"])
    return summary


def estimate_latent_scale(dvae: DVAE, batches: Any, num_batches: int, seed: int) -> dict[str, Any]:
    """``1 / std`` of routed posterior samples of ``num_batches`` batches (every code once), and the
    realised fine fraction of those images, overall and per class."""
    latents, grains, labels = [], [], []
    for index in range(num_batches):
        batch = next(batches)
        sample, grain_map = dvae.encode(batch["image"], sample=True, seed=jax.random.fold_in(jax.random.key(seed), index))
        latents.append(np.asarray(sample))
        grains.append(np.asarray(grain_map))
        labels.append(np.asarray(batch["label"]))
    latents, grains, labels = np.concatenate(latents), np.concatenate(grains), np.concatenate(labels)
    fine = (grains > 0).reshape(len(grains), -1)
    per_class = {str(c): float(fine[labels == c].mean()) for c in np.unique(labels)}
    return {"latent_scale": latent_scale_of(jnp.asarray(latents), jnp.asarray(grains)),
            "num_images": int(len(latents)), "fine_fraction": float(fine.mean()), "fine_fraction_per_class": per_class,
            "estimated_on": "posterior samples of the first training batches (seed train.seed), routed by the "
                            "model's router; std over every code once (coarse copies weighted 1/4)"}


def _evaluate(evaluator: DVAE, state: TrainState, images: np.ndarray, step: int, outputs: loop.Outputs,
              seed: int) -> dict[str, Any]:
    """Held-out quality (EMA weights when kept): PSNR overall and per grain, fine fraction, and the
    block means of the model's own routing at the same number of codes (``block_mean_psnr``); grids."""
    dvae = evaluator.with_params(loop.evaluation_params(state))
    rows: list[np.ndarray] = []
    batch = min(len(images), 64)
    metrics, _ = evaluate_dvae(dvae, (images[i:i + batch] for i in range(0, len(images), batch)), shown=rows, seed=seed)
    outputs.grid("reconstructions", step, rows, upscale=max(1, 96 // dvae.image_size))
    logging.info("step %d: held-out PSNR %.2f dB (fine regions %s, coarse %s), fine fraction %.3f; block means of "
                 "its routing %.2f dB at %.1f codes per image", step, metrics["psnr"], _db(metrics["psnr_fine"]),
                 _db(metrics["psnr_coarse"]), metrics["fine_fraction"], metrics["block_mean_psnr"],
                 metrics["codes_per_image"])
    return metrics


def _db(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} dB"
