"""The diffusion trainer (``task="diffusion"``): ``train_diffusion(config, workdir)``, read top to
bottom.

Open the latent space the config names (the SD-VAE, or pixel space); encode the training and
held-out images once into latent stores (:mod:`nativetok_jax.data.latent_store`: each image and its
flip, resumable, reused when present, refused when made with other settings); build the DiT on
the mesh; train with the shared loop (``training/loop.py``: resume, checkpoints, SIGTERM, finite
checks, logging) on DiT's objective; at every evaluation measure the held-out epsilon-MSE at
fixed steps (``train.eval_timesteps``, DiT's noisy loss made comparable: fixed noise per
example) and write a PNG grid of class-conditional DDIM samples. What is here is the loss, the
latent data and the evaluation; the loop, the step and the state builder are every trainer's.

Each step (DiT ``train.py``): a random one of the two stored flips of every example, a latent
drawn from its posterior (``mean + exp(logvar / 2) z``; the mean itself in pixel space), labels
dropped to the null class with ``model.label_drop_probability``, then DiT's loss (epsilon MSE plus
the stop-gradient variational-bound term; ``diffusion.losses``). All randomness comes from the
step's key, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from nativetok_jax import sharding, storage
from nativetok_jax.config import ConfigError, dit_latent_shape, validate_dit
from nativetok_jax.data.latent_store import LatentSource
from nativetok_jax.data.pipeline import held_out_section
from nativetok_jax.data.sources import PhotoSource, data_line, describe_data, open_sources
from nativetok_jax.diffusion.gaussian import GaussianDiffusion, build_diffusion
from nativetok_jax.diffusion.losses import diffusion_loss, eps_mse_at
from nativetok_jax.generation.diffusion_sampling import diffusion_sampler, image_decoder  # noqa: F401 - their old home
from nativetok_jax.layers.partitioning import axis_rules
from nativetok_jax.models.dit.transformer import dit_from_config
from nativetok_jax.models.dit.kl_autoencoder import KLAutoencoder, PixelSpace, sample_latents
from nativetok_jax.pretrained.sd_vae import latent_space
from nativetok_jax.training import loop
from nativetok_jax.training.generator_trainer import token_iterator
from nativetok_jax.training.state import BuiltState, build_state
from nativetok_jax.training.step import Objective, StepContext, batch_shardings
from nativetok_jax.training.token_extraction import encode_into_store
from nativetok_jax.workdir import record_upstream, write_config

Batch = dict[str, jax.Array]
Autoencoder = KLAutoencoder | PixelSpace


# --------------------------------------------------------------------------------- the latent store

def moments_shape(model: ml_collections.ConfigDict) -> tuple[int, ...]:
    """``(2, K, h, w, c)`` of one stored example: flips, moments (2, or 1 in pixel space), latent."""
    return (2, 1 if model.autoencoder.kind == "pixels" else 2, *dit_latent_shape(model))


def latent_encoder(autoencoder: Autoencoder, deterministic: bool):
    """``encode(uint8 [B, H, W, 3]) -> float32 [B, 2, K, h, w, c]``: the posterior moments of each
    image and of its horizontal flip (one jitted program; the autoencoder's weights are an argument;
    pixel space on the host, exactly: XLA turns a division by 255 into a product with its rounded
    reciprocal)."""
    graphdef, state = nnx.split(autoencoder)

    @jax.jit
    def encode(state, images):
        ae = nnx.merge(graphdef, state)
        x = images.astype(jnp.float32) / 255.0
        mean, log_variance = ae.encode(jnp.concatenate([x, x[:, :, ::-1]]))  # [2B, h, w, c] each
        moments = mean[:, None] if deterministic else jnp.stack([mean, log_variance], axis=1)
        return jnp.stack(jnp.split(moments, 2), axis=1)  # [B, 2, K, h, w, c]

    if isinstance(autoencoder, PixelSpace):  # on the host, exact: the float32 nearest to v / 127.5 - 1
        def pixels(images: np.ndarray) -> np.ndarray:
            x = (images.astype(np.float32) * 2 - 255) / np.float32(255)
            return np.stack([x, x[:, :, ::-1]], axis=1)[:, :, None]

        return pixels

    return lambda images: np.asarray(encode(state, images))


class StoreSources(NamedTuple):
    """What a diffusion trainer encodes into its latent stores (DiT's and D²iT's alike)."""

    train: Any  # the training source
    held_out: Any  # the held-out source
    train_data: ml_collections.ConfigDict  # config.data for the training crops (both flips stored)
    held_out_data: ml_collections.ConfigDict  # the same for held-out crops (centre crops but for photographs)
    num_train: int
    num_held_out: int
    num_classes: int  # the data's
    data: dict[str, Any]  # what is read (:func:`nativetok_jax.data.sources.describe_data`), for eval.json


def store_sources(config: ml_collections.ConfigDict) -> StoreSources:
    """The sources and crops of a diffusion run's stores.

    Training example ``i`` is a crop of image ``i mod len(source)`` (``config.data``'s crops,
    drawn from ``(seed, i)``; centre crops when whole); held-out ones are centre crops of the
    evaluation split, or, for photographs labelled by photograph, other crops of the same
    photographs (the held-out photographs have no class of their own).

    Raises:
      ConfigError: the data has more classes than ``model.num_classes``.
    """
    model, data = config.model, config.data
    if data.source == "photos" and data.get("photo_labels", False):
        train_source = PhotoSource("train", labelled=True)
        eval_source = train_source
        described = describe_data(data, train_source, eval_source,
                                  held_out_from="other crops of the training photographs (data.photo_labels)")
        logging.info("%s", data_line(described))
    else:
        train_source, eval_source = open_sources(data, data.num_eval_images)
        described = describe_data(data, train_source, eval_source)
    data_classes = int(getattr(train_source, "num_classes", 1))
    if data_classes > model.num_classes:
        raise ConfigError(f"config.model.num_classes: {model.num_classes}, but the data has {data_classes} classes")
    encoding = ml_collections.ConfigDict(data.to_dict())
    encoding.flip = False  # both flips are stored
    held_out = held_out_section(data)  # at the held-out scale, as the autoencoder's own evaluations
    num_eval = data.num_eval_images if data.source == "photos" else min(data.num_eval_images, len(eval_source))
    return StoreSources(train_source, eval_source, encoding, held_out,
                        config.latents.num_train_examples or len(train_source), num_eval, data_classes, described)


def autoencoder_upstream(autoencoder: ml_collections.ConfigDict) -> dict[str, str]:
    """What identifies the autoencoder a DiT run's latents come from, beyond its config: the SD-VAE
    weights' SHA-256 (a file re-converted at the same path has another); pixel space: nothing.
    Recorded by :func:`workdir.record_upstream` and the latent stores' description."""
    if autoencoder.kind != "sd_vae" or not autoencoder.get("weights"):
        return {}
    return {"model.autoencoder.weights sha256": storage.sha256(autoencoder.weights)}


def latent_stores(config: ml_collections.ConfigDict, autoencoder: Autoencoder, workdir: epath.PathLike,
                  sources: StoreSources | None = None) -> tuple[LatentSource, LatentSource]:
    """The (train, held-out) latent stores of ``sources`` (default :func:`store_sources`), encoded
    now unless finished matching stores exist.

    Raises:
      ConfigError: the data has more classes than ``model.num_classes``.
      TokenStoreError: a store directory holds latents made with other settings.
    """
    model, data, latents = config.model, config.data, config.latents
    sources = store_sources(config) if sources is None else sources
    ae = model.autoencoder
    description = dict(autoencoder=ae.kind, weights=str(storage.path(ae.weights)) if ae.weights else "",
                       scale_factor=ae.scale_factor if ae.kind != "pixels" else 1.0, source=data.source,
                       path=data.path or data.tfds_name, photo_labels=bool(data.get("photo_labels", False)
                                                                          and data.source == "photos"),
                       image_size=model.image_size, moments_shape=list(moments_shape(model)),
                       num_classes=model.num_classes)
    description.update(autoencoder_upstream(ae))  # a store of another file's latents is not reused
    shape = moments_shape(model)
    encode = latent_encoder(autoencoder, deterministic=shape[1] == 1)
    directory = epath.Path(latents.directory) if latents.directory else epath.Path(workdir) / "latents"
    common = dict(image_size=model.image_size, value_shapes=shape, store=LatentSource, batch_size=latents.batch_size)
    train = encode_into_store(encode, sources.train, directory / "train", data=sources.train_data,
                              num_examples=sources.num_train, seed=config.train.seed,
                              description=description, **common)
    held_out = encode_into_store(encode, sources.held_out, directory / "eval", data=sources.held_out_data,
                                 num_examples=sources.num_held_out, seed=config.train.seed + 1,
                                 description=description, **common)
    return train, held_out


# ------------------------------------------------------------------------------------ the objective

def random_orientations(key: jax.Array, *stored: jax.Array) -> tuple[jax.Array, ...]:
    """Each ``[B, 2, ...]`` array (axis 1: the image and its horizontal flip) -> ``[B, ...]``, the same
    random one of the two for every array of an example (DiT's random flip, on stored flips)."""
    flip = jax.random.bernoulli(key, 0.5, stored[0].shape[:1])
    return tuple(jnp.where(flip.reshape((-1,) + (1,) * (a.ndim - 2)), a[:, 1], a[:, 0]) for a in stored)


def draw_latents(moments: jax.Array, key: jax.Array) -> jax.Array:
    """``moments [B, 2, K, ...]`` -> float32 ``x0 [B, ...]``: a random flip of each example, then a
    draw from its posterior (``K = 2``) or its mean (``K = 1``, exact: pixel space)."""
    flip_key, noise_key = jax.random.split(key)
    (chosen,) = random_orientations(flip_key, moments.astype(jnp.float32))  # [B, K, ...]
    if moments.shape[2] == 1:
        return chosen[:, 0]
    return sample_latents(chosen[:, 0], chosen[:, 1], noise_key)


def diffusion_objective(graphdef: nnx.GraphDef, diffusion: GaussianDiffusion,
                        label_drop_probability: float) -> Objective:
    """DiT's training objective on a batch ``{"moments": [B, 2, K, h, w, c], "label": [B]}``."""

    def loss(params: Any, batch: Batch, context: StepContext):
        model = nnx.merge(graphdef, params)
        latent_key, drop_key, diffusion_key = jax.random.split(context.key, 3)
        x0 = draw_latents(batch["moments"], latent_key)
        labels = model.drop_labels(batch["label"], drop_key, label_drop_probability)
        value, metrics = diffusion_loss(model, diffusion, x0, labels, diffusion_key)
        return value, ({"mse": metrics["mse"], "vb": metrics["vb"]}, None)

    return Objective(loss)


def diffusion_batch_shardings(mesh: jax.sharding.Mesh, model: ml_collections.ConfigDict,
                              batch_size: int) -> dict[str, jax.sharding.NamedSharding]:
    return batch_shardings(mesh, {"moments": (batch_size, *moments_shape(model)), "label": (batch_size,)})


def build_dit_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: Any) -> BuiltState:
    """The DiT's sharded train state (``build_state``: AdamW, EMA) for ``config``."""
    return build_state(lambda r: dit_from_config(config.model, r), train=config.train, mesh=mesh, rules=rules)


# ---------------------------------------------------------------------------------------- training

def train_diffusion(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, Any]:
    """Trains the DiT ``config`` describes in ``workdir``; returns the final evaluation
    (``eps_mse_t100`` ...; ``step``, store sizes), also written to ``eval.json``."""
    validate_dit(config)
    model_config, train = config.model, config.train
    workdir = epath.Path(workdir)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_of(config)
    record_upstream(workdir, autoencoder_upstream(model_config.autoencoder), is_main=is_main)
    autoencoder = latent_space(model_config.autoencoder)
    sources = store_sources(config)
    train_latents, eval_latents = latent_stores(config, autoencoder, workdir, sources)
    if is_main:
        write_config(workdir, config)
    logging.info("DiT on %d training examples (%s latents %s), %d held out", len(train_latents),
                 model_config.autoencoder.kind, train_latents.moments_shape[2:], len(eval_latents))

    built = build_dit_state(config, mesh, rules)
    graphdef = built.graphdef
    logging.info("DiT parameters: %.2f M", sum(x.size for x in jax.tree.leaves(built.state["params"])) / 1e6)
    diffusion = build_diffusion(model_config.diffusion.schedule, model_config.diffusion.num_steps,
                                learn_sigma=model_config.learn_sigma)
    held_out = HeldOutEpsMSE(dit_eps_mse(graphdef, diffusion), dit_held_out_examples(eval_latents), mesh, rules,
                             train.eval_timesteps, batch_size=train.eval_batch_size, seed=train.seed)
    preview = Preview(graphdef, config, autoencoder, mesh, rules)
    task = loop.Task(
        built, diffusion_objective(graphdef, diffusion, model_config.label_drop_probability),
        batches=token_iterator(train_latents, train.batch_size // jax.process_count(), train.seed),
        batch_shardings=diffusion_batch_shardings(mesh, model_config, train.batch_size),
        evaluate=lambda state, step, outputs: _evaluate(held_out, preview, state, step, outputs),
        name="diffusion",
    )
    result = loop.run(task, train, workdir)
    summary = dict(result.metrics, step=result.step, num_train_examples=len(train_latents),
                   num_eval_examples=len(eval_latents), data=sources.data)
    loop.write_summary(workdir, summary)
    return summary


# One held-out example's epsilon-MSE: (params, example {name: [1, ...]}, noise key, step t) -> scalar.
ExampleMSE = Callable[[Any, dict[str, jax.Array], jax.Array, int], jax.Array]


class HeldOutEpsMSE:
    """The held-out epsilon-MSE at fixed steps ``t`` (e.g. 100, 500, 900), of any diffusion model.

    Example ``i``'s noise at step ``t`` comes from ``fold_in(fold_in(key(seed), t), i)``: the same
    numbers at every evaluation, whatever the batch, so the curve measures the model alone (DiT's
    training loss, at random steps, is noisy). ``examples`` holds equal-length arrays (the clean
    latents ``x0``, the labels, and whatever else the model reads, e.g. a grain map);
    ``mse_of(params, example, key, t)`` measures one example given as arrays of leading size 1
    (:func:`dit_eps_mse` for a DiT).
    """

    def __init__(self, mse_of: ExampleMSE, examples: dict[str, np.ndarray], mesh: jax.sharding.Mesh, rules: Any,
                 timesteps: Sequence[int], *, batch_size: int = 64, seed: int = 0):
        self.examples = {name: np.asarray(value) for name, value in examples.items()}
        self.num_examples = len(next(iter(self.examples.values())))
        self.timesteps = tuple(int(t) for t in timesteps)
        self.batch_size = min(batch_size, self.num_examples)
        self.mesh, self.rules = mesh, rules
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

        @jax.jit(static_argnums=3, out_shardings=replicated)
        def batch_mse(params, examples, indices, step):
            base = jax.random.fold_in(jax.random.key(seed), step)

            def one(example, index):
                return mse_of(params, jax.tree.map(lambda a: a[None], example), jax.random.fold_in(base, index), step)

            return jax.vmap(one)(examples, indices)

        self._batch_mse = batch_mse

    def __call__(self, params: Any) -> dict[str, float]:
        """``{"eps_mse_t100": ..., ...}`` (float means over the held-out examples)."""
        return {f"eps_mse_t{step}": float(loop.per_example(
            lambda batch, index, t=step: self._batch_mse(params, batch, index, t), self.examples, self.batch_size,
            self.mesh, self.rules).mean()) for step in self.timesteps}


def dit_eps_mse(graphdef: nnx.GraphDef, diffusion: GaussianDiffusion) -> ExampleMSE:
    """A DiT's :data:`ExampleMSE` on ``{"x0", "label"}`` (the conditional model: the example's own label)."""
    def mse_of(params, example, key, step):
        return eps_mse_at(nnx.merge(graphdef, params), diffusion, example["x0"], example["label"], key, step)

    return mse_of


def dit_held_out_examples(latents: LatentSource) -> dict[str, np.ndarray]:
    """``{"x0": unflipped posterior means, "label"}`` of a latent store."""
    moments, labels = latents.arrays()
    return {"x0": np.asarray(moments[:, 0, 0], np.float32), "label": labels}


class Preview:
    """Class-conditional samples for the grids: ``train.preview`` (DDIM with guidance), labels
    ``0, 1, 2, ...`` cycling the classes, a fixed key, decoded by the autoencoder to uint8."""

    def __init__(self, graphdef: nnx.GraphDef, config: ml_collections.ConfigDict, autoencoder: Autoencoder,
                 mesh: jax.sharding.Mesh, rules: Any):
        p, model = config.train.preview, config.model
        self.num_samples, self.seed, self.mesh, self.rules = p.num_samples, p.seed, mesh, rules
        self.labels = (np.arange(p.num_samples) % model.num_classes).astype(np.int32)
        # One column per class when they are few (a column shows what a class became), else square.
        few = model.num_classes <= 16
        self.columns = min(model.num_classes, p.num_samples) if few else int(np.ceil(np.sqrt(p.num_samples)))
        self.image_size = model.image_size
        self.sample = diffusion_sampler(graphdef, model, mesh, method="ddim", respacing=p.respacing, eta=p.eta,
                                        guidance_scale=p.guidance_scale)
        self.decode = image_decoder(autoencoder)

    def __call__(self, params: Any) -> np.ndarray:
        """uint8 ``[num_samples, H, W, 3]``."""
        with jax.set_mesh(self.mesh), axis_rules(self.rules):
            latents = self.sample(params, self.labels, jax.random.key(self.seed))
        return self.decode(np.asarray(latents))


def _evaluate(held_out: HeldOutEpsMSE, preview: Preview, state: dict[str, Any], step: int,
              outputs: loop.Outputs) -> dict[str, Any]:
    """Held-out epsilon-MSE (EMA weights when kept) and a PNG grid of preview samples."""
    params = loop.evaluation_params(state)
    result = held_out(params)
    if preview.num_samples:
        images, columns = preview(params), max(1, preview.columns)
        outputs.grid("samples", step, [images[i : i + columns] for i in range(0, len(images), columns)],
                     upscale=max(1, 96 // preview.image_size))
    logging.info("step %d: held-out eps-MSE %s", step, ", ".join(f"{k[8:]} {v:.4f}" for k, v in result.items()))
    return result
