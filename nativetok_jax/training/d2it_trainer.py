"""The D²iT trainer (``task="d2it"``): ``train_d2it(config, workdir)``, read top to bottom.

Open the trained Dynamic VAE of ``config.dvae.workdir`` (its EMA weights and latent scale); encode
the training and held-out crops once into grain latent stores (routed posterior moments and grain
maps of each crop and its flip; :mod:`nativetok_jax.training.grain_latent_extraction`), kept in
the DVAE's workdir (``<dvae>/grain_latents``, or ``config.latents.directory``) so every D²iT run
on that DVAE shares them; build the Dynamic Diffusion Transformer (content and grain transformer
in one module, :mod:`nativetok_jax.models.d2it.dynamic_diffusion_transformer`, which says why one
state) on the mesh; train with the shared loop (``training/loop.py``). What is here is the loss,
the data and the evaluation; the loop, step and state builder are every trainer's.

Each step, for every example: a random one of its two stored orientations (DiT's flip), a latent
drawn from its routed posterior (noise drawn per grain and neighbour-copied, so a coarse region
stays one code) times the latent scale, its label dropped to the null class with
``model.label_drop_probability``; then

- the content transformer's DiT loss (epsilon MSE + the stop-gradient variational-bound term) on
  multi-grained noise, its outputs averaged over coarse copies, every position weighted by the
  dynamic grain loss (``model.diffusion.grain_loss``: (0.25, 1) counts each latent code once);
- the grain transformer's MaskGIT loss on the same grain maps and the examples' own labels (it
  drops them itself, at ``grain_transformer.label_drop_probability``);

``loss = content loss + train.grain_loss_weight * grain loss``, logged as ``content_loss``,
``mse``, ``vb``, ``grain_loss``, ``grain_accuracy``. Evaluations (EMA weights when kept): the
held-out epsilon-MSE at ``train.eval_timesteps`` (fixed multi-grained noise per example), the
grain transformer's held-out masked NLL (fixed masks), and a PNG grid of samples with their
grain maps (``train.preview``: grain maps drawn by the grain transformer, latents by DDIM).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from nativetok_jax import checkpoints, sharding, storage
from nativetok_jax.config import validate_d2it
from nativetok_jax.data.grain_latent_store import GrainLatentSource
from nativetok_jax.diffusion.gaussian import GaussianDiffusion, build_diffusion
from nativetok_jax.diffusion.losses import diffusion_loss, eps_mse_at
from nativetok_jax.diffusion.multi_grain import average_coarse, grain_loss_weights, multi_grain_noise
from nativetok_jax.dvae import DVAE
from nativetok_jax.evaluation.dvae_metrics import grid_with_grain_maps
from nativetok_jax.generation.d2it_sampling import D2iTSampler
from nativetok_jax.models.d2it.dvae import Posterior, sample_latents
from nativetok_jax.models.d2it.dynamic_diffusion_transformer import dynamic_diffusion_transformer_from_config
from nativetok_jax.models.d2it.grain_transformer import grain_transformer_loss
from nativetok_jax.training import loop
from nativetok_jax.training.diffusion_trainer import (
    HeldOutEpsMSE,
    random_orientations,
    StoreSources,
    store_sources,
)
from nativetok_jax.training.generator_trainer import token_iterator
from nativetok_jax.training.grain_latent_extraction import (
    dvae_upstream,
    extract_grain_latents,
    fine_fraction,
    open_dvae,
    store_directory,
)
from nativetok_jax.training.state import BuiltState, build_state
from nativetok_jax.training.step import Objective, StepContext, batch_shardings
from nativetok_jax.workdir import record_upstream, write_config

Batch = dict[str, jax.Array]


# --------------------------------------------------------------------------------- the latent stores

def grain_latent_stores(config: ml_collections.ConfigDict, dvae: DVAE, sources: StoreSources | None = None
                        ) -> tuple[GrainLatentSource, GrainLatentSource]:
    """The (train, held-out) grain latent stores of ``sources`` (default: ``config``'s,
    :func:`diffusion_trainer.store_sources`, whose crops they take) encoded by ``dvae``, encoded
    now unless finished matching stores exist.

    Raises:
      ConfigError: the data has more classes than ``model.num_classes``.
      TokenStoreError: a store directory holds latents made with other settings (one line; point
        ``config.latents.directory`` elsewhere).
    """
    sources = store_sources(config) if sources is None else sources
    data = config.data
    params_step = checkpoints.load_params(config.dvae.workdir)[1]
    workdir = config.dvae.workdir
    photo_labels = bool(data.get("photo_labels", False) and data.source == "photos")
    description = dict(dvae=storage.canonical(workdir), dvae_step=int(params_step),
                       source=data.source, path=data.path or data.tfds_name, photo_labels=photo_labels)
    directory = store_directory(config)
    common = dict(description=description, batch_size=config.latents.batch_size)
    train = extract_grain_latents(dvae, sources.train, directory / "train", data=sources.train_data,
                                  num_examples=sources.num_train, seed=config.train.seed, **common)
    held_out = extract_grain_latents(dvae, sources.held_out, directory / "eval", data=sources.held_out_data,
                                     num_examples=sources.num_held_out, seed=config.train.seed + 1, **common)
    return train, held_out


# ------------------------------------------------------------------------------------ the objective

def content_apply(model: Any, grains: jax.Array):
    """The content transformer as the diffusion code calls it, ``(x, t, labels) -> output``, with its
    outputs averaged over each coarse region's copies (a no-op when the network averages already)."""
    return lambda x, t, labels: average_coarse(model.content(x, t, labels, grains), grains)


def grain_noise(grains: jax.Array):
    """:data:`~nativetok_jax.diffusion.losses.NoiseFn` drawing multi-grained noise for ``grains``."""
    return lambda key, shape: multi_grain_noise(key, grains, shape[-1])


def d2it_objective(graphdef: nnx.GraphDef, diffusion: GaussianDiffusion, config: ml_collections.ConfigDict,
                   latent_scale: float) -> Objective:
    """Both transformers' loss on a batch ``{"mean", "logvar": [B, 2, h, w, C], "grains": [B, 2, gh, gw],
    "label": [B]}`` (module docstring)."""
    model_config = config.model
    coarse_weight, fine_weight = (float(w) for w in model_config.diffusion.grain_loss)
    grain_weight = float(config.train.grain_loss_weight)

    def loss(params: Any, batch: Batch, context: StepContext):
        model = nnx.merge(graphdef, params)
        flip_key, latent_key, drop_key, diffusion_key, grain_key = jax.random.split(context.key, 5)
        mean, logvar, grains = random_orientations(flip_key, batch["mean"], batch["logvar"], batch["grains"])
        x0 = sample_latents(Posterior(mean.astype(jnp.float32), logvar.astype(jnp.float32)), grains,
                            latent_key) * latent_scale
        labels = model.content.drop_labels(batch["label"], drop_key, model_config.label_drop_probability)
        content_loss, metrics = diffusion_loss(content_apply(model, grains), diffusion, x0, labels, diffusion_key,
                                               grain_loss_weights(grains, coarse_weight, fine_weight),
                                               noise_fn=grain_noise(grains))
        grain_loss, grain_metrics = grain_transformer_loss(model.grain, grains, batch["label"], grain_key)
        metrics = {"content_loss": content_loss, "mse": metrics["mse"], "vb": metrics["vb"],
                   "grain_loss": grain_loss, "grain_accuracy": grain_metrics["accuracy"],
                   "fine_fraction": grain_metrics["fine_fraction"]}
        return content_loss + grain_weight * grain_loss, (metrics, None)

    return Objective(loss)


def d2it_batch_shardings(mesh: jax.sharding.Mesh, dvae: DVAE, batch_size: int) -> dict[str, jax.sharding.NamedSharding]:
    moments = (batch_size, 2, *dvae.latent_shape)
    return batch_shardings(mesh, {"mean": moments, "logvar": moments, "grains": (batch_size, 2, *dvae.grain_map_shape),
                                  "label": (batch_size,)})


def build_d2it_state(config: ml_collections.ConfigDict, grain_shape: Sequence[int], mesh: jax.sharding.Mesh,
                     rules: Any) -> BuiltState:
    """Both transformers' sharded train state (``build_state``: AdamW, EMA) for ``config``."""
    return build_state(lambda r: dynamic_diffusion_transformer_from_config(config, grain_shape, r),
                       train=config.train, mesh=mesh, rules=rules)


# ---------------------------------------------------------------------------------------- training

def train_d2it(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, Any]:
    """Trains the D²iT ``config`` describes in ``workdir``; returns the final evaluation
    (``eps_mse_t100`` ..., ``grain_nll``; ``step``, store sizes), also written to ``eval.json``.

    Raises ``ConfigError`` (one line, before anything compiles) for a bad field or a DVAE workdir
    that does not fit, ``TokenStoreError`` for a store made with other settings."""
    validate_d2it(config)
    # The DVAE as an absolute path (a URL as it is): config.json then names the same run whatever
    # directory a later command (sample, a resume) runs in.
    config = config.copy_and_resolve_references()
    config.dvae.workdir = str(storage.path(config.dvae.workdir))
    model_config, train = config.model, config.train
    workdir = epath.Path(workdir)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_of(config)
    dvae = open_dvae(config, mesh)
    record_upstream(workdir, dvae_upstream(config, dvae), is_main=is_main)
    sources = store_sources(config)
    train_latents, eval_latents = grain_latent_stores(config, dvae, sources)
    if is_main:
        write_config(workdir, config)
    scale = train_latents.latent_scale
    logging.info("D²iT on %d training examples (latents %s, grain maps %s, latent scale %.4f, fine fraction %.3f), "
                 "%d held out", len(train_latents), dvae.latent_shape, dvae.grain_map_shape, scale,
                 fine_fraction(train_latents), len(eval_latents))

    built = build_d2it_state(config, dvae.grain_map_shape, mesh, rules)
    graphdef = built.graphdef
    params = built.state["params"]
    logging.info("parameters: content transformer %.2f M, grain transformer %.2f M",
                 *(sum(x.size for x in jax.tree.leaves(params[part])) / 1e6 for part in ("content", "grain")))
    diffusion = build_diffusion(model_config.diffusion.schedule, model_config.diffusion.num_steps,
                                learn_sigma=model_config.learn_sigma)
    held_out = eval_latents.columns()
    eps_mse = HeldOutEpsMSE(content_eps_mse(graphdef, diffusion, model_config), {
        "x0": held_out["mean"][:, 0] * scale, "grains": held_out["grains"][:, 0], "label": held_out["label"]},
        mesh, rules, train.eval_timesteps, batch_size=train.eval_batch_size, seed=train.seed)
    grain_nll = HeldOutGrainNLL(graphdef, held_out["grains"][:, 0], held_out["label"], mesh, rules,
                                batch_size=train.eval_batch_size, seed=train.seed)
    preview = Preview(graphdef, config, dvae, scale, mesh, rules)
    task = loop.Task(
        built, d2it_objective(graphdef, diffusion, config, scale),
        batches=token_iterator(train_latents, train.batch_size // jax.process_count(), train.seed),
        batch_shardings=d2it_batch_shardings(mesh, dvae, train.batch_size),
        evaluate=lambda state, step, outputs: _evaluate(eps_mse, grain_nll, preview, state, step, outputs),
        name="d2it",
    )
    result = loop.run(task, train, workdir)
    summary = dict(result.metrics, step=result.step, num_train_examples=len(train_latents),
                   num_eval_examples=len(eval_latents), latent_scale=scale,
                   train_fine_fraction=fine_fraction(train_latents), data=sources.data)
    loop.write_summary(workdir, summary)
    return summary


def content_eps_mse(graphdef: nnx.GraphDef, diffusion: GaussianDiffusion, model_config: ml_collections.ConfigDict):
    """The content transformer's held-out :data:`~.diffusion_trainer.ExampleMSE` on ``{"x0", "grains",
    "label"}``: multi-grained noise, outputs averaged over coarse copies, the dynamic grain loss's
    weights (the number the training loss's MSE term estimates)."""
    coarse_weight, fine_weight = (float(w) for w in model_config.diffusion.grain_loss)

    def mse_of(params, example, key, step):
        model, grains = nnx.merge(graphdef, params), example["grains"]
        return eps_mse_at(content_apply(model, grains), diffusion, example["x0"], example["label"], key, step,
                          grain_loss_weights(grains, coarse_weight, fine_weight), noise_fn=grain_noise(grains))

    return mse_of


class HeldOutGrainNLL:
    """The grain transformer's held-out masked NLL (nats per hidden region): MaskGIT's loss at
    cosine masks drawn from ``fold_in(key(seed), i)`` for example ``i`` (the same masks at every
    evaluation, whatever the batch), the examples' own labels, no label dropout."""

    def __init__(self, graphdef: nnx.GraphDef, grains: np.ndarray, labels: np.ndarray, mesh: jax.sharding.Mesh,
                 rules: Any, *, batch_size: int = 64, seed: int = 0):
        self.grains, self.labels = np.asarray(grains, np.int32), np.asarray(labels, np.int32)
        self.batch_size = min(batch_size, len(self.grains))
        self.mesh, self.rules = mesh, rules
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

        @jax.jit(out_shardings=replicated)
        def batch_nll(params, grains, labels, indices):
            model = nnx.merge(graphdef, params).grain
            base = jax.random.key(seed)

            def one(g, label, index):
                tokens = g.reshape(1, -1)
                loss, _ = model.masked_token_loss(tokens, model.class_labels(label[None]),
                                                  key=jax.random.fold_in(base, index), label_drop_probability=0.0)
                return loss

            return jax.vmap(one)(grains, labels, indices)

        self._batch_nll = batch_nll

    def __call__(self, params: Any) -> dict[str, float]:
        nll = loop.per_example(lambda batch, index: self._batch_nll(params, batch["grains"], batch["labels"], index),
                               {"grains": self.grains, "labels": self.labels}, self.batch_size, self.mesh, self.rules)
        return {"grain_nll": float(nll.mean())}


class Preview:
    """The grid written at every evaluation: ``train.preview.num_samples`` samples, labels cycling the
    classes, grain maps from the grain transformer, DDIM latents with guidance, a fixed key."""

    def __init__(self, graphdef: nnx.GraphDef, config: ml_collections.ConfigDict, dvae: DVAE, latent_scale: float,
                 mesh: jax.sharding.Mesh, rules: Any):
        p, model = config.train.preview, config.model
        self.num_samples, self.seed = p.num_samples, p.seed
        self.labels = (np.arange(p.num_samples) % model.num_classes).astype(np.int32)
        self.columns = min(model.num_classes, p.num_samples) if model.num_classes <= 16 else 8
        self.image_size = dvae.image_size
        self.sampler = D2iTSampler(graphdef, config, dvae, latent_scale, mesh, rules, method="ddim",
                                   respacing=p.respacing, eta=p.eta, guidance_scale=p.guidance_scale)

    def __call__(self, params: Any) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 ``[N, H, W, 3]``, int32 grain maps ``[N, gh, gw]``)."""
        grain_key, latent_key = jax.random.split(jax.random.key(self.seed))
        grains = self.sampler.generated_grain_maps(params, self.labels, grain_key)
        latents = self.sampler.latents(params, self.labels, latent_key, np.arange(self.num_samples), grains)
        return self.sampler.decode(latents, grains), grains


def _evaluate(eps_mse: HeldOutEpsMSE, grain_nll: HeldOutGrainNLL, preview: Preview, state: dict[str, Any], step: int,
              outputs: loop.Outputs) -> dict[str, Any]:
    """Held-out epsilon-MSE and grain NLL (EMA weights when kept) and the grid of samples with maps."""
    params = loop.evaluation_params(state)
    result = dict(eps_mse(params), **grain_nll(params))
    if preview.num_samples:
        images, grains = preview(params)
        result["preview_fine_fraction"] = float(grains.mean())
        outputs.grid("samples", step, grid_with_grain_maps(images, grains, preview.columns),
                     upscale=max(1, 96 // preview.image_size))
    logging.info("step %d: held-out eps-MSE %s; grain NLL %.4f nats/region", step,
                 ", ".join(f"{k[8:]} {v:.4f}" for k, v in result.items() if k.startswith("eps_mse_")),
                 result["grain_nll"])
    return result

