"""Every config builds; paper-scale parameter counts match the architecture's formula; bad fields
give one-line errors that name them."""

import glob
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from nativetok_jax.config import (ConfigError, load_config_file, quantizer_warmup_steps, stage_list, validate_generator,
                                  validate_training)
from nativetok_jax.models.nativetok import build_model
from nativetok_jax.models.generators.build import build_generator
from nativetok_jax.training import hnt

CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def count_params(model_config) -> int:
    abstract = nnx.eval_shape(lambda: build_model(model_config, nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


# The formula, from the architecture in docs/nativetok.md (MLP ratio 4, biases everywhere, LayerNorm
# with scale and bias):
def block(w: int) -> int:
    attention = 4 * w * w + 4 * w  # query, key, value, out kernels and biases
    mlp = w * 4 * w + 4 * w + 4 * w * w + w
    return attention + mlp + 2 * 2 * w  # two LayerNorms


def patch_embedding(image: int, patch: int, w: int) -> int:
    return patch * patch * 3 * w + w + w + ((image // patch) ** 2 + 1) * w  # projection, class, positions


def expected_count(m) -> int:
    num_patches, d, k = (m.image_size // m.patch_size) ** 2, m.quantizer.token_dim, m.quantizer.codebook_size
    w, L = m.encoder.width, m.num_tokens
    if m.kind == "nativetok":
        e = m.experts.width
        encoder = patch_embedding(m.image_size, m.patch_size, w) + m.encoder.depth * block(w) + 2 * w + w * e + e
        encoder += L * (e + e + 2 * e + m.experts.depth * block(e))  # query, slot position, input norm, blocks
        out_width = e
    else:
        encoder = patch_embedding(m.image_size, m.patch_size, w) + L * w + 2 * w + m.encoder.depth * block(w)
        out_width = w
    token_head = 2 * out_width + out_width * d + d
    v = m.decoder.width
    head = m.patch_size**2 * 3 if m.decoder.head == "pixel" else m.decoder.proxy_codebook_size
    decoder = d * v + v + L * v + 3 * v + (num_patches + 1) * v + 2 * v + m.decoder.depth * block(v) + 2 * v
    decoder += v * head + head
    return encoder + token_head + k * d + decoder


@pytest.mark.parametrize(
    "spec, kind, num_tokens",
    [
        ("nativetok.py:32", "nativetok", 32),
        ("nativetok.py:64", "nativetok", 64),
        ("nativetok.py:128", "nativetok", 128),
        ("titok.py", "titok", 32),
    ],
)
def test_paper_scale_parameter_counts(spec, kind, num_tokens):
    config = load_config_file(os.path.join(CONFIG_DIR, spec))
    m = config.model
    assert (m.kind, m.num_tokens, m.image_size, m.patch_size) == (kind, num_tokens, 256, 16)
    assert (m.quantizer.codebook_size, m.quantizer.token_dim) == (4096, 12)
    assert (m.decoder.width, m.decoder.depth) == (1024, 24)
    if kind == "nativetok":
        assert (m.encoder.width, m.encoder.depth, m.experts.width, m.experts.depth) == (1024, 18, 256, 2)
    else:
        assert (m.encoder.width, m.encoder.depth) == (1024, 24)
    assert count_params(m) == expected_count(m)
    m.decoder.head = "proxy_codes"
    assert count_params(m) == expected_count(m)


def generator_params(generator, vocab_size: int = 16384, num_classes: int = 1000) -> int:
    model = nnx.eval_shape(lambda: build_generator(generator, vocab_size=vocab_size, num_tokens=32,
                                                   num_classes=num_classes, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_every_config_file_builds():
    files = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")) if not p.endswith("__init__.py"))
    assert len(files) >= 3
    # Paper-scale configs take a required argument (a size, a token count): their first choice.
    required = {"nativetok.py": ":32", "recipe.py": ":nativetok,32", "dit.py": ":B", "d2it.py": ":B",
                "gen_imagenet.py": ":ar,B"}
    for path in files:
        config = load_config_file(path + required.get(os.path.basename(path), ""))
        # An experiment's config holds its runs' configs (the token-order experiment: three
        # tokenizers and a generator; the dynamic-grain experiment: a DVAE and a D²iT).
        runs = [config] if "model" in config or "task" in config else [
            run for run in config.values() if isinstance(run, ml_collections.ConfigDict) and ("model" in run or "task" in run)]
        assert runs, path
        for run in runs:
            if run.get("task") == "generator":  # a generator config holds no tokenizer model
                assert "model" not in run and generator_params(run.generator, 64, 2) > 0, path
            elif run.get("task", "tokenizer") == "tokenizer":  # D²iT's and DiT's configs: their own tests
                assert count_params(run.model) == expected_count(run.model), path


@pytest.mark.parametrize("scale", ["demo", "imagenet"])
def test_token_order_arms_differ_only_in_the_tokenizer_kind(scale, tmp_path):
    """The experiment is fair only if both tokenizers get the same data, budget and schedule."""
    config = load_config_file(os.path.join(CONFIG_DIR, f"token_order.py:{scale}"))
    native, order_free, causal_mask = config.native, config.order_free, config.causal_mask
    assert (native.model.kind, order_free.model.kind) == ("nativetok", "titok")
    # The causal-mask arm is the order-free tokenizer with its latent tokens masked, nothing else.
    assert causal_mask.model.latent_causal_mask and not order_free.model.latent_causal_mask
    causal_mask.model.latent_causal_mask = False
    assert causal_mask.to_dict() == order_free.to_dict()
    assert config.arms == "native,order_free,causal_mask" and config.seeds == 1
    assert native.train.to_dict() == order_free.train.to_dict()
    assert native.data.to_dict() == order_free.data.to_dict() == config.generator.data.to_dict()
    assert native.model.num_tokens == order_free.model.num_tokens
    assert native.model.quantizer.to_dict() == order_free.model.quantizer.to_dict()
    if scale == "demo":  # (the paper's scale needs weight files to validate)
        for tokenizer in (native, order_free):
            validate_training(tokenizer)
        config.generator.generator.tokenizer = str(tmp_path)  # the experiment names each arm's tokenizer
        validate_generator(config.generator)
        # Shortened so that three arms fit 30 minutes on 2 CPU cores; the schedule moves with it.
        assert native.train.num_steps == 1000 and config.generator.train.num_steps == 250
        assert native.train.eval_every == 500  # evaluations at the half and the end
        assert quantizer_warmup_steps(native.train) == 250  # the demo's quarter: its codes train for the rest


def test_token_order_table_is_the_demo_with_four_arms_three_seeds_and_longer_generators():
    demo = load_config_file(os.path.join(CONFIG_DIR, "token_order.py"))
    table = load_config_file(os.path.join(CONFIG_DIR, "token_order.py:table"))
    assert (table.arms, table.seeds) == ("native,order_free,causal_mask,native_permuted", 3)
    assert table.generator.train.num_steps == 400 and table.generator.train.eval_every == 200
    for name in ("native", "order_free", "causal_mask"):
        assert table[name].to_dict() == demo[name].to_dict()
    with pytest.raises(ValueError, match="unknown argument 'tabel'; one of: configs/token_order.py:demo, "
                                         "configs/token_order.py:table, configs/token_order.py:full, configs/token_order.py:imagenet"):
        load_config_file(os.path.join(CONFIG_DIR, "token_order.py:tabel"))


def test_token_order_full_is_the_table_on_the_demo_tokenizers_whole_budget_with_matched_encoders():
    """``:full``: the table's arms and seeds, every tokenizer at configs/demo.py's own schedule (the
    demo's whole budget), order-free encoders grown in depth to NativeTok's size."""
    demo_tokenizer = load_config_file(os.path.join(CONFIG_DIR, "demo.py"))
    table = load_config_file(os.path.join(CONFIG_DIR, "token_order.py:table"))
    full = load_config_file(os.path.join(CONFIG_DIR, "token_order.py:full"))
    assert (full.arms, full.seeds, full.match_parameters) == (table.arms, table.seeds, "depth")
    assert full.generator.to_dict() == table.generator.to_dict()
    for name in ("native", "order_free"):
        t = full[name].train
        assert (t.num_steps, t.learning_rate, t.warmup_steps) == (demo_tokenizer.train.num_steps,
                                                                 demo_tokenizer.train.learning_rate,
                                                                 demo_tokenizer.train.warmup_steps)
        assert t.eval_every == t.num_steps // 2
        assert quantizer_warmup_steps(t) == quantizer_warmup_steps(demo_tokenizer.train)
    assert full.native.model.to_dict() == demo_tokenizer.model.to_dict()
    assert full.causal_mask.model.latent_causal_mask and not full.order_free.model.latent_causal_mask


@pytest.mark.parametrize("size, millions", [("B", 111.0), ("L", 343.0)])
def test_llamagen_sizes_match_the_published_parameter_counts(size, millions):
    """LlamaGen's c2i GPT-B / GPT-L: 111 M / 343 M parameters with its 16384-code tokenizer."""
    config = load_config_file(os.path.join(CONFIG_DIR, f"gen_imagenet.py:ar,{size}"))
    assert abs(generator_params(config.generator) / 1e6 - millions) < 0.5


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("kind", "vqgan", "config.model.kind: must be one of"),
        ("dtype", "float16", "config.model.dtype: must be one of"),
        ("num_tokens", 0, "config.model.num_tokens: must be a positive integer, got 0"),
        ("image_size", 18, "config.model.image_size: 18 is not a multiple of patch_size=4"),
        ("encoder.num_heads", 3, "config.model.encoder.width: 32 is not divisible by num_heads=3"),
        ("experts.depth", 0, "config.model.experts.depth: must be a positive integer"),
        ("decoder.head", "rgb", "config.model.decoder.head: must be one of"),
        ("quantizer.codebook_size", -5, "config.model.quantizer.codebook_size: must be a positive integer"),
        ("quantizer.commitment_weight", -0.5, "config.model.quantizer.commitment_weight: must be a number >= 0"),
        ("experts.remat", 1, "config.model.experts.remat: must be True or False"),
    ],
)
def test_bad_fields_raise_config_errors_that_name_them(field, value, message):
    config = tiny_config()
    *parents, leaf = field.split(".")
    parent, name = config, "model"
    for child in parents:
        parent, name = parent[name], child
    # A fresh dict, since ConfigDict refuses values of another type than the default's (a JSON
    # config read back from a workdir has no such guard).
    parent[name] = ml_collections.ConfigDict({**parent[name].to_dict(), leaf: value})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_model(config.model, nnx.Rngs(0))


def test_missing_config_file_is_a_config_error():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file("configs/no_such_config.py")


def test_paper_hnt_schedule_grows_by_doubling_with_the_earlier_parts_frozen():
    config = load_config_file(os.path.join(CONFIG_DIR, "nativetok.py:128,hnt"))
    assert [(s.name, s.num_tokens, tuple(s.frozen)) for s in stage_list(config)] == [
        ("tokens_32", 32, ()),
        ("grow_64", 64, ("mit", "old_experts", "token_head", "quantizer")),
        ("grow_128", 128, ("mit", "old_experts", "token_head", "quantizer")),
        ("finetune", 128, ()),
    ]
    plain = load_config_file(os.path.join(CONFIG_DIR, "nativetok.py:128"))
    assert config.model.to_dict() == plain.model.to_dict() and not plain.hnt.stages
    assert [s.num_tokens for s in stage_list(load_config_file(os.path.join(CONFIG_DIR, "nativetok.py:64,hnt")))] == [32, 64, 64]


@pytest.mark.parametrize("kind, model_config", [("nativetok", "nativetok.py:32"), ("titok", "titok.py:32")])
def test_recipe_computes_as_the_paper_config_of_its_model(kind, model_config):
    """The recipe's model computes as its paper config does (bfloat16, remat, expert scans): in
    float32 keeping every activation, its NativeTok-128 stage 1 does not fit a v5p chip."""
    recipe = load_config_file(os.path.join(CONFIG_DIR, f"recipe.py:{kind},128")).model
    paper = load_config_file(os.path.join(CONFIG_DIR, model_config)).model
    for field in ("kind", "dtype", "encoder", "experts"):
        assert recipe.get(field) == paper.get(field), field
    assert recipe.get("attention_logits") == paper.get("attention_logits")
    assert recipe.decoder.remat == paper.decoder.remat and recipe.num_tokens == 128


@pytest.mark.parametrize("spec", ["recipe.py:nativetok,32", "recipe.py:titok,64", "demo_gan.py", "demo_gan.py:titok"])
def test_recipe_configs_validate_every_stage_once_weights_are_named(spec, tmp_path):
    config = load_config_file(os.path.join(CONFIG_DIR, spec))
    stages = hnt.stage_list(config)
    first = hnt.stage_config(config, stages[0])
    with pytest.raises(ConfigError, match=r"config.pretrained.(lpips|maskgit_vqgan): is needed"):
        validate_training(first)
    for name in ("lpips", "maskgit_vqgan"):
        (tmp_path / name).write_bytes(b"")
        config.pretrained[name] = str(tmp_path / name)
    for stage in stages:
        validate_training(hnt.stage_config(config, stage))
    if spec.startswith("recipe"):
        assert [s.name for s in stages] == ["proxy_codes", "decoder_finetune"]
        finetune = hnt.stage_config(config, stages[1])
        assert (first.train.losses.proxy, finetune.train.losses.proxy) == ("codes", "pixels")
        assert finetune.model.decoder.proxy_decoding == "soft" and finetune.train.losses.adversarial_weight > 0
        assert "decoder" not in stages[1].frozen and "quantizer" in stages[1].frozen
        assert count_params(finetune.model) == expected_count(finetune.model)
    else:
        assert first.train.losses.perceptual_weight > 0 and first.train.losses.adversarial_weight > 0


def test_stage_overrides_must_name_config_fields():
    config = tiny_config()
    config.hnt.stages = (dict(num_tokens=8, num_steps=2, overrides=(("train.losses.no_such_loss", 1.0),)),)
    with pytest.raises(ConfigError, match=r"config.hnt.stages\[0\].overrides: 'train.losses.no_such_loss' is not"):
        hnt.stage_list(config)


@pytest.mark.parametrize("kind, part", [("titok", "mit"), ("titok", "old_experts"), ("nativetok", "encoder")])
def test_a_stage_may_not_freeze_a_part_its_model_lacks(kind, part):
    """trainable_mask matched no parameter for such a part: nothing was frozen, and no error."""
    config = tiny_config()
    config.model.kind = kind
    config.hnt.stages = (dict(num_tokens=8, num_steps=2), dict(num_tokens=16, num_steps=2, frozen=(part, "decoder")))
    with pytest.raises(ConfigError, match=rf"config.hnt.stages\[1\].frozen: a {kind} model has no {part} \(its "
                                          r"parts: .*\), so nothing would be frozen"):
        hnt.stage_list(config)
    config.hnt.stages = (dict(num_tokens=8, num_steps=2), dict(num_tokens=16, num_steps=2, frozen=("decoder",)))
    assert hnt.stage_list(config)[1].frozen == ("decoder",)


def test_a_run_written_before_a_field_existed_reads_with_its_default(tmp_path):
    import json

    from nativetok_jax import checkpoints

    checkpoints.write_config(str(tmp_path), tiny_config())
    path = tmp_path / "config.json"
    stored = json.loads(path.read_text())
    del stored["model"]["decoder"]["proxy_decoding"], stored["pretrained"], stored["task"]
    path.write_text(json.dumps(stored))
    config = checkpoints.read_config(str(tmp_path))
    assert config.model.decoder.proxy_decoding == "argmax" and config.pretrained.lpips == ""
    assert config.model.image_size == 16  # stored values win over defaults


@pytest.mark.parametrize("spec", ["demo.py", "dvae_demo.py", "dit_demo.py"])
@pytest.mark.parametrize("field, value", [("data.permute_channels", "yes"), ("data.flip", 1), ("data.crop_min", 0.0),
                                          ("data.eval_crop_min", 0.3), ("data.eval_crop_min", -0.1)])
def test_every_trainer_that_crops_refuses_a_bad_crop_field_in_one_line(spec, field, value):
    from nativetok_jax import tasks

    config = load_config_file(os.path.join(CONFIG_DIR, spec))
    validate = tasks.of(config).validate
    validate(config)
    name = field.split(".")[1]
    config.data = ml_collections.ConfigDict({**config.data.to_dict(), name: value})  # untyped, as read from JSON
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(config)


@pytest.mark.parametrize("field, key", [("train.num_steps", "num_steps"), ("model.num_tokens", "num_tokens"),
                                        ("train.quantizer_warmup_steps", "quantizer_warmup_steps"),
                                        ("train.quantizer_warmup_fraction", "quantizer_warmup_steps")])
def test_a_stage_override_may_not_set_what_the_stage_sets_itself(field, key):
    """The trainer takes a stage's steps and warm-up from its own keys, its config.json from the
    overridden config: an override of one of them would train one value and record another."""
    config = tiny_config()
    config.hnt.stages = (dict(num_tokens=8, num_steps=20),
                         dict(num_tokens=8, num_steps=20, overrides=((field, 5),)))
    with pytest.raises(ConfigError, match=rf"config.hnt.stages\[1\].overrides: '{field}' is set by the stage's "
                                          rf"own '{key}' key; use that instead"):
        stage_list(config)


def test_a_stage_that_freezes_the_quantizer_may_not_warm_it_up():
    """The fit at a warm-up's end rewrites the codebook, which a frozen quantiser must keep."""
    config = tiny_config()
    config.hnt.stages = (dict(num_tokens=8, num_steps=20),
                         dict(num_tokens=8, num_steps=20, frozen=("quantizer",), quantizer_warmup_steps=5))
    with pytest.raises(ConfigError, match=r"config.hnt.stages\[1\].quantizer_warmup_steps: 5 would refit the "
                                          r"codebook the stage freezes"):
        stage_list(config)


@pytest.mark.parametrize("num_steps", [3200, 12800])
def test_the_gan_demo_starts_its_gan_with_the_quantiser_whatever_the_step_count(num_steps):
    """configs/demo_gan.py gives the start as a fraction, so --config.train.num_steps moves it with the
    warm-up (as a step count fixed at load time it stayed at 3,200 in a 3,200-step run: no GAN)."""
    from nativetok_jax.config import adversarial_start_step

    config = load_config_file("configs/demo_gan.py")
    config.train.num_steps = num_steps  # what --config.train.num_steps does, after get_config
    config.pretrained.lpips = "weights/lpips.npz"
    assert adversarial_start_step(config.train) == quantizer_warmup_steps(config.train) == num_steps // 4


def test_a_gan_that_would_never_start_is_a_one_line_error():
    from nativetok_jax.config import validate_training

    config = tiny_config()
    config.train.update(num_steps=100)
    config.train.losses.update(adversarial_weight=0.1, adversarial_start_step=100)
    with pytest.raises(ConfigError, match=r"train.losses.adversarial_start_step: the GAN would start at step 100 "
                                          r"of a 100-step run"):
        validate_training(config)
    config.train.losses.update(adversarial_start_step=10, adversarial_start_fraction=0.5)
    with pytest.raises(ConfigError, match=r"10 and train.losses.adversarial_start_fraction 0.5 are both set"):
        validate_training(config)
