"""The run configs: every task's factory, composed from sections, with one-line validation errors.

A task's config is :func:`run_config` (``data``, ``train``, ``mesh``, ``sharding``) plus its own
sections; each model's section (defaults and checks) lives with the model and is re-exported here
(``dit_model_config`` from ``models/dit/transformer.py``, ``d2it_model_config`` from
``models/d2it/content_transformer.py``, the grain transformer's, the DVAE's, the generators'
(``generator_model_config`` from ``models/generators/build.py``), the tokenizer's
``tokenizer_model_config``), so a field exists and is documented in exactly one place. Config files in
``configs/`` start from a factory (:func:`base_config` for the tokenizer) and override what they
change; the ``validate_*`` functions turn a bad value into a ``ConfigError`` that names the field,
before anything is built or compiled (:mod:`nativetok_jax.schema` holds the checks).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
from etils import epath

from nativetok_jax import storage
from nativetok_jax.data.token_order import TokenOrderError, token_permutation
from nativetok_jax.diffusion.respacing import space_timesteps
from nativetok_jax.models.d2it.content_transformer import (  # noqa: F401  (re-exported: the config API)
    D2IT_SIZES,
    d2it_latent_shape,
    d2it_model_config,
    validate_d2it_model,
)
from nativetok_jax.models.d2it.dvae import dvae_model_config, validate_dvae_model
from nativetok_jax.models.d2it.grain_transformer import (  # noqa: F401
    default_grain_transformer_config,
    validate_grain_transformer_config,
)
from nativetok_jax.models.dit.transformer import (  # noqa: F401
    DIT_SIZES,
    dit_latent_shape,
    dit_model_config,
    validate_diffusion_sampling,
    validate_dit_model,
)
from nativetok_jax.models.generators.build import (  # noqa: F401
    GENERATOR_KINDS,
    generator_model_config,
    validate_generator_model,
    validate_sampling,
)
from nativetok_jax.models.nativetok.autoencoder import tokenizer_model_config, validate_model
from nativetok_jax.models.nativetok.titok import TITOK_RELEASES, TITOK_VIT_SIZES  # noqa: F401
from nativetok_jax.schema import (  # noqa: F401
    DTYPES,
    REMAT_POLICIES,
    ConfigError,
    boolean,
    number,
    positive_int,
    require,
    require_unconditional_model,
    transformer_section,
    validate_transformer,
)

PROXY_LOSSES = ("codes", "soft_l1", "pixels")
DISCRIMINATOR_NORMS = ("batch", "group")

# Logical axis -> mesh axes. Batch is split over data and fsdp; parameters are split over fsdp
# along their width ("embed") and over model along heads and hidden units (Megatron style).
# The stacked-expert and stacked-layer axes stay whole: the scan walks along them.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("head_dim", None),
    ("length", None),
    ("layers", None),
    ("experts", None),
    ("position", None),
    ("patch", None),
    ("norm", None),
    ("codebook", None),
    ("token_dim", None),
    ("classes", None),
    ("grains", None),
)


# What a rematerialised layer keeps (nativetok_jax/layers/remat.py): jax.checkpoint_policies names.


# ----------------------------------------------------------------- the sections every task composes
# A task's config is run_config(task) (data, train's loop and optimiser, mesh, sharding) plus its own
# sections: nothing is inherited and deleted, so a field a task does not read is not there to be set.

def data_section() -> ml_collections.ConfigDict:
    """``config.data``: where images come from and how training crops are taken."""
    data = ml_collections.ConfigDict()
    # "photos": the photographs bundled with scikit-image (no download; held-out photographs for
    # evaluation); "folder": every jpg/png/webp under data.path (sub-folders are classes);
    # "tfds": a prepared TFDS dataset, read by name from data.tfds_data_dir.
    data.source = "photos"
    data.path = ""
    data.eval_path = ""  # folder source: evaluation images; "" holds out num_eval_images.
    data.tfds_name = ""
    data.tfds_data_dir = ""
    data.train_split = "train"
    data.eval_split = "validation"
    # Training crops: a random square whose side is a fraction in [crop_min, crop_max] of the
    # image's short side, resized to model.image_size; 1.0 and 1.0 is TiTok's resize-and-crop.
    data.crop_min = 1.0
    data.crop_max = 1.0
    # The held-out crops of the bundled photographs (data.source "photos"): the same kind of square at
    # a fraction in [eval_crop_min, eval_crop_max] of the short side; 0 and 0 judge at the training
    # crops' scale. Set them to train at one scale and judge at another (docs/models_that_learn.md).
    data.eval_crop_min = 0.0
    data.eval_crop_max = 0.0
    data.flip = True
    # Each training crop's RGB channels in a random order: colours the training images lack are
    # seen all the same (the bundled photographs are half grey and hardly blue; docs/models_that_learn.md).
    # An augmentation of the autoencoders' training crops only: token and latent stores (and so
    # generators and diffusion models) encode the images as they are, whatever it says.
    data.permute_channels = False
    data.num_eval_images = 64
    data.num_threads = 4  # decoding threads per process
    data.worker_count = 0  # grain worker processes; 0 decodes in this process
    return data


def train_section() -> ml_collections.ConfigDict:
    """``config.train``: the loop (steps, batch, schedules of logs, evaluations and checkpoints, the
    profiler window) and the optimiser (AdamW, warm-up then cosine, clipping, EMA)."""
    train = ml_collections.ConfigDict()
    train.seed = 0
    train.num_steps = 1_000_000
    train.batch_size = 256  # global, over all processes
    # TiTok's recipe: AdamW, lr 1e-4, betas (0.9, 0.99), weight decay 1e-4, warm-up then cosine.
    train.learning_rate = 1e-4
    train.final_learning_rate_ratio = 0.1
    train.warmup_steps = 10_000
    train.beta1 = 0.9
    train.beta2 = 0.99
    train.weight_decay = 1e-4
    train.grad_clip_norm = 1.0
    train.ema_decay = 0.999  # 0 keeps no EMA.
    train.log_every = 100
    train.eval_every = 5_000
    train.checkpoint_every = 5_000
    train.keep_checkpoints = 3
    # A profiler trace (TensorBoard's profile plugin) of this many steps from profile_first_step
    # on, written to the workdir by process 0; 0 traces nothing.
    train.profile_steps = 0
    train.profile_first_step = 10
    return train


def run_config(task: str) -> ml_collections.ConfigDict:
    """The sections every task has: ``task``, ``data``, ``train`` (loop and optimiser), ``mesh``
    (axis sizes; -1 takes every device left over) and ``sharding.rules``."""
    config = ml_collections.ConfigDict()
    config.task = task
    config.data = data_section()
    config.train = train_section()
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
    config.sharding = ml_collections.ConfigDict(dict(rules=DEFAULT_RULES))
    return config


def reconstruction_losses(*, quantized: bool) -> ml_collections.ConfigDict:
    """``train.losses`` of an autoencoder that makes pixels (the tokenizer, the DVAE): the pixel,
    perceptual and adversarial terms; ``quantized`` adds the tokenizer's quantiser and proxy-code
    terms."""
    losses = ml_collections.ConfigDict(dict(
        pixel="l2",
        pixel_weight=1.0,
        # LPIPS(reconstruction, image); needs pretrained.lpips.
        perceptual_weight=0.0,
        # Hinge GAN with a patch discriminator (config.discriminator); 0 trains none.
        adversarial_weight=0.0,
        adversarial_start_step=0,
        # Or the start as a fraction of the run's steps (0: use adversarial_start_step): the start
        # then follows --config.train.num_steps, as the quantiser's warm-up fraction does.
        adversarial_start_fraction=0.0,
        # VQGAN's balance: scale the generator term by |grad rec| / |grad gan| at the last
        # pixel-producing layer, clipped to max_adaptive_weight.
        adaptive_adversarial_weight=True,
        max_adaptive_weight=1e4,
        # LeCam regulariser of the discriminator (0 turns it off) and its running means' decay.
        lecam_weight=0.0,
        lecam_decay=0.999,
    ))
    if quantized:
        losses.quantizer_weight = 1.0
        # Proxy-code head only (needs pretrained.maskgit_vqgan): "codes" is cross-entropy
        # against the VQGAN's codes of each image (TiTok stage 1); "soft_l1" is the L1
        # distance of softmax-weighted code embeddings to the VQGAN's latents (the
        # prototype's variant); "pixels" decodes soft codes with the frozen VQGAN decoder and
        # applies the pixel, perceptual and adversarial losses (TiTok stage 2).
        losses.proxy = "codes"
        losses.proxy_weight = 1.0
    return losses


def discriminator_section() -> ml_collections.ConfigDict:
    """``config.discriminator``: the patch discriminator and its own optimiser (used when
    ``train.losses.adversarial_weight > 0``)."""
    return ml_collections.ConfigDict(
        dict(width=64, depth=3, norm="batch", learning_rate=1e-4, final_learning_rate_ratio=1.0,
             warmup_steps=0, beta1=0.9, beta2=0.99, weight_decay=1e-4, grad_clip_norm=1.0))


def pretrained_section(*names: str) -> ml_collections.ConfigDict:
    """``config.pretrained``: files converted by ``python -m nativetok_jax.convert`` (nothing is ever
    downloaded), one field per network the task can use: ``lpips`` (perceptual loss and metric),
    ``maskgit_vqgan`` (the proxy-code head), ``inception`` (rFID and IS)."""
    return ml_collections.ConfigDict({name: "" for name in names})


def base_config() -> ml_collections.ConfigDict:
    """NativeTok with 32 tokens at 256 px, the paper's sizes (docs/nativetok.md)."""
    config = run_config("tokenizer")
    config.model = tokenizer_model_config()
    t = config.train
    # With this probability an example is decoded from a random prefix of its tokens only, so
    # that coarse-to-fine previews (the first k tokens) are meaningful.
    t.prefix_probability = 0.5
    # Decode continuous tokens for this many steps, then fit the codebook to the encoder's
    # outputs and quantise (0: quantise from the start). See training/codebook.py. Or give the
    # warm-up as a fraction of train.num_steps (of the first HNT stage's steps), so that it
    # follows --config.train.num_steps; set at most one of the two.
    t.quantizer_warmup_steps = 0
    t.quantizer_warmup_fraction = 0.0
    # The codebook's care (training/codebook.py): at the warm-up's end the codebook becomes
    # encoder outputs (samples_per_code of them per code), refined by kmeans_iterations of
    # spherical k-means; every restart_dead_every quantised steps (0: never) the codes that a
    # fresh sample of as many outputs leaves unchosen are re-seeded.
    t.codebook = ml_collections.ConfigDict(dict(kmeans_iterations=0, samples_per_code=1, restart_dead_every=0))
    t.losses = reconstruction_losses(quantized=True)
    config.discriminator = discriminator_section()
    config.pretrained = pretrained_section("lpips", "maskgit_vqgan", "inception")
    # Hierarchical Native Training: an empty tuple trains one stage with model.num_tokens; else
    # a tuple of dicts(num_tokens=, num_steps=, frozen=(...), name=""), run in order, each in
    # its own sub-directory. frozen names parts: mit, old_experts, experts, token_head,
    # quantizer, decoder (encoder for TiTok).
    config.hnt = ml_collections.ConfigDict()
    config.hnt.stages = ()
    return config


def titok_release_config(release: str = "L-32") -> ml_collections.ConfigDict:
    """The tokenizer config whose model is the architecture of one of TiTok's released tokenizers
    (``L-32``, ``B-64``, ``S-128``: encoder and decoder ViT-L, -B or -S, 32, 64 or 128 tokens, an
    l2-normalised 4096 x 12 codebook, 16 px patches at 256 px) as their stage-2 weights run it:
    the decoder's ``Linear -> tanh -> Linear`` head over the 1024 MaskGIT-VQGAN codes
    (``head_hidden = 2 x width``), softmax-weighted codebook rows into the VQGAN's decoder
    (``proxy_decoding="soft"``), LayerNorm epsilon 1e-5 and the legacy token layout. The weights come
    from ``python -m nativetok_jax.convert titok``, which writes this config with them.

    Raises:
      ConfigError: an unknown release.
    """
    if release not in TITOK_RELEASES:
        raise ConfigError(f"unknown TiTok release {release!r}; choose one of {sorted(TITOK_RELEASES)}")
    size, num_tokens = TITOK_RELEASES[release]
    width, depth, heads = TITOK_VIT_SIZES[size]
    config = base_config()
    m = config.model
    m.kind, m.num_tokens, m.norm_epsilon, m.legacy_token_layout = "titok", num_tokens, 1e-5, True
    m.encoder.update(width=width, depth=depth, num_heads=heads)
    m.decoder.update(width=width, depth=depth, num_heads=heads, head="proxy_codes", head_hidden=2 * width,
                     proxy_decoding="soft")
    return config


def generator_config() -> ml_collections.ConfigDict:
    """A second-stage generator trained on a tokenizer's ids: LlamaGen-B (AR) by default.

    ``data``, ``mesh`` and ``sharding`` mean what they mean for the tokenizer; ``train`` holds the
    optimiser, schedule and loop settings (LlamaGen's AdamW settings); ``generator.tokenizer``
    names the tokenizer's workdir, whose checkpoint encodes the data once into a token store.
    The tokenizer's model, objective and HNT fields are not part of it.
    """
    config = run_config("generator")
    # The model's fields (kind, size, dtype, classes, label dropout) and the sampling settings'
    # checks live with the generators (models/generators/build.py); the rest is the run's.
    g = config.generator = generator_model_config()
    g.tokenizer = ""  # a tokenizer workdir (or one stage's directory)
    g.use_ema = True  # the tokenizer's EMA weights, when it kept them
    g.tokens_dir = ""  # "": <workdir>/tokens
    # The order the generator reads the ids in: "identity", "reversed" or "random:<seed>" (a fixed
    # permutation; data/token_order.py). Samples are put back in the tokenizer's order to decode.
    g.token_order = ml_collections.ConfigDict(dict(permutation="identity"))
    g.num_train_examples = 0  # 0: one example per training image (centre crops)
    g.num_eval_examples = 0  # 0: every evaluation image (data.num_eval_images for photos)
    g.extract_batch_size = 64
    t = config.train
    t.learning_rate, t.beta1, t.beta2, t.weight_decay = 1e-4, 0.9, 0.95, 0.05
    t.warmup_steps, t.final_learning_rate_ratio, t.ema_decay = 1000, 0.1, 0.0
    t.num_steps, t.batch_size = 300_000, 256
    t.eval_every, t.checkpoint_every = 5_000, 5_000
    return config


def config_from_dict(stored: dict[str, Any]) -> ml_collections.ConfigDict:
    """A config stored as JSON (a run's ``config.json``, an exported model's), with the default
    of every field added since it was written, so older runs and exports keep loading."""
    defaults = {"generator": generator_config, "diffusion": dit_config, "dvae": dvae_config, "d2it": d2it_config}.get(
        stored.get("task"), base_config)()
    return ml_collections.ConfigDict(_fill_defaults(stored, defaults.to_dict()))


def _fill_defaults(stored: Any, defaults: Any) -> Any:
    if not isinstance(stored, dict) or not isinstance(defaults, dict):
        return stored
    merged = {key: _fill_defaults(value, defaults.get(key)) for key, value in stored.items()}
    for key, value in defaults.items():
        merged.setdefault(key, value)
    return merged


def validate_generator(config: ml_collections.ConfigDict, *, tokenizer_trained: bool = True) -> None:
    """Raises ``ConfigError`` naming the first generator, data or training field that cannot work
    (``tokenizer_trained=False``: the tokenizer's workdir is yet to be trained, as in an
    experiment checking its later stages up front)."""
    g, train = config.generator, config.train
    validate_generator_model(g)
    require(bool(g.get("tokenizer")), "generator.tokenizer", "must name a trained tokenizer's workdir")
    if tokenizer_trained:
        require(storage.path(g.tokenizer).is_dir(), "generator.tokenizer", f"no such directory: {g.tokenizer}")
    for name in ("num_train_examples", "num_eval_examples"):
        require(isinstance(g.get(name), int) and g.get(name) >= 0, f"generator.{name}",
                 f"must be an integer >= 0, got {g.get(name)!r}")
    positive_int(g.get("extract_batch_size"), "generator.extract_batch_size")

    try:
        token_permutation(g.get("token_order", {}).get("permutation", "identity"), 1)
    except TokenOrderError as error:
        raise ConfigError(str(error)) from None
    validate_sampling(g.sample, g.kind)
    require_unconditional_model(g.sample.get("guidance_scale"), g.label_drop_probability,
                                "config.generator.sample.guidance_scale", "generator.label_drop_probability")
    validate_loop(train)
    validate_optimizer(train)
    validate_data_source(config.data)
    validate_crops(config.data)  # token extraction crops the images


def validate_optimizer(train: ml_collections.ConfigDict) -> None:
    """The optimiser's and the EMA's fields (``training/optimizer.py``) and the batch's split over
    processes, shared by every trainer: a bad one otherwise surfaced only when the state was built
    (after a generator's token extraction), or silently (``ema_decay = 1`` froze the EMA)."""
    require(train.batch_size % _process_count() == 0, "train.batch_size",
            f"{train.batch_size} is not divisible by the {_process_count()} processes")
    for name in ("learning_rate", "weight_decay", "grad_clip_norm", "final_learning_rate_ratio"):
        value = train.get(name)
        require(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, f"train.{name}",
                f"must be a number >= 0, got {value!r}")
    require(isinstance(train.get("warmup_steps"), int) and train.warmup_steps >= 0, "train.warmup_steps",
            f"must be an integer >= 0, got {train.get('warmup_steps')!r}")
    for name in ("beta1", "beta2", "ema_decay"):
        value = train.get(name)
        require(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1, f"train.{name}",
                f"must lie in [0, 1), got {value!r}")


def validate_loop(train: ml_collections.ConfigDict) -> None:
    """The training loop's schedule fields (``training/loop.py``), shared by every trainer."""
    for name in ("num_steps", "batch_size", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        positive_int(train.get(name), f"train.{name}")
    for name in ("profile_steps", "profile_first_step"):
        value = train.get(name, 0)
        require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, f"train.{name}",
                 f"must be an integer >= 0, got {value!r}")


def quantizer_warmup_steps(train: ml_collections.ConfigDict, num_steps: int | None = None) -> int:
    """The quantiser warm-up of a run (or HNT stage) of ``num_steps`` (default ``train.num_steps``):
    ``train.quantizer_warmup_steps``, or ``train.quantizer_warmup_fraction`` of the steps.

    Raises ``ConfigError`` naming the flag to change when no step would be quantised.
    """
    num_steps = train.num_steps if num_steps is None else num_steps
    steps, fraction = train.quantizer_warmup_steps, train.get("quantizer_warmup_fraction", 0.0)
    require(isinstance(steps, int) and steps >= 0, "train.quantizer_warmup_steps",
             f"must be an integer >= 0, got {steps!r}")
    require(isinstance(fraction, (int, float)) and 0 <= fraction < 1, "train.quantizer_warmup_fraction",
             f"must lie in [0, 1), got {fraction!r}")
    require(not (steps and fraction), "train.quantizer_warmup_steps",
             f"{steps} and train.quantizer_warmup_fraction {fraction} are both set; set one of them to 0")
    if fraction:
        return int(fraction * num_steps)
    require(steps < num_steps, "train.quantizer_warmup_steps",
             f"{steps} leaves none of the {num_steps} steps quantised; lower it, or give the warm-up as "
             "--config.train.quantizer_warmup_fraction (with --config.train.quantizer_warmup_steps=0)")
    return steps


def unfitted_codebook(train: ml_collections.ConfigDict | None, step: int | None) -> str | None:
    """Why a checkpoint of ``step`` of a run (or stage) with ``train`` holds a codebook that was never
    fitted, or None: the trainer fits it after the quantiser warm-up's last step (training/trainer.py),
    so up to that step its codes decode noise. Runs without a warm-up (quantised from the first step,
    or converted and saved at step 0) are never refused."""
    if step is None or train is None or "quantizer_warmup_steps" not in train:
        return None
    warmup = quantizer_warmup_steps(train)
    if warmup and step <= warmup:
        return (f"its newest checkpoint (step {step}) comes before the end of the quantiser warm-up (the codebook "
                f"is fitted after step {warmup}), so its codes would decode noise; train past step {warmup} first")
    return None


def adversarial_start_step(train: ml_collections.ConfigDict) -> int:
    """The first update that uses the GAN terms (0-based, as ``StepContext.step`` counts):
    ``train.losses.adversarial_start_step``, or ``train.losses.adversarial_start_fraction`` of
    ``train.num_steps``, rounded down like :func:`quantizer_warmup_steps`, so equal fractions start
    the GAN with the first quantised update.

    Raises ``ConfigError`` (one line) for a bad value or both set.
    """
    losses = train.losses
    steps, fraction = losses.get("adversarial_start_step"), losses.get("adversarial_start_fraction", 0.0)
    require(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0, "train.losses.adversarial_start_step",
            f"must be an integer >= 0, got {steps!r}")
    require(isinstance(fraction, (int, float)) and 0 <= fraction < 1, "train.losses.adversarial_start_fraction",
            f"must lie in [0, 1), got {fraction!r}")
    require(not (steps and fraction), "train.losses.adversarial_start_step",
            f"{steps} and train.losses.adversarial_start_fraction {fraction} are both set; set one of them to 0")
    return int(fraction * train.num_steps) if fraction else steps


DATA_SOURCES = ("photos", "folder", "tfds")
# The folder source's own fields: one set with another source is a mistake the run would otherwise
# make silently (a folder given without data.source=folder trains on the photographs). The TFDS
# fields are not among them: the ImageNet configs name their dataset, and switching such a config to
# another source (--config.data.source=photos) must not require clearing it.
SOURCE_FIELDS = {"path": "folder", "eval_path": "folder"}


def validate_data_source(data: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` for an unknown ``data.source`` or a field of another source set."""
    source = data.get("source")
    require(source in DATA_SOURCES, "data.source", f"must be one of {DATA_SOURCES}, got {source!r}")
    for field, owner in SOURCE_FIELDS.items():
        require(not data.get(field) or source == owner, f"data.{field}",
                 f"is read only when data.source is {owner!r}, but data.source is {source!r}: add "
                 f"--config.data.source={owner}, or leave data.{field} empty")


def validate_crops(data: ml_collections.ConfigDict) -> None:
    """The training crops' fields (``data/pipeline.py``), shared by every trainer that crops images."""
    require(0 < data.crop_min <= data.crop_max <= 1, "data.crop_min",
             f"need 0 < crop_min <= crop_max <= 1, got {data.crop_min!r} and {data.crop_max!r}")
    low, high = data.get("eval_crop_min", 0.0), data.get("eval_crop_max", 0.0)
    require(low == high == 0 or 0 < low <= high <= 1, "data.eval_crop_min",
             f"need 0 < eval_crop_min <= eval_crop_max <= 1 (or both 0: the training crops' scale), got "
             f"{low!r} and {high!r}")
    boolean(data.get("flip"), "data.flip")
    boolean(data.get("permute_channels", False), "data.permute_channels")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/config.py[:arg]`` by calling its ``get_config([arg])``, like config flags do."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    if arg and not inspect.signature(get_config).parameters:
        raise ConfigError(f"{path} takes no argument, got {arg!r}: give {path} without ':{arg}'")
    return get_config(arg) if arg else get_config()


def config_choice(path: str, arg: str | None, choices: Sequence[str], default: str | None = None) -> str:
    """The argument a config file was given (``--config PATH:ARG``), one of ``choices``.

    Without an argument: ``default`` when the config documents one meant for that, else a
    ``ConfigError`` listing the choices (a paper-scale config must not silently pick a size).
    An argument not among ``choices`` is a ``ConfigError`` listing them too."""
    listed = ", ".join(f"{path}:{choice}" for choice in choices)
    if not arg:
        if default is None:
            raise ConfigError(f"{path} needs an argument, one of: {listed}")
        return default
    if arg not in choices:
        raise ConfigError(f"{path}: unknown argument {arg!r}; one of: {listed}")
    return arg


def validate_training(config: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` naming the first field of the model, data or training config that cannot work."""
    validate_model(config.model)
    train, data = config.train, config.data
    validate_loop(train)
    validate_optimizer(train)
    value = train.get("prefix_probability")
    require(isinstance(value, (int, float)) and 0 <= value <= 1, "train.prefix_probability",
            f"must lie in [0, 1], got {value!r}")
    require(train.losses.get("pixel") in ("l1", "l2"), "train.losses.pixel",
             f"must be 'l1' or 'l2', got {train.losses.get('pixel')!r}")
    _validate_objective(config)
    quantizer_warmup_steps(train)
    care = train.get("codebook") or ml_collections.ConfigDict()
    positive_int(care.get("samples_per_code"), "train.codebook.samples_per_code")
    for name in ("kmeans_iterations", "restart_dead_every"):
        value = care.get(name)
        require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, f"train.codebook.{name}",
                f"must be an integer >= 0, got {value!r}")
    validate_data_source(data)
    validate_crops(data)
    positive_int(data.get("num_eval_images"), "data.num_eval_images")


def _validate_objective(config: ml_collections.ConfigDict, *, quantized: bool = True) -> None:
    """The loss weights, the discriminator, and the pretrained files the objective needs
    (``quantized``: the tokenizer's, with its quantiser and proxy-code terms)."""
    losses, head = config.train.losses, (config.model.get("decoder") or {}).get("head", "pixel")
    names = ("pixel_weight", "perceptual_weight", "adversarial_weight", "lecam_weight", "max_adaptive_weight")
    for name in names + (("quantizer_weight", "proxy_weight") if quantized else ()):
        number(losses.get(name), f"train.losses.{name}")
    start = adversarial_start_step(config.train)
    if losses.adversarial_weight and not (config.get("hnt") and config.hnt.get("stages")):  # stages: checked each
        require(start < config.train.num_steps, "train.losses.adversarial_start_step",
                f"the GAN would start at step {start} of a {config.train.num_steps}-step run, so it would never "
                "train; lower it, or give the start as train.losses.adversarial_start_fraction")
    boolean(losses.get("adaptive_adversarial_weight"), "train.losses.adaptive_adversarial_weight")
    decay = losses.get("lecam_decay")
    require(isinstance(decay, (int, float)) and 0 <= decay < 1, "train.losses.lecam_decay",
             f"must lie in [0, 1), got {decay!r}")
    if quantized:
        require(losses.get("proxy") in PROXY_LOSSES, "train.losses.proxy",
                 f"must be one of {PROXY_LOSSES}, got {losses.get('proxy')!r}")
    makes_pixels = head == "pixel" or losses.get("proxy") == "pixels"
    for name in ("perceptual_weight", "adversarial_weight"):
        require(makes_pixels or losses[name] == 0, f"train.losses.{name}",
                 f"needs pixels, but the proxy-code head trained with proxy={losses.get('proxy')!r} makes none "
                 "(use proxy='pixels' or model.decoder.head='pixel')")
    if losses.adversarial_weight > 0:
        d = config.discriminator
        positive_int(d.get("width"), "discriminator.width")
        positive_int(d.get("depth"), "discriminator.depth")
        require(d.get("norm") in DISCRIMINATOR_NORMS, "discriminator.norm",
                 f"must be one of {DISCRIMINATOR_NORMS}, got {d.get('norm')!r}")
        for name in ("learning_rate", "weight_decay", "grad_clip_norm", "final_learning_rate_ratio"):
            number(d.get(name), f"discriminator.{name}")
        require(config.model.image_size >= 2 ** (d.depth + 1), "discriminator.depth",
                 f"{d.depth} stride-2 layers leave no patch of a {config.model.image_size} px image")
    needed = {"lpips": losses.perceptual_weight > 0, "maskgit_vqgan": head == "proxy_codes"}
    for name, needs in needed.items():
        path = config.pretrained.get(name, "")
        if needs:
            require(bool(path), f"pretrained.{name}", "is needed by this objective: convert the public weights "
                     "with `python -m nativetok_jax.convert` and name the file here")
            require(storage.path(path).is_file(), f"pretrained.{name}", f"file not found: {path}")


def _process_count() -> int:
    import jax

    return jax.process_count()


def validate_rules(rules, mesh_axes: tuple[str, ...]) -> None:
    """Every rule maps a logical name to mesh axes that exist (or to None)."""
    for entry in rules:
        require(isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str),
                 "sharding.rules", f"each rule must be (logical_name, mesh_axes), got {entry!r}")
        name, target = entry
        targets = (target,) if isinstance(target, str) or target is None else tuple(target)
        unknown = [t for t in targets if t is not None and t not in mesh_axes]
        require(not unknown, "sharding.rules", f"rule for {name!r} names unknown mesh axes {unknown}; "
                 f"the mesh axes are {mesh_axes}")


def validate_mesh(mesh: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolves ``-1`` and checks that the axis sizes multiply to the device count."""
    sizes = {name: mesh.get(name, 1) for name in ("data", "fsdp", "model")}
    for name, size in sizes.items():
        require(isinstance(size, int) and (size >= 1 or size == -1), f"mesh.{name}",
                 f"must be a positive integer or -1, got {size!r}")
    free = [name for name, size in sizes.items() if size == -1]
    require(len(free) <= 1, "mesh", f"only one axis may be -1, got {free}")
    fixed = 1
    for size in sizes.values():
        fixed *= max(size, 1)
    if free:
        require(num_devices % fixed == 0, f"mesh.{free[0]}",
                 f"cannot fill {num_devices} devices with the other axes' product {fixed}")
        sizes[free[0]] = num_devices // fixed
    else:
        require(fixed == num_devices, "mesh",
                 f"data*fsdp*model = {fixed} but there are {num_devices} devices")
    return sizes


# --- DiT (diffusion) runs -------------------------------------------------------------------

def dit_config(size: str = "B", patch_size: int = 2) -> ml_collections.ConfigDict:
    """A whole DiT training run (``task="diffusion"``): DiT-``size``/``patch_size`` on SD-VAE latents
    of ImageNet 256 px with DiT's recipe (facebookresearch/DiT ``train.py``).

    ``model`` is :func:`dit_model_config`'s. ``data`` means what it means for the tokenizer
    (ImageNet from TFDS, centre crops; ``data.flip`` stores each image's flip beside it and trains
    on a random one of the two); ``data.photo_labels`` gives the bundled photographs one class per
    photograph (the demo's). ``latents``: where the store of encoded images lives ("" is
    ``<workdir>/latents``), how many training examples it holds (0: one per image; crops of the
    photographs: any number), and the encoding batch. ``train``: AdamW at a constant 1e-4, betas
    (0.9, 0.999), no weight decay, no clipping, batch 256, EMA 0.9999 (DiT's); ``eval_timesteps``:
    the held-out epsilon-MSE's steps, each measured with fixed noise so the curve compares across
    steps [C]; ``preview``: the class-conditional grid written at every evaluation, DDIM-50 with
    guidance 4.0 (DiT's picture setting) [C].
    """
    config = run_config("diffusion")
    config.model = dit_model_config(size, patch_size)
    d = config.data
    d.source, d.tfds_name = "tfds", "imagenet2012"
    d.crop_min = d.crop_max = 1.0
    d.flip = True
    d.photo_labels = False
    d.num_eval_images = 1000
    config.latents = ml_collections.ConfigDict(dict(directory="", num_train_examples=0, batch_size=64))
    t = config.train
    t.learning_rate, t.beta1, t.beta2, t.weight_decay, t.grad_clip_norm = 1e-4, 0.9, 0.999, 0.0, 0.0
    t.warmup_steps, t.final_learning_rate_ratio = 0, 1.0
    t.ema_decay = 0.9999
    t.batch_size, t.num_steps = 256, 400_000  # DiT-B/2's FID is reported at 400K steps
    t.log_every, t.eval_every, t.checkpoint_every = 100, 10_000, 10_000
    t.eval_timesteps = (100, 500, 900)
    t.eval_batch_size = 64
    t.preview = ml_collections.ConfigDict(dict(num_samples=16, respacing="ddim50", eta=0.0, guidance_scale=4.0,
                                               seed=0))
    return config


def validate_dit(config: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` naming the first model, data, latent-store or training field of a
    diffusion run that cannot work."""
    validate_dit_model(config.model)
    validate_diffusion_run(config)


def validate_d2it(config: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` naming the first field of a D²iT run (``task="d2it"``) that cannot work:
    the content transformer (``model``), the grain transformer, the DVAE workdir, ``train`` (with
    ``grain_loss_weight``) and the data and latent-store fields DiT's runs have."""

    validate_d2it_model(config.model)
    validate_grain_transformer_config(config.grain_transformer)
    workdir = config.get("dvae", {}).get("workdir")
    require(isinstance(workdir, str) and bool(workdir), "dvae.workdir",
             "names no Dynamic VAE run: train one first (python -m nativetok_jax.main --config configs/dvae_demo.py "
             "--workdir DIR) and give its DIR")
    weight = config.train.get("grain_loss_weight")
    require(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight >= 0,
             "train.grain_loss_weight", f"must be a number >= 0, got {weight!r}")
    validate_diffusion_run(config)


def validate_diffusion_run(config: ml_collections.ConfigDict) -> None:
    """The training, preview, data and latent-store fields of a diffusion run (DiT's or D²iT's)."""
    train, data = config.train, config.data
    validate_loop(train)
    validate_optimizer(train)
    steps = tuple(train.get("eval_timesteps") or ())
    num_steps = config.model.diffusion.num_steps
    require(bool(steps) and all(isinstance(s, int) and 0 <= s < num_steps for s in steps), "train.eval_timesteps",
             f"must be steps in [0, {num_steps}), got {steps!r}")
    positive_int(train.get("eval_batch_size"), "train.eval_batch_size")
    p = train.preview
    require(isinstance(p.get("num_samples"), int) and p.num_samples >= 0, "train.preview.num_samples",
             f"must be an integer >= 0, got {p.get('num_samples')!r}")

    try:
        space_timesteps(num_steps, p.get("respacing"))
    except (ValueError, TypeError) as error:
        raise ConfigError(f"config.train.preview.respacing: {error}") from None
    number(p.get("eta"), "train.preview.eta")
    number(p.get("guidance_scale"), "train.preview.guidance_scale")
    require_unconditional_model(p.guidance_scale, config.model.get("label_drop_probability"),
                                "config.train.preview.guidance_scale", "model.label_drop_probability")
    validate_data_source(data)
    validate_crops(data)
    boolean(data.get("photo_labels", False), "data.photo_labels")
    positive_int(data.get("num_eval_images"), "data.num_eval_images")
    latents = config.latents
    require(isinstance(latents.get("num_train_examples"), int) and latents.num_train_examples >= 0,
             "latents.num_train_examples", f"must be an integer >= 0, got {latents.get('num_train_examples')!r}")
    positive_int(latents.get("batch_size"), "latents.batch_size")


# ------------------------------------------------------------------------------------- D²iT's Dynamic VAE



def dvae_config() -> ml_collections.ConfigDict:
    """D²iT's Dynamic VAE at 256 px (docs/d2it.md "Stage 1"; nativetok_jax/models/d2it/dvae.py).

    ``model`` is replaced by the DVAE's own fields: a VQGAN-style pyramid whose last level gives the
    coarse grain (f = 2^(levels-1)) and whose last-but-one gives the fine grain (f/2), the latent
    width, and ``model.grain``, the router (regions of f x f px; ``routing`` "entropy" reads the
    thresholds file of ``python -m nativetok_jax.grain_thresholds``; "fine", "coarse" and "random"
    at ``fine_ratio`` are the fixed-grain comparisons). ``train.losses.kl_weight`` weighs the KL,
    in which a coarse code counts once.
    """
    config = run_config("dvae")
    config.model = dvae_model_config()
    losses = config.train.losses = reconstruction_losses(quantized=False)
    losses.pixel, losses.perceptual_weight, losses.adversarial_weight = "l1", 1.0, 0.5
    losses.kl_weight = 1e-6
    config.discriminator = discriminator_section()
    config.pretrained = pretrained_section("lpips", "inception")
    config.train.latent_scale_batches = 8  # training batches the final latent scale is measured on
    return config


def validate_dvae(config: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` naming the first DVAE model, data or loss field that cannot work."""
    validate_dvae_model(config.model)
    validate_loop(config.train)
    validate_optimizer(config.train)
    number(config.train.losses.get("kl_weight"), "train.losses.kl_weight")
    positive_int(config.train.get("latent_scale_batches"), "train.latent_scale_batches")
    require(config.train.losses.get("pixel") in ("l1", "l2"), "train.losses.pixel",
             f"must be 'l1' or 'l2', got {config.train.losses.get('pixel')!r}")
    _validate_objective(config, quantized=False)
    validate_data_source(config.data)
    validate_crops(config.data)


# ------------------------------------------------------------------------------------- D²iT's content transformer

def d2it_config(size: str = "B") -> ml_collections.ConfigDict:
    """A whole D²iT run (``task="d2it"``): the content transformer D²iT-``size`` on the grain latent
    store of a trained Dynamic VAE, with DiT's recipe (:func:`dit_config`'s ``data``, ``latents`` and
    ``train``) [A].

    ``model`` is :func:`d2it_model_config`'s; ``dvae.workdir``: the trained Dynamic VAE's workdir
    (its config, weights and latent scale; its grain latent store is what is diffused);
    ``grain_transformer``: the Dynamic Grain Transformer that generates the grain maps.
    """
    config = dit_config("B", 2)
    config.task = "d2it"
    config.model = d2it_model_config(size)
    config.dvae = ml_collections.ConfigDict(dict(workdir=""))

    config.grain_transformer = default_grain_transformer_config()
    # Both transformers train in one step (models/d2it/dynamic_diffusion_transformer.py says why) [C]:
    # loss = content loss + grain_loss_weight * the grain transformer's masked cross-entropy.
    config.train.grain_loss_weight = 1.0
    return config


# The Dynamic Grain Transformer's section (models/d2it/grain_transformer.py reads it).


# Hierarchical Native Training's stage schedule (training/hnt.py grows and freezes by it).

# The parts a stage may freeze (training/hnt.py's module docstring says what each one covers).
HNT_PARTS = ("mit", "experts", "old_experts", "token_head", "quantizer", "decoder", "encoder")
# The parts each tokenizer kind has: freezing a part the model lacks froze nothing, silently.
HNT_PARTS_OF = {"nativetok": ("mit", "experts", "old_experts", "token_head", "quantizer", "decoder"),
                "titok": ("encoder", "token_head", "quantizer", "decoder")}


# Fields a stage sets from its own keys (``stage_config``); overrides may not name them.
STAGE_OWNED = {"model.num_tokens": "num_tokens", "train.num_steps": "num_steps",
               "train.quantizer_warmup_steps": "quantizer_warmup_steps",
               "train.quantizer_warmup_fraction": "quantizer_warmup_steps"}


def stage_list(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """The stages to run: ``config.hnt.stages``, or one stage with the model's own token count."""
    stages = list(config.hnt.stages) if config.hnt.stages else []
    if not stages:
        return [ml_collections.ConfigDict(dict(name="", num_tokens=config.model.num_tokens,
                                               num_steps=config.train.num_steps, frozen=(),
                                               quantizer_warmup_steps=quantizer_warmup_steps(config.train),
                                               overrides=()))]
    out = []
    for i, stage in enumerate(stages):
        stage = ml_collections.ConfigDict(dict(stage))
        for field in ("num_tokens", "num_steps"):
            if not isinstance(stage.get(field), int) or stage.get(field) < 1:
                raise ConfigError(f"config.hnt.stages[{i}].{field}: must be a positive integer, got {stage.get(field)!r}")
        frozen = tuple(stage.get("frozen", ()))
        unknown = [f for f in frozen if f not in HNT_PARTS]
        if unknown:
            raise ConfigError(f"config.hnt.stages[{i}].frozen: unknown parts {unknown}; known: {HNT_PARTS}")
        kind = config.model.get("kind", "nativetok")
        absent = [f for f in frozen if f not in HNT_PARTS_OF.get(kind, HNT_PARTS)]
        if absent:
            raise ConfigError(f"config.hnt.stages[{i}].frozen: a {kind} model has no {', '.join(absent)} (its parts: "
                              f"{', '.join(HNT_PARTS_OF[kind])}), so nothing would be frozen")
        if i and stage.num_tokens < out[-1].num_tokens:
            raise ConfigError(f"config.hnt.stages[{i}].num_tokens: {stage.num_tokens} is fewer than the previous stage's")
        # Only the first stage warms up the quantiser by default: later ones inherit a fitted codebook.
        if "quantizer_warmup_steps" in stage:
            warmup = stage.quantizer_warmup_steps
            if warmup >= stage.num_steps:
                raise ConfigError(f"config.hnt.stages[{i}].quantizer_warmup_steps: {warmup} leaves none of the "
                                  f"stage's {stage.num_steps} steps quantised; lower it")
        else:
            warmup = quantizer_warmup_steps(config.train, stage.num_steps) if i == 0 else 0
        if warmup and "quantizer" in frozen:
            raise ConfigError(f"config.hnt.stages[{i}].quantizer_warmup_steps: {warmup} would refit the codebook "
                              "the stage freezes (frozen includes 'quantizer'); set it to 0")
        overrides = tuple((str(key), value) for key, value in (stage.get("overrides") or ()))
        for key, _ in overrides:
            if not _has_field(config, key) or key.split(".")[0] == "hnt":
                raise ConfigError(f"config.hnt.stages[{i}].overrides: {key!r} is not a config field")
            if key in STAGE_OWNED:  # the stage's own key sets it; an override would train one value, record another
                raise ConfigError(f"config.hnt.stages[{i}].overrides: {key!r} is set by the stage's own "
                                  f"{STAGE_OWNED[key]!r} key; use that instead")
        out.append(ml_collections.ConfigDict(dict(
            name=stage.get("name", "") or f"stage{i}_{stage.num_tokens}tokens",
            num_tokens=stage.num_tokens, num_steps=stage.num_steps, frozen=frozen,
            quantizer_warmup_steps=warmup, overrides=overrides)))
    return out


def _has_field(config: ml_collections.ConfigDict, dotted: str) -> bool:
    node = config
    for name in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            return False
        node = node[name]
    return True


def stage_config(config: ml_collections.ConfigDict, stage: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config one stage trains with: the run's, with the stage's token count, step count and
    ``overrides``: ``(dotted field name, value)`` pairs, e.g. ``("train.losses.proxy", "pixels")``
    (the TiTok recipe's decoder fine-tune is a stage that switches the objective)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.num_tokens = stage.num_tokens
    config.train.num_steps = stage.num_steps
    config.train.quantizer_warmup_steps = stage.quantizer_warmup_steps
    config.train.quantizer_warmup_fraction = 0.0
    config.hnt.stages = ()
    for dotted, value in stage.get("overrides") or ():
        *parents, name = dotted.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[name] = value
    return config


def stage_directory(workdir: Any, stage: ml_collections.ConfigDict, multi_stage: bool) -> epath.Path:
    return epath.Path(workdir) / stage.name if multi_stage else epath.Path(workdir)
