"""``python -m nativetok_jax.sample --workdir GEN_DIR --out DIR``: images from a trained generator
(token generators, diffusion models: see :func:`sample_diffusion`, and D²iT: :func:`sample_d2it`).

Loads the generator's newest checkpoint (EMA weights when kept) and the tokenizer its config
names, samples class-conditional token ids with the config's settings (``generator.sample``;
each can be overridden by a flag), decodes them with the tokenizer and writes
``DIR/sample_00000.png ...``, ``DIR/grid.png`` and ``DIR/ids.npz`` (ids, labels and the image
size, which ``evaluate --samples`` checks). The
samples are seeded: the same command writes the same images.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # else TF prints a notice on import; it computes nothing here

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from nativetok_jax import checkpoints, sharding, storage, tasks
from nativetok_jax.command import boundary
from nativetok_jax.config import ConfigError, require_unconditional_model, validate_sampling  # noqa: E402
from nativetok_jax.data.grain_latent_store import GrainLatentSource
from nativetok_jax.data.sources import SAMPLE_FILE, SAMPLE_IDS_FILE
from nativetok_jax.diffusion.respacing import space_timesteps
from nativetok_jax.evaluation.dvae_metrics import grid_with_grain_maps
from nativetok_jax.evaluation.grids import save_grid, save_png
from nativetok_jax.generation import d2it_sampling
from nativetok_jax.generation.diffusion_sampling import diffusion_sampler, image_decoder
from nativetok_jax.generation.pretrained import TrainedGenerator
from nativetok_jax.layers.partitioning import axis_rules
from nativetok_jax.models.d2it.dynamic_diffusion_transformer import dynamic_diffusion_transformer_from_config
from nativetok_jax.models.dit.transformer import DIFFUSION_SAMPLERS, dit_from_config
from nativetok_jax.pretrained.sd_vae import latent_space
from nativetok_jax.training import diffusion_trainer
from nativetok_jax.training import grain_latent_extraction as grain_latents
from nativetok_jax.training.generator_trainer import tokenizer_upstream
from nativetok_jax.workdir import check_loadable, check_upstream, require_task, saved_parameter_shapes

# This command's flags live in their own registry (as evaluate's): importing several entry points
# into one process (a test session, a notebook) must not fail with a duplicate --workdir.
FLAGS = flags.FlagValues()


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """The command-line flags, in ``flag_values``."""
    flags.DEFINE_string("workdir", None, "A generator's training directory.", flag_values=flag_values)
    flags.DEFINE_string("out", None, "Directory for the PNGs and ids.npz (samples.npz for diffusion); "
                        "default WORKDIR/samples.", flag_values=flag_values)
    flags.DEFINE_integer("num_samples", None, "How many images (default: the config's).",
                         flag_values=flag_values)
    flags.DEFINE_string("labels", None, "Comma-separated class ids, cycled (default: 0, 1, 2, ... cycling the "
                        "classes).", flag_values=flag_values)
    flags.DEFINE_integer("seed", None, "Sampling seed (default: the config's).", flag_values=flag_values)
    flags.DEFINE_integer("batch_size", 64, "Images sampled per call.", flag_values=flag_values)
    flags.DEFINE_float("temperature", None, "Softmax temperature (0: greedy decoding).", flag_values=flag_values)
    flags.DEFINE_integer("top_k", None, "Keep the k most likely ids (0: all).", flag_values=flag_values)
    flags.DEFINE_float("top_p", None, "Nucleus sampling mass (1: off).", flag_values=flag_values)
    flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance: uncond + scale * (cond - uncond).",
                       flag_values=flag_values)
    flags.DEFINE_integer("num_steps", None, "MaskGIT decoding steps; diffusion: sampler steps (respaced).",
                         flag_values=flag_values)
    flags.DEFINE_string("sampler", None, "Diffusion only: ddpm (DiT's FID protocol) or ddim (default: the "
                        "config's).", flag_values=flag_values)
    flags.DEFINE_float("choice_temperature", None, "MaskGIT: scale of the Gumbel noise on the confidences.",
                       flag_values=flag_values)
    flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the run kept them.", flag_values=flag_values)
    flags.DEFINE_string("grain_maps", None, "D²iT only: where the grain maps come from: model (the grain transformer; "
                        "default), ground_truth (the held-out store's, with its labels) or random (at the data's fine "
                        "fraction).", flag_values=flag_values)
    flags.mark_flags_as_required(["workdir"], flag_values=flag_values)


define_flags()

SETTINGS = ("temperature", "top_k", "top_p", "guidance_scale", "num_steps", "choice_temperature", "seed",
            "num_samples")
MASKGIT_ONLY = ("num_steps", "choice_temperature")


def sampling_settings(generator: ml_collections.ConfigDict, overrides: dict[str, Any], *,
                      vocab_size: int) -> ml_collections.ConfigDict:
    """``generator.sample`` with the flags' overrides, validated as a whole (``validate_sampling``):
    a bad value is a ``ConfigError`` naming the flag that set it, or the config field. A flag the
    generator's kind does not use (``--num_steps`` for an autoregressive one) is an error too."""
    settings = ml_collections.ConfigDict(generator.sample.to_dict())
    names = {}
    for name in SETTINGS:
        if overrides.get(name) is None:
            continue
        if name in MASKGIT_ONLY and generator.kind != "maskgit":
            raise ConfigError(f"--{name}: only MaskGIT generators use it; this one is {generator.kind!r}")
        settings[name] = overrides[name]
        names[name] = f"--{name}"
    validate_sampling(settings, generator.kind, vocab_size=vocab_size, names=names)
    require_unconditional_model(settings.guidance_scale, generator.label_drop_probability,
                                names.get("guidance_scale", "config.generator.sample.guidance_scale"),
                                "the run's generator.label_drop_probability")
    return settings


def sample_images(workdir: str | os.PathLike, out: str | os.PathLike, **overrides) -> np.ndarray:
    """Writes the samples into ``out`` (local or a URL); returns them as uint8 ``[N, H, W, 3]``."""

    config = require_task(workdir, "sample", ("generator",))
    g = config.generator
    tokenizer_config = checkpoints.read_config(checkpoints.final_stage_directory(g.tokenizer))
    settings = sampling_settings(g, overrides, vocab_size=tokenizer_config.model.quantizer.codebook_size)
    batch_size = 64 if overrides.get("batch_size") is None else overrides["batch_size"]
    if batch_size < 1:
        raise ConfigError(f"--batch_size: must be a positive integer, got {batch_size}")
    check_loadable(g.tokenizer)
    check_loadable(workdir)
    check_upstream(workdir, tokenizer_upstream(g.tokenizer), "sampling")  # the tokenizer it trained on
    # The class count from the checkpoint's metadata (its class table has a null row), so --labels
    # is checked before the generator and its tokenizer are restored.
    labels = generator_labels(overrides.get("labels"), settings.num_samples, saved_class_count(workdir))
    generator = TrainedGenerator.from_checkpoint(workdir, use_ema=overrides.get("use_ema", True))
    tokenizer = generator.tokenizer
    ids = []
    for start in range(0, len(labels), batch_size):
        chunk = labels[start : start + batch_size]
        padded = np.resize(chunk, batch_size) if len(labels) > batch_size else chunk
        key = jax.random.fold_in(jax.random.key(settings.seed), start)
        ids.append(np.asarray(generator.sample_ids(padded, key, settings))[: len(chunk)])
    ids = np.concatenate(ids)
    images = np.concatenate([np.asarray(tokenizer.decode(ids[i : i + batch_size])) for i in range(0, len(ids), batch_size)])
    if jax.process_index() == 0:

        directory = storage.path(out)
        for i, image in enumerate(images):
            save_png(directory / SAMPLE_FILE.format(index=i), image)
        storage.write_npz(directory / SAMPLE_IDS_FILE, ids=ids, labels=labels, image_size=tokenizer.image_size)
        columns = int(np.ceil(np.sqrt(len(images))))
        save_grid(directory / "grid.png", [images[i : i + columns] for i in range(0, len(images), columns)],
                  upscale=max(1, 96 // tokenizer.image_size))
    logging.info("wrote %d samples of %s (step %d) to %s", len(images), workdir, generator.step, out)
    return images


def saved_class_count(workdir: str) -> int:
    """The classes of a token generator's newest checkpoint, from orbax's metadata (nothing
    restored): its class embedding's rows less the null class's."""
    _, shapes = saved_parameter_shapes(checkpoints.final_stage_directory(workdir))
    return int(tuple(getattr(shapes["class_embedding"], "shape", shapes["class_embedding"]))[0]) - 1


def generator_labels(wanted: Any, num_samples: int, num_classes: int) -> np.ndarray:
    """``--labels`` repeated to ``num_samples`` (default: the classes in turn), int32.

    Raises ``ConfigError`` for a label outside ``[0, num_classes)``."""
    if wanted:
        labels = np.resize(np.asarray(wanted, np.int32), num_samples)
    else:
        labels = (np.arange(num_samples) % num_classes).astype(np.int32)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ConfigError(f"--labels: must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    return labels


TOKEN_ONLY = ("temperature", "top_k", "top_p", "choice_temperature")
SAMPLES_NPZ = "samples.npz"  # uint8 [N, H, W, 3] as arr_0, labels as arr_1: ADM's evaluator layout


def diffusion_settings(model: ml_collections.ConfigDict, *, sampler: str | None = None, num_steps: int | None = None,
                       guidance_scale: float | None = None, seed: int | None = None, num_samples: int | None = None,
                       batch_size: int | None = None, unused: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sampling settings of a diffusion run: ``model.sample`` with the flags' overrides.

    ``num_steps`` respaces the process (DDPM: ``"N"``; DDIM: ``"ddimN"``, evenly strided); without it
    the config's ``respacing`` is kept when it suits the sampler, else 250 (DDPM) or 50 (DDIM) steps.

    Raises:
      ConfigError: a bad value, named by its flag (one line), or a token-generator flag
        (``unused``: ``{"temperature": value, ...}``, set ones are errors).
    """

    for name, value in (unused or {}).items():
        if value is not None:
            raise ConfigError(f"--{name}: token generators use it; this workdir holds a diffusion model")
    s = model.sample
    method = s.method if sampler is None else sampler
    if method not in DIFFUSION_SAMPLERS:
        raise ConfigError(f"--sampler: must be one of {DIFFUSION_SAMPLERS}, got {method!r}")
    if num_steps is not None:
        if num_steps < 1 or num_steps > model.diffusion.num_steps:
            raise ConfigError(f"--num_steps: must lie in [1, {model.diffusion.num_steps}], got {num_steps}")
        respacing = f"ddim{num_steps}" if method == "ddim" else str(num_steps)
    elif str(s.respacing).startswith("ddim") == (method == "ddim"):
        respacing = str(s.respacing)
    else:
        respacing = "ddim50" if method == "ddim" else "250"
    try:
        space_timesteps(model.diffusion.num_steps, respacing)
    except ValueError as error:
        raise ConfigError(f"--num_steps: {error}") from None
    scale = s.guidance_scale if guidance_scale is None else guidance_scale
    if scale < 0:
        raise ConfigError(f"--guidance_scale: must be >= 0, got {scale}")
    require_unconditional_model(scale, model.label_drop_probability,
                                "--guidance_scale" if guidance_scale is not None else "config.model.sample.guidance_scale",
                                "the run's model.label_drop_probability")
    count = 16 if num_samples is None else num_samples
    if count < 1:
        raise ConfigError(f"--num_samples: must be a positive integer, got {count}")
    batch = 64 if batch_size is None else batch_size
    if batch < 1:
        raise ConfigError(f"--batch_size: must be a positive integer, got {batch}")
    return dict(method=method, respacing=respacing, eta=s.eta, guidance_scale=float(scale),
                seed=0 if seed is None else seed, num_samples=count, batch_size=batch)


def sample_diffusion(workdir: str | os.PathLike, out: str | os.PathLike, *, labels: list[int] | None = None,
                     use_ema: bool = True, **flags_given) -> np.ndarray:
    """Samples a diffusion run (``task="diffusion"``) into ``out``; returns uint8 ``[N, H, W, 3]``.

    Writes ``sample_00000.png ...`` (what ``evaluate --samples`` reads), ``grid.png`` and
    ``samples.npz`` (``arr_0``: uint8 ``[N, H, W, 3]``, ``arr_1``: int labels; the layout of ADM's
    ``evaluator.py`` and DiT's ``sample_ddp.py``). Sample ``i`` draws its noise from
    ``fold_in(key(seed), i)``, so the same command writes the same images whatever ``--batch_size``.
    Labels cycle ``0, 1, 2, ...`` over the classes, or over ``labels``.

    Raises:
      ConfigError: bad settings (:func:`diffusion_settings`) or labels outside ``[0, num_classes)``.
    """

    config = require_task(workdir, "sample", ("diffusion",))
    model = config.model
    settings = diffusion_settings(model, **flags_given)
    n, num_classes = settings["num_samples"], model.num_classes
    labels = np.resize(np.asarray(labels if labels else np.arange(num_classes), np.int32), n)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ConfigError(f"--labels: must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    check_loadable(workdir)
    check_upstream(workdir, diffusion_trainer.autoencoder_upstream(model.autoencoder), "sampling")  # the VAE it trained on
    autoencoder = latent_space(model.autoencoder)  # before the sampling: a missing VAE file fails fast
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_of(config)
    from flax import nnx

    abstract = nnx.eval_shape(lambda: dit_from_config(model, nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    params, step = checkpoints.load_params(workdir, use_ema=use_ema, placement=sharding.restore_placement(
        sharding.param_axes(abstract), mesh, rules))
    sample = diffusion_sampler(graphdef, model, mesh, method=settings["method"], respacing=settings["respacing"],
                               eta=settings["eta"], guidance_scale=settings["guidance_scale"])
    decode = image_decoder(autoencoder)
    key, batch = jax.random.key(settings["seed"]), settings["batch_size"]
    images = []
    with jax.set_mesh(mesh), axis_rules(rules):
        for start in range(0, n, batch):
            indices = np.resize(np.arange(start, min(start + batch, n)), min(batch, n))  # last batch padded
            latents = sample(params, labels[indices], key, indices.astype(np.int32))
            images.append(decode(np.asarray(latents))[: min(batch, n - start)])
    images = np.concatenate(images)
    if jax.process_index() == 0:
        directory = storage.path(out)
        for i, image in enumerate(images):
            save_png(directory / SAMPLE_FILE.format(index=i), image)
        storage.write_npz(directory / SAMPLES_NPZ, arr_0=images, arr_1=labels)
        columns = min(num_classes, n) if num_classes <= 16 else int(np.ceil(np.sqrt(n)))
        save_grid(directory / "grid.png", [images[i : i + columns] for i in range(0, n, columns)],
                  upscale=max(1, 96 // model.image_size))
    logging.info("wrote %d samples of %s (step %d, %s %s, guidance %.2f) to %s", n, workdir, step,
                 settings["method"], settings["respacing"], settings["guidance_scale"], out)
    return images


def sample_d2it(workdir: str | os.PathLike, out: str | os.PathLike, *, grain_maps: str | None = None,
                labels: list[int] | None = None, use_ema: bool = True, **flags_given) -> tuple[np.ndarray, np.ndarray]:
    """Samples a D²iT run (``task="d2it"``) into ``out``: grain maps, then latents, then the DVAE's
    images; returns (uint8 ``[N, H, W, 3]``, int32 grain maps ``[N, gh, gw]``).

    ``grain_maps``: ``"model"`` (default: the grain transformer, with ``config.grain_transformer``'s
    MaskGIT settings), ``"ground_truth"`` (held-out example ``i mod n``'s map from the grain latent
    store, and its label: the paper's ground-truth row) or ``"random"`` (every region fine with the
    training store's fine fraction, independently: the paper's random row). The latents are drawn
    as :func:`sample_diffusion` draws them (sampler, steps, guidance and seed flags; sample ``i``'s
    noise from ``fold_in(key, i)``), multi-grained on the chosen maps. Grain maps are drawn from
    the seed too (the model's in fixed chunks of 64), so the same command writes the same images
    whatever ``--batch_size``.

    Writes ``sample_00000.png ...``, ``grid.png`` (each sample beside itself with its coarse regions
    darkened: its grain map) and ``samples.npz`` (``arr_0`` images, ``arr_1`` labels, ``grains``).

    Raises:
      ConfigError: bad settings or flags (one line), e.g. ``--labels`` with ground-truth maps.
    """

    mode = grain_maps or "model"
    if mode not in d2it_sampling.GRAIN_MAP_MODES:
        raise ConfigError(f"--grain_maps: must be one of {d2it_sampling.GRAIN_MAP_MODES}, got {mode!r}")
    if mode == "ground_truth" and labels:
        raise ConfigError("--labels: ground-truth grain maps come with their own labels (the held-out store's)")
    config = require_task(workdir, "sample", ("d2it",))
    model = config.model
    settings = diffusion_settings(model, **flags_given)
    n, num_classes = settings["num_samples"], model.num_classes
    stores = grain_latents.store_directory(config)
    if mode == "ground_truth":
        held_out = GrainLatentSource(stores / "eval").columns()
        chosen = np.arange(n) % len(held_out["label"])
        labels, given_maps = held_out["label"][chosen].astype(np.int32), held_out["grains"][chosen, 0]
    else:
        labels = np.resize(np.asarray(labels if labels else np.arange(num_classes), np.int32), n)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ConfigError(f"--labels: must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    check_loadable(workdir)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_of(config)
    dvae = grain_latents.open_dvae(config, mesh)  # before the sampling: a missing DVAE fails fast
    check_upstream(workdir, grain_latents.dvae_upstream(config, dvae), "sampling")  # the DVAE it trained on
    from flax import nnx

    abstract = nnx.eval_shape(
        lambda: dynamic_diffusion_transformer_from_config(config, dvae.grain_map_shape, nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    params, step = checkpoints.load_params(workdir, use_ema=use_ema, placement=sharding.restore_placement(
        sharding.param_axes(abstract), mesh, rules))
    sampler = d2it_sampling.D2iTSampler(graphdef, config, dvae, dvae.latent_scale, mesh, rules,
                                        method=settings["method"], respacing=settings["respacing"], eta=settings["eta"],
                                       guidance_scale=settings["guidance_scale"])
    latent_key, grain_key = jax.random.split(jax.random.key(settings["seed"]))
    if mode == "random":
        ratio = grain_latents.fine_fraction(GrainLatentSource(stores / "train"))
        given_maps = d2it_sampling.random_grain_maps(grain_key, n, dvae.grain_map_shape, ratio)
    elif mode == "model":
        chunk = 64
        given_maps = np.concatenate([
            sampler.generated_grain_maps(params, np.resize(labels[start:start + chunk], chunk),
                                         jax.random.fold_in(grain_key, start))[: min(chunk, n - start)]
            for start in range(0, n, chunk)])
    batch, images = settings["batch_size"], []
    for start in range(0, n, batch):
        indices = np.resize(np.arange(start, min(start + batch, n)), min(batch, n))  # last batch padded
        latents = sampler.latents(params, labels[indices], latent_key, indices, given_maps[indices])
        images.append(sampler.decode(latents, given_maps[indices])[: min(batch, n - start)])
    images = np.concatenate(images)
    grains = np.asarray(given_maps, np.int32)
    if jax.process_index() == 0:
        directory = storage.path(out)
        for i, image in enumerate(images):
            save_png(directory / SAMPLE_FILE.format(index=i), image)
        storage.write_npz(directory / SAMPLES_NPZ, arr_0=images, arr_1=labels, grains=grains)
        columns = min(num_classes, n) if num_classes <= 16 else 8
        save_grid(directory / "grid.png", grid_with_grain_maps(images, grains, columns),
                  upscale=max(1, 96 // dvae.image_size))
    logging.info("wrote %d samples of %s (step %d, grain maps: %s, %s %s, guidance %.2f) to %s", n, workdir, step, mode,
                 settings["method"], settings["respacing"], settings["guidance_scale"], out)
    return images, grains


def parse_labels(text: str | None) -> list[int] | None:
    """``--labels 0,3,1`` as integers; anything else is a ``ConfigError`` naming the flag."""
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--labels: expected comma-separated class ids such as 0,3,1, got {text!r}") from None


GRAIN_MAPS_ONLY = "--grain_maps: only D²iT workdirs (task 'd2it') use it"


def sample_generator_command(workdir: str, out: str, flags: dict[str, Any]) -> str:
    """The command's part for a token generator (``tasks.Task.sample``): ``flags`` by name; the line
    to print."""
    if flags["grain_maps"] is not None:
        raise ConfigError(GRAIN_MAPS_ONLY)
    if flags["sampler"] is not None:
        raise ConfigError("--sampler: only diffusion models use it")
    images = sample_images(
        workdir, out, num_samples=flags["num_samples"], labels=flags["labels"], seed=flags["seed"],
        batch_size=flags["batch_size"], temperature=flags["temperature"], top_k=flags["top_k"], top_p=flags["top_p"],
        guidance_scale=flags["guidance_scale"], num_steps=flags["num_steps"],
        choice_temperature=flags["choice_temperature"], use_ema=flags["use_ema"])
    return f"wrote {len(images)} samples to {out} (grid.png, sample_*.png, ids.npz)"


def _diffusion_flags(flags: dict[str, Any]) -> dict[str, Any]:
    return dict(sampler=flags["sampler"], num_steps=flags["num_steps"], guidance_scale=flags["guidance_scale"],
                labels=flags["labels"], seed=flags["seed"], num_samples=flags["num_samples"],
                batch_size=flags["batch_size"], use_ema=flags["use_ema"],
                unused={name: flags[name] for name in TOKEN_ONLY})


def sample_diffusion_command(workdir: str, out: str, flags: dict[str, Any]) -> str:
    """The command's part for a DiT run (``tasks.Task.sample``)."""
    if flags["grain_maps"] is not None:
        raise ConfigError(GRAIN_MAPS_ONLY)
    images = sample_diffusion(workdir, out, **_diffusion_flags(flags))
    return f"wrote {len(images)} samples to {out} (grid.png, sample_*.png, {SAMPLES_NPZ})"


def sample_d2it_command(workdir: str, out: str, flags: dict[str, Any]) -> str:
    """The command's part for a D²iT run (``tasks.Task.sample``)."""
    images, _ = sample_d2it(workdir, out, grain_maps=flags["grain_maps"], **_diffusion_flags(flags))
    return f"wrote {len(images)} samples with their grain maps to {out} (grid.png, sample_*.png, {SAMPLES_NPZ})"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

    with boundary():  # the project's errors (flags, runs, files) are one line; a bug keeps its traceback
        _sample_and_report()


def _sample_and_report() -> None:

    flags = {name: getattr(FLAGS, name) for name in (*SETTINGS, "batch_size", "sampler", "use_ema", "grain_maps")}
    flags["labels"] = parse_labels(FLAGS.labels)
    out = FLAGS.out or str(storage.path(FLAGS.workdir) / "samples")
    config = require_task(FLAGS.workdir, "sample", tasks.with_part("sample"),
                          advice="a tokenizer or DVAE is judged with evaluate --workdir")
    storage.check_writable(out, "--out", directory=True)  # in seconds, not after the sampling
    print(tasks.of(config).load("sample")(FLAGS.workdir, out, flags))


if __name__ == "__main__":
    from nativetok_jax.command import own_flags_parser

    app.run(main, flags_parser=own_flags_parser(FLAGS, __name__))
