"""D²iT's Dynamic Content Transformer against DiT, its grain-map invariants, sizes and config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nativetok_jax.config import ConfigError, D2IT_SIZES, d2it_model_config, validate_d2it_model
from nativetok_jax.config import load_config_file
from nativetok_jax.diffusion.gaussian import GaussianDiffusion
from nativetok_jax.diffusion.respacing import respace
from nativetok_jax.diffusion.samplers import make_sampler
from nativetok_jax.diffusion.schedule import named_schedule
from nativetok_jax.models.d2it.content_transformer import (DynamicContentTransformer, copy_dit_parameters, d2it, d2it_from_config,
                                       parameter_count)
from nativetok_jax.models.dit.transformer import DiT

TINY = dict(input_size=8, in_channels=4, width=32, depth=2, num_heads=4, num_classes=5)


def _randomised(model, scale=0.2, seed=1):
    """Every parameter random, so no zero-initialised layer hides a difference."""
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return nnx.merge(graphdef, jax.tree.unflatten(tree, [scale * jax.random.normal(k, v.shape)
                                                         for k, v in zip(keys, leaves)]))


def _forward(model):
    """The model's forward pass, jitted with its state as an argument (one compile per structure)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, *inputs: nnx.merge(graphdef, state)(*inputs)), state


@pytest.fixture(scope="module")
def inputs():
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 4))
    t = jnp.array([0, 250, 500, 999])
    labels = jnp.array([0, 4, 5, 2])  # 5 = the null class
    mixed = jnp.asarray(np.random.default_rng(0).integers(0, 2, (4, 4, 4)), jnp.int32)
    return x, t, labels, mixed


@pytest.fixture(scope="module")
def dit_model():
    return _randomised(DiT(**TINY, patch_size=2, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def d2it_model(dit_model):
    """Refine depth 1, grain embedding and learnable positions on, DiT's parameters copied in."""
    model = _randomised(DynamicContentTransformer(**TINY, refine_depth=1, rngs=nnx.Rngs(0)), seed=2)
    copy_dit_parameters(dit_model, model)
    return model


def _dit_like(dit_model, **switches):
    model = DynamicContentTransformer(**TINY, rngs=nnx.Rngs(3), **switches)
    copy_dit_parameters(dit_model, model)
    return model


def test_all_fine_without_its_parts_is_dit(dit_model, inputs):
    x, t, labels, _ = inputs
    model = _dit_like(dit_model, refine_depth=0, grain_embedding=False, learnable_positions=False)
    assert parameter_count(model) == parameter_count(dit_model)
    fine = jnp.ones((4, 4, 4), jnp.int32)
    np.testing.assert_allclose(model(x, t, labels, fine), dit_model(x, t, labels), rtol=0, atol=1e-6)


def test_all_coarse_is_dit_followed_by_2x2_averaging(dit_model, inputs):
    x, t, labels, _ = inputs
    # Learnable positions start at DiT's sin-cos, and a RefineNet changes no coarse token.
    model = _dit_like(dit_model, refine_depth=1, grain_embedding=False, learnable_positions=True)
    out = np.asarray(model(x, t, labels, jnp.zeros((4, 4, 4), jnp.int32)))
    reference = np.asarray(dit_model(x, t, labels)).reshape(4, 4, 2, 4, 2, 8).mean(axis=(2, 4))
    expected = reference.repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_refinenet_leaves_coarse_outputs_unchanged_and_coarse_outputs_are_constant(d2it_model, inputs):
    x, t, labels, grains = inputs
    forward, state = _forward(d2it_model)
    out = np.asarray(forward(state, x, t, labels, grains))
    assert out.shape == (4, 8, 8, 8) and out.dtype == np.float32
    refine = nnx.state(d2it_model.refine_blocks)
    perturbed = jax.tree.map(lambda a: a + 0.5 * jax.random.normal(jax.random.key(4), a.shape), refine)
    state_p = nnx.state(d2it_model)
    nnx.replace_by_pure_dict(state_p, {"refine_blocks": nnx.to_pure_dict(perturbed)})
    out_p = np.asarray(forward(state_p, x, t, labels, grains))
    cells = np.asarray(grains).repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_array_equal(out_p[cells == 0], out[cells == 0])
    assert not np.allclose(out_p[cells == 1], out[cells == 1])  # the RefineNet does refine the fine ones
    blocks = out.reshape(4, 4, 2, 4, 2, 8).transpose(0, 1, 3, 2, 4, 5).reshape(4, 4, 4, 4, 8)
    coarse = blocks[np.asarray(grains) == 0]
    np.testing.assert_array_equal(coarse, np.broadcast_to(coarse[:, :1], coarse.shape))
    fine = blocks[np.asarray(grains) == 1]
    assert np.all(fine[:, 0] != fine[:, 1])


def test_sampling_keeps_coarse_regions_exact_copies_with_guidance(d2it_model):
    diffusion = GaussianDiffusion(respace(named_schedule("linear", 1000), "ddim4"))
    graphdef, state = nnx.split(d2it_model)
    sampler = make_sampler(lambda params, *inputs: nnx.merge(graphdef, params)(*inputs), diffusion, (8, 8, 4),
                           method="ddpm", guidance_scale=4.0, null_label=5)
    grains = jnp.asarray(np.random.default_rng(1).integers(0, 2, (8, 4, 4)), jnp.int32)
    samples = np.asarray(sampler(state, jnp.arange(8) % 5, jax.random.key(5), None, grains))
    blocks = samples.reshape(8, 4, 2, 4, 2, 4).transpose(0, 1, 3, 2, 4, 5).reshape(8, 4, 4, 4, 4)
    coarse = blocks[np.asarray(grains) == 0]
    assert np.all(np.isfinite(samples)) and coarse.size
    np.testing.assert_array_equal(coarse, np.broadcast_to(coarse[:, :1], coarse.shape))


@pytest.mark.parametrize("size", ["B", "L", "XL"])
def test_parameter_counts_are_dits_plus_the_grain_embedding(size):
    width, depth, refine, _ = D2IT_SIZES[size]
    assert depth + refine == {"B": 12, "L": 24, "XL": 28}[size] and refine == 2
    model = nnx.eval_shape(lambda: d2it(size, rngs=nnx.Rngs(0)))
    dit_count = {"B": 130_512_416, "L": 458_102_816, "XL": 675_129_632}[size]  # DiT's published counts
    assert parameter_count(model) == dit_count + 2 * width


def test_every_parameter_has_logical_axes_and_both_stacks_are_stacked():
    model = nnx.eval_shape(lambda: DynamicContentTransformer(**TINY, refine_depth=3, rngs=nnx.Rngs(0)))
    paths = set()
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = variable.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == variable.ndim, path
        paths.add(path[0])
        if path[0] in ("blocks", "refine_blocks"):
            assert axes[0] == "layers" and variable.shape[0] == (2 if path[0] == "blocks" else 3), path
    assert {"refine_blocks", "grain_embedding", "positions"} <= paths


def test_config_builds_the_model_and_bad_input_names_the_problem(inputs):
    x, t, labels, grains = inputs
    config = load_config_file("configs/d2it.py:B")
    assert config.task == "d2it" and "workdir" in config.dvae and "grain_transformer" in config
    validate_d2it_model(config.model)
    assert (config.model.depth, config.model.refine_depth, config.model.width) == (10, 2, 768)
    assert tuple(config.model.diffusion.grain_loss) == (0.25, 1.0)
    model_config = d2it_model_config("B")
    model_config.update(image_size=64, width=32, depth=1, refine_depth=1, num_heads=4, num_classes=5)
    model = d2it_from_config(model_config, nnx.Rngs(0))
    assert (model.input_size, model.in_channels, model.refine_depth) == (8, 4, 1)
    for field, value in (("refine_depth", -1), ("patch_size", 4), ("image_size", 40)):
        bad = d2it_model_config("B")
        bad[field] = value
        with pytest.raises(ConfigError, match=f"model.{field}"):
            validate_d2it_model(bad)
    bad = d2it_model_config("B")
    bad.diffusion.grain_loss = (0.0, 0.0)
    with pytest.raises(ConfigError, match="model.diffusion.grain_loss"):
        validate_d2it_model(bad)
    with pytest.raises(ValueError, match=r"grains must be \[4, 4, 4\]"):
        model(x, t, labels, grains[:, :2])
    with pytest.raises(ValueError, match="integer grain map"):
        model(x, t, labels, grains.astype(jnp.float32))
    with pytest.raises(ValueError, match="DynamicContentTransformer: x must be"):
        model(x[:, :4], t, labels, grains)
    with pytest.raises(ValueError, match="unknown D²iT size"):
        d2it("S", rngs=nnx.Rngs(0))


def tiny_d2it_config():
    """A D²iT run small enough for a test: 8 x 8 x 4 latents (32 px, f4), 4 x 4 grain maps."""
    from nativetok_jax.config import d2it_config

    config = d2it_config("B")
    m = config.model
    m.image_size, m.fine_factor = 32, 4
    m.width, m.depth, m.refine_depth, m.num_heads, m.num_classes = 32, 1, 1, 4, 5
    config.grain_transformer.update(width=16, depth=1, num_heads=2)
    config.mesh.update(data=-1, fsdp=1, model=1)
    return config


@pytest.mark.slow
def test_bench_runs_d2its_train_step_and_sampler():
    """``bench diffusion`` on a D²iT config: its real train step (both transformers) and its
    multi-grained sampler (the timing and FLOP arithmetic is DiT's, tested with DiT's bench)."""
    from nativetok_jax import sharding
    from nativetok_jax.bench import diffusion as bench

    config = tiny_d2it_config()
    step, built, batch = bench._step(config, 8)
    assert batch["grains"].shape == (8, 2, 4, 4) and batch["mean"].shape == (8, 2, 8, 8, 4)
    with jax.set_mesh(sharding.make_mesh(config.mesh)):
        state, metrics = step(built.state, batch)  # (the step donates the state it is given)
    assert all(np.isfinite(float(v)) for v in jax.tree.leaves(metrics))
    assert {"content_loss", "grain_loss"} <= set(metrics)
    mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_of(config)
    row = bench.measure_sampler(config, state["params"], built.graphdef, mesh, rules, "ddim", "ddim50", 1.0, 8, 2)
    assert (row["steps"], row["timed_steps"], row["num_images"]) == (50, 2, 8) and row["images_per_s"] > 0
