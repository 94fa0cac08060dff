"""The configuration schema: every field with its default, and one-line validation errors.

Config files in ``configs/`` start from :func:`base_config` and override what they change, so a
field exists (and is documented) in exactly one place. :func:`validate` turns a bad value into
a ``ConfigError`` that names the field, before anything is built or compiled.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import ml_collections

MODEL_KINDS = ("nativetok", "titok")
DECODER_HEADS = ("pixel", "proxy_codes")
DTYPES = ("float32", "bfloat16")
PROXY_DECODINGS = ("argmax", "soft")
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
)


class ConfigError(ValueError):
    """A config field has a value the code cannot use; the message names the field."""


def _transformer(width: int, depth: int, num_heads: int, remat: bool = False) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(width=width, depth=depth, num_heads=num_heads, mlp_ratio=4.0, remat=remat)
    )


def base_config() -> ml_collections.ConfigDict:
    """NativeTok with 32 tokens at 256 px, the paper's sizes (NATIVETOK.md)."""
    config = ml_collections.ConfigDict()
    config.task = "tokenizer"  # or "generator" (see generator_config)

    config.model = ml_collections.ConfigDict()
    config.model.kind = "nativetok"  # or "titok": the order-free baseline.
    config.model.image_size = 256
    config.model.patch_size = 16
    config.model.num_tokens = 32
    config.model.dtype = "float32"  # Compute dtype; parameters are always float32.
    # Unroll the layer and expert scans in the compiled program: compile time grows with depth
    # and num_tokens; XLA's FLOP count becomes exact (the model benchmark uses it for that).
    config.model.unroll_scans = False
    # Meta Image Transformer (for kind="titok": the bidirectional encoder with latent tokens).
    # The prototype used 4 heads at width 1024; 16 (head dim 64) is the ViT-L choice we default to.
    config.model.encoder = _transformer(width=1024, depth=18, num_heads=16)
    # One light transformer per token position.
    config.model.experts = _transformer(width=256, depth=2, num_heads=4)
    # scan=False runs the prototype's unrolled Python loop instead of the scanned stack: same
    # numbers, compile time growing with num_tokens. For tests and benchmarks only.
    config.model.experts.scan = True
    config.model.quantizer = ml_collections.ConfigDict(
        dict(codebook_size=4096, token_dim=12, commitment_weight=0.25)
    )
    # TiTok-L decoder.
    config.model.decoder = _transformer(width=1024, depth=24, num_heads=16)
    config.model.decoder.head = "pixel"  # or "proxy_codes" (logits over a VQGAN codebook).
    config.model.decoder.proxy_codebook_size = 1024
    # How proxy-code logits become pixels (through the VQGAN's decoder): "argmax" (the most
    # likely code per cell) or "soft" (softmax-weighted codebook rows; what train.losses.proxy
    # = "pixels" trains, so use it for models from that stage).
    config.model.decoder.proxy_decoding = "argmax"

    config.data = ml_collections.ConfigDict()
    # "photos": the photographs bundled with scikit-image (no download; held-out photographs for
    # evaluation); "folder": every jpg/png/webp under data.path (sub-folders are classes);
    # "tfds": a prepared TFDS dataset, read by name from data.tfds_data_dir.
    config.data.source = "photos"
    config.data.path = ""
    config.data.eval_path = ""  # folder source: evaluation images; "" holds out num_eval_images.
    config.data.tfds_name = ""
    config.data.tfds_data_dir = ""
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    # Training crops: a random square whose side is a fraction in [crop_min, crop_max] of the
    # image's short side, resized to model.image_size; 1.0 and 1.0 is TiTok's resize-and-crop.
    config.data.crop_min = 1.0
    config.data.crop_max = 1.0
    config.data.flip = True
    config.data.num_eval_images = 64
    config.data.num_threads = 4  # decoding threads per process
    config.data.worker_count = 0  # grain worker processes; 0 decodes in this process

    config.train = ml_collections.ConfigDict()
    config.train.seed = 0
    config.train.num_steps = 1_000_000
    config.train.batch_size = 256  # global, over all processes
    # TiTok's recipe: AdamW, lr 1e-4, betas (0.9, 0.99), weight decay 1e-4, warm-up then cosine.
    config.train.learning_rate = 1e-4
    config.train.final_learning_rate_ratio = 0.1
    config.train.warmup_steps = 10_000
    config.train.beta1 = 0.9
    config.train.beta2 = 0.99
    config.train.weight_decay = 1e-4
    config.train.grad_clip_norm = 1.0
    config.train.ema_decay = 0.999  # 0 keeps no EMA.
    # With this probability an example is decoded from a random prefix of its tokens only, so
    # that coarse-to-fine previews (the first k tokens) are meaningful.
    config.train.prefix_probability = 0.5
    # Decode continuous tokens for this many steps, then fit the codebook to the encoder's
    # outputs and quantise (0: quantise from the start). See training/codebook.py.
    config.train.quantizer_warmup_steps = 0
    config.train.losses = ml_collections.ConfigDict(
        dict(
            pixel="l2",
            pixel_weight=1.0,
            quantizer_weight=1.0,
            # LPIPS(reconstruction, image); needs pretrained.lpips.
            perceptual_weight=0.0,
            # Proxy-code head only (needs pretrained.maskgit_vqgan): "codes" is cross-entropy
            # against the VQGAN's codes of each image (TiTok stage 1); "soft_l1" is the L1
            # distance of softmax-weighted code embeddings to the VQGAN's latents (the
            # prototype's variant); "pixels" decodes soft codes with the frozen VQGAN decoder and
            # applies the pixel, perceptual and adversarial losses (TiTok stage 2).
            proxy="codes",
            proxy_weight=1.0,
            # Hinge GAN with a patch discriminator (config.discriminator); 0 trains none.
            adversarial_weight=0.0,
            adversarial_start_step=0,
            # VQGAN's balance: scale the generator term by |grad rec| / |grad gan| at the last
            # pixel-producing layer, clipped to max_adaptive_weight.
            adaptive_adversarial_weight=True,
            max_adaptive_weight=1e4,
            # LeCam regulariser of the discriminator (0 turns it off) and its running means' decay.
            lecam_weight=0.0,
            lecam_decay=0.999,
        )
    )
    # The patch discriminator and its own optimiser (used when losses.adversarial_weight > 0).
    config.discriminator = ml_collections.ConfigDict(
        dict(width=64, depth=3, norm="batch", learning_rate=1e-4, final_learning_rate_ratio=1.0,
             warmup_steps=0, beta1=0.9, beta2=0.99, weight_decay=1e-4, grad_clip_norm=1.0)
    )
    # Pretrained networks, as files converted by `python -m nativetok_jax.convert` (nothing is
    # ever downloaded): LPIPS for the perceptual loss and metric, the MaskGIT VQGAN for the
    # proxy-code head, the FID Inception for rFID and IS.
    config.pretrained = ml_collections.ConfigDict(dict(lpips="", maskgit_vqgan="", inception=""))
    config.train.log_every = 100
    config.train.eval_every = 5_000
    config.train.checkpoint_every = 5_000
    config.train.keep_checkpoints = 3

    # Hierarchical Native Training: an empty tuple trains one stage with model.num_tokens; else
    # a tuple of dicts(num_tokens=, num_steps=, frozen=(...), name=""), run in order, each in
    # its own sub-directory. frozen names parts: mit, old_experts, experts, token_head,
    # quantizer, decoder (encoder for TiTok).
    config.hnt = ml_collections.ConfigDict()
    config.hnt.stages = ()

    # Mesh axis sizes; -1 takes every device left over.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
    config.sharding = ml_collections.ConfigDict()
    config.sharding.rules = DEFAULT_RULES
    return config


GENERATOR_KINDS = ("ar", "maskgit")


def generator_config() -> ml_collections.ConfigDict:
    """A second-stage generator trained on a tokenizer's ids: LlamaGen-B (AR) by default.

    ``data`` and ``mesh`` mean what they mean for the tokenizer; ``train`` holds the optimiser
    and schedule (LlamaGen's AdamW settings); ``generator.tokenizer`` names the tokenizer's
    workdir, whose checkpoint encodes the data once into a token store.
    """
    config = base_config()
    config.task = "generator"
    g = config.generator = ml_collections.ConfigDict()
    g.kind = "ar"  # "ar": LlamaGen-class GPT; "maskgit": bidirectional masked-token transformer
    g.tokenizer = ""  # a tokenizer workdir (or one stage's directory)
    g.use_ema = True  # the tokenizer's EMA weights, when it kept them
    g.width, g.depth, g.num_heads = 768, 12, 12  # LlamaGen-B
    g.mlp_ratio = 4.0  # maskgit's MLP; the GPT's SwiGLU uses LlamaGen's 2/3 of it, rounded to 256
    g.remat = False
    g.num_classes = 0  # 0: as many as the data has (max label + 1)
    g.label_drop_probability = 0.1  # classifier-free guidance: labels dropped to the null class
    g.tokens_dir = ""  # "": <workdir>/tokens
    g.num_train_examples = 0  # 0: one example per training image (centre crops)
    g.num_eval_examples = 0  # 0: every evaluation image (data.num_eval_images for photos)
    g.extract_batch_size = 64
    g.sample = ml_collections.ConfigDict(dict(
        num_samples=16, seed=0, temperature=1.0, top_k=0, top_p=1.0, guidance_scale=1.0,
        num_steps=8, choice_temperature=4.5))  # num_steps, choice_temperature: maskgit only
    t = config.train
    t.learning_rate, t.beta1, t.beta2, t.weight_decay = 1e-4, 0.9, 0.95, 0.05
    t.warmup_steps, t.final_learning_rate_ratio, t.ema_decay = 1000, 0.1, 0.0
    t.num_steps, t.batch_size = 300_000, 256
    t.eval_every, t.checkpoint_every = 5_000, 5_000
    return config


def config_from_dict(stored: dict[str, Any]) -> ml_collections.ConfigDict:
    """A config stored as JSON (a run's ``config.json``, an exported model's), with the default
    of every field added since it was written, so older runs and exports keep loading."""
    defaults = generator_config() if stored.get("task") == "generator" else base_config()
    return ml_collections.ConfigDict(_fill_defaults(stored, defaults.to_dict()))


def _fill_defaults(stored: Any, defaults: Any) -> Any:
    if not isinstance(stored, dict) or not isinstance(defaults, dict):
        return stored
    merged = {key: _fill_defaults(value, defaults.get(key)) for key, value in stored.items()}
    for key, value in defaults.items():
        merged.setdefault(key, value)
    return merged


def validate_generator(config: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` naming the first generator, data or training field that cannot work."""
    g, train = config.generator, config.train
    _require(g.get("kind") in GENERATOR_KINDS, "generator.kind", f"must be one of {GENERATOR_KINDS}, got {g.get('kind')!r}")
    _require(bool(g.get("tokenizer")), "generator.tokenizer", "must name a trained tokenizer's workdir")
    _require(os.path.isdir(g.tokenizer), "generator.tokenizer", f"no such directory: {g.tokenizer}")
    _validate_transformer(ml_collections.ConfigDict(dict(width=g.width, depth=g.depth, num_heads=g.num_heads,
                                                        mlp_ratio=g.mlp_ratio, remat=g.remat)), "generator")
    for name in ("num_classes", "num_train_examples", "num_eval_examples"):
        _require(isinstance(g.get(name), int) and g.get(name) >= 0, f"generator.{name}",
                 f"must be an integer >= 0, got {g.get(name)!r}")
    _positive_int(g.get("extract_batch_size"), "generator.extract_batch_size")
    p = g.label_drop_probability
    _require(isinstance(p, (int, float)) and 0 <= p < 1, "generator.label_drop_probability", f"must lie in [0, 1), got {p!r}")
    s = g.sample
    for name in ("num_samples", "num_steps"):
        _positive_int(s.get(name), f"generator.sample.{name}")
    _require(s.temperature > 0, "generator.sample.temperature", f"must be > 0, got {s.temperature!r}")
    _require(isinstance(s.top_k, int) and s.top_k >= 0, "generator.sample.top_k", f"must be an integer >= 0, got {s.top_k!r}")
    _require(0 < s.top_p <= 1, "generator.sample.top_p", f"must lie in (0, 1], got {s.top_p!r}")
    _number(s.get("guidance_scale"), "generator.sample.guidance_scale")
    for name in ("num_steps", "batch_size", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        _positive_int(train.get(name), f"train.{name}")
    _number(train.get("learning_rate"), "train.learning_rate")
    _require(data_source_ok(config.data), "data.source", f"must be one of ('photos', 'folder', 'tfds'), got {config.data.get('source')!r}")


def data_source_ok(data: ml_collections.ConfigDict) -> bool:
    return data.get("source") in ("photos", "folder", "tfds")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/config.py[:arg]`` by calling its ``get_config([arg])``, like config flags do."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{field}: {message}")


def _positive_int(value, field: str) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, field,
             f"must be a positive integer, got {value!r}")


def _boolean(value, field: str) -> None:
    _require(isinstance(value, bool), field, f"must be True or False, got {value!r}")


def _validate_transformer(cfg: ml_collections.ConfigDict, field: str) -> None:
    for name in ("width", "depth", "num_heads"):
        _positive_int(cfg.get(name), f"{field}.{name}")
    _boolean(cfg.get("remat"), f"{field}.remat")
    _require(cfg.width % cfg.num_heads == 0, f"{field}.width",
             f"{cfg.width} is not divisible by num_heads={cfg.num_heads}")
    _require(float(cfg.mlp_ratio) > 0, f"{field}.mlp_ratio", f"must be > 0, got {cfg.mlp_ratio!r}")


def validate_model(model: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` naming the first field of ``config.model`` that cannot work."""
    _require(model.get("kind") in MODEL_KINDS, "model.kind", f"must be one of {MODEL_KINDS}, got {model.get('kind')!r}")
    _require(model.get("dtype") in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {model.get('dtype')!r}")
    for name in ("image_size", "patch_size", "num_tokens"):
        _positive_int(model.get(name), f"model.{name}")
    _require(model.image_size % model.patch_size == 0, "model.image_size",
             f"{model.image_size} is not a multiple of patch_size={model.patch_size}")
    _validate_transformer(model.encoder, "model.encoder")
    _validate_transformer(model.decoder, "model.decoder")
    _boolean(model.get("unroll_scans"), "model.unroll_scans")
    if model.kind == "nativetok":
        _validate_transformer(model.experts, "model.experts")
        _boolean(model.experts.get("scan"), "model.experts.scan")
    _positive_int(model.quantizer.get("codebook_size"), "model.quantizer.codebook_size")
    _positive_int(model.quantizer.get("token_dim"), "model.quantizer.token_dim")
    weight = model.quantizer.get("commitment_weight")
    _require(isinstance(weight, (int, float)) and weight >= 0, "model.quantizer.commitment_weight",
             f"must be a number >= 0, got {weight!r}")
    _require(model.decoder.get("head") in DECODER_HEADS, "model.decoder.head",
             f"must be one of {DECODER_HEADS}, got {model.decoder.get('head')!r}")
    _positive_int(model.decoder.get("proxy_codebook_size"), "model.decoder.proxy_codebook_size")
    _require(model.decoder.get("proxy_decoding") in PROXY_DECODINGS, "model.decoder.proxy_decoding",
             f"must be one of {PROXY_DECODINGS}, got {model.decoder.get('proxy_decoding')!r}")


def validate_training(config: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` naming the first field of the model, data or training config that cannot work."""
    validate_model(config.model)
    train, data = config.train, config.data
    for name in ("num_steps", "batch_size", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        _positive_int(train.get(name), f"train.{name}")
    _require(train.batch_size % _process_count() == 0, "train.batch_size",
             f"{train.batch_size} is not divisible by the {_process_count()} processes")
    for name in ("learning_rate", "weight_decay", "grad_clip_norm", "final_learning_rate_ratio"):
        value = train.get(name)
        _require(isinstance(value, (int, float)) and value >= 0, f"train.{name}", f"must be a number >= 0, got {value!r}")
    _require(isinstance(train.warmup_steps, int) and train.warmup_steps >= 0, "train.warmup_steps",
             f"must be an integer >= 0, got {train.warmup_steps!r}")
    for name in ("beta1", "beta2", "ema_decay", "prefix_probability"):
        value = train.get(name)
        _require(isinstance(value, (int, float)) and 0 <= value < 1 + (name == "prefix_probability"),
                 f"train.{name}", f"must lie in [0, 1), got {value!r}")
    _require(train.losses.get("pixel") in ("l1", "l2"), "train.losses.pixel",
             f"must be 'l1' or 'l2', got {train.losses.get('pixel')!r}")
    _validate_objective(config)
    _require(data.get("source") in ("photos", "folder", "tfds"), "data.source",
             f"must be one of ('photos', 'folder', 'tfds'), got {data.get('source')!r}")
    _require(0 < data.crop_min <= data.crop_max <= 1, "data.crop_min",
             f"need 0 < crop_min <= crop_max <= 1, got {data.crop_min!r} and {data.crop_max!r}")
    _positive_int(data.get("num_eval_images"), "data.num_eval_images")


def _number(value, field: str, low: float = 0.0) -> None:
    _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low, field,
             f"must be a number >= {low:g}, got {value!r}")


def _validate_objective(config: ml_collections.ConfigDict) -> None:
    """The loss weights, the discriminator, and the pretrained files the objective needs."""
    losses, head = config.train.losses, config.model.decoder.head
    for name in ("pixel_weight", "quantizer_weight", "perceptual_weight", "proxy_weight",
                 "adversarial_weight", "lecam_weight", "max_adaptive_weight"):
        _number(losses.get(name), f"train.losses.{name}")
    _require(isinstance(losses.get("adversarial_start_step"), int) and losses.adversarial_start_step >= 0,
             "train.losses.adversarial_start_step", f"must be an integer >= 0, got {losses.get('adversarial_start_step')!r}")
    _boolean(losses.get("adaptive_adversarial_weight"), "train.losses.adaptive_adversarial_weight")
    decay = losses.get("lecam_decay")
    _require(isinstance(decay, (int, float)) and 0 <= decay < 1, "train.losses.lecam_decay",
             f"must lie in [0, 1), got {decay!r}")
    _require(losses.get("proxy") in PROXY_LOSSES, "train.losses.proxy",
             f"must be one of {PROXY_LOSSES}, got {losses.get('proxy')!r}")
    makes_pixels = head == "pixel" or losses.proxy == "pixels"
    for name in ("perceptual_weight", "adversarial_weight"):
        _require(makes_pixels or losses[name] == 0, f"train.losses.{name}",
                 f"needs pixels, but the proxy-code head trained with proxy={losses.proxy!r} makes none "
                 "(use proxy='pixels' or model.decoder.head='pixel')")
    if losses.adversarial_weight > 0:
        d = config.discriminator
        _positive_int(d.get("width"), "discriminator.width")
        _positive_int(d.get("depth"), "discriminator.depth")
        _require(d.get("norm") in DISCRIMINATOR_NORMS, "discriminator.norm",
                 f"must be one of {DISCRIMINATOR_NORMS}, got {d.get('norm')!r}")
        for name in ("learning_rate", "weight_decay", "grad_clip_norm", "final_learning_rate_ratio"):
            _number(d.get(name), f"discriminator.{name}")
        _require(config.model.image_size >= 2 ** (d.depth + 1), "discriminator.depth",
                 f"{d.depth} stride-2 layers leave no patch of a {config.model.image_size} px image")
    needed = {"lpips": losses.perceptual_weight > 0, "maskgit_vqgan": head == "proxy_codes"}
    for name, needs in needed.items():
        path = config.pretrained.get(name, "")
        if needs:
            _require(bool(path), f"pretrained.{name}", "is needed by this objective: convert the public weights "
                     "with `python -m nativetok_jax.convert` and name the file here")
            _require(os.path.isfile(path), f"pretrained.{name}", f"file not found: {path}")


def _process_count() -> int:
    import jax

    return jax.process_count()


def validate_rules(rules, mesh_axes: tuple[str, ...]) -> None:
    """Every rule maps a logical name to mesh axes that exist (or to None)."""
    for entry in rules:
        _require(isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str),
                 "sharding.rules", f"each rule must be (logical_name, mesh_axes), got {entry!r}")
        name, target = entry
        targets = (target,) if isinstance(target, str) or target is None else tuple(target)
        unknown = [t for t in targets if t is not None and t not in mesh_axes]
        _require(not unknown, "sharding.rules", f"rule for {name!r} names unknown mesh axes {unknown}; "
                 f"the mesh axes are {mesh_axes}")


def validate_mesh(mesh: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolves ``-1`` and checks that the axis sizes multiply to the device count."""
    sizes = {name: mesh.get(name, 1) for name in ("data", "fsdp", "model")}
    for name, size in sizes.items():
        _require(isinstance(size, int) and (size >= 1 or size == -1), f"mesh.{name}",
                 f"must be a positive integer or -1, got {size!r}")
    free = [name for name, size in sizes.items() if size == -1]
    _require(len(free) <= 1, "mesh", f"only one axis may be -1, got {free}")
    fixed = 1
    for size in sizes.values():
        fixed *= max(size, 1)
    if free:
        _require(num_devices % fixed == 0, f"mesh.{free[0]}",
                 f"cannot fill {num_devices} devices with the other axes' product {fixed}")
        sizes[free[0]] = num_devices // fixed
    else:
        _require(fixed == num_devices, "mesh",
                 f"data*fsdp*model = {fixed} but there are {num_devices} devices")
    return sizes
