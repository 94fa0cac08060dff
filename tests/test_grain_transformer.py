"""D²iT's Dynamic Grain Transformer: it learns each class's fine fraction, and its interface.

The training fixture trains two tiny grain transformers together (one compile) on synthetic 4 x 4
grain maps (the 32 px demo's size) with a row structure: a conditional one on two classes of very
different fine fractions (class 0 mostly coarse, fine regions at the bottom: sky above, detail
below; class 1 mostly fine), and an unconditional one on unlabelled maps of one distribution.

An unconditional model trained on the *two-class* set must get the mixture weight right from
its first decoded grains; at this size and training length (150 steps) its samples' pooled fine
fraction varied by up to 0.085 across seeds (0.44 to 0.56 against 0.47), too close to the
0.1 tolerance for a test, so the unconditional test uses a single distribution, FFHQ's case.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from nativetok_jax import sharding
from nativetok_jax.config import DEFAULT_RULES, ConfigError, default_grain_transformer_config
from nativetok_jax.evaluation.grain_statistics import fine_fraction_by_class
from nativetok_jax.generation.grain_maps import sample_grain_maps
from nativetok_jax.layers.partitioning import axis_rules
from nativetok_jax.models.d2it.grain_transformer import (
    GrainTransformer,
    grain_sampling_settings,
    grain_transformer_from_config,
    grain_transformer_loss,
)

GRAIN_SHAPE = (4, 4)
# Each class's probability that a region of a row is fine (rows top to bottom), regions independent:
# fine fractions 0.15 and 0.80.
ROW_FINE_PROBABILITY = np.array([[0.0, 0.05, 0.15, 0.4], [0.95, 0.85, 0.75, 0.65]])
# The unlabelled set: one distribution, fine fraction 0.40.
UNLABELLED_ROW_FINE_PROBABILITY = np.array([[0.7, 0.5, 0.3, 0.1]])
NUM_SAMPLES = 256  # per sampling call, half of each class
TRAIN_STEPS = 150
SAMPLE_STEPS = 4


def synthetic_grain_maps(num_maps: int, seed: int, row_fine_probability: np.ndarray = ROW_FINE_PROBABILITY
                         ) -> tuple[np.ndarray, np.ndarray]:
    """int8 ``[n, 4, 4]`` maps and int32 ``[n]`` labels, classes (rows of ``row_fine_probability``) in turn."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(num_maps) % len(row_fine_probability)).astype(np.int32)
    probability = np.broadcast_to(row_fine_probability[labels][:, :, None], (num_maps, *GRAIN_SHAPE))
    return (rng.random(probability.shape) < probability).astype(np.int8), labels


def tiny(num_classes: int, seed: int = 0) -> GrainTransformer:
    return GrainTransformer(grain_shape=GRAIN_SHAPE, num_classes=num_classes, width=32, depth=1, num_heads=2,
                            mlp_ratio=2.0, rngs=nnx.Rngs(seed))


def train_pair(seed: int) -> dict:
    """A conditional model trained on the two-class set and an unconditional one on unlabelled maps
    of one distribution (as FFHQ's), trained together with Adam in one jitted scan."""
    grains, labels = synthetic_grain_maps(1024, seed=seed)
    unlabelled = synthetic_grain_maps(1024, seed=seed + 1, row_fine_probability=UNLABELLED_ROW_FINE_PROBABILITY)[0]
    graphdef, params = nnx.split(nnx.jit(lambda: [tiny(2, seed), tiny(0, seed)])())
    optimizer = optax.adam(5e-3)
    data = jnp.asarray(grains), jnp.asarray(unlabelled), jnp.asarray(labels)

    @jax.jit
    def train(params, key):
        def step(carry, key):
            params, opt_state = carry
            index_key, loss_key = jax.random.split(key)
            index = jax.random.randint(index_key, (32,), 0, len(grains))
            labelled, unlabelled, labels = (x[index] for x in data)

            def loss_fn(params):
                conditional, unconditional = nnx.merge(graphdef, params)
                return (grain_transformer_loss(conditional, labelled, labels, loss_key)[0]
                        + grain_transformer_loss(unconditional, unlabelled, jnp.zeros_like(labels), loss_key)[0])

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(key, TRAIN_STEPS))
        return params, losses

    params, losses = train(params, jax.random.key(seed))
    conditional, unconditional = nnx.merge(graphdef, params)
    return dict(conditional=conditional, unconditional=unconditional, grains=grains, labels=labels,
                unlabelled=unlabelled, losses=np.asarray(losses))


@pytest.fixture(scope="module")
def trained() -> dict:
    return train_pair(seed=0)


SAMPLE_LABELS = np.arange(NUM_SAMPLES, dtype=np.int32) % 2


def draw(model, seed: int, labels=SAMPLE_LABELS) -> np.ndarray:
    return np.asarray(sample_grain_maps(model, labels, jax.random.key(seed), num_steps=SAMPLE_STEPS))


def test_samples_have_each_class_fine_fraction_and_row_structure(trained):
    losses = trained["losses"]
    assert np.isfinite(losses).all() and losses[-20:].mean() < 0.7 * losses[:5].mean(), losses
    data = fine_fraction_by_class(trained["grains"], trained["labels"], 2)
    np.testing.assert_allclose(data, [0.15, 0.80], atol=0.02)  # the synthetic set is what it claims
    samples = draw(trained["conditional"], seed=1)
    np.testing.assert_allclose(fine_fraction_by_class(samples, SAMPLE_LABELS, 2), data, atol=0.1)
    # Where in the map the fine regions fall is learned too (128 maps x 4 regions per row and class).
    for label in (0, 1):
        rows = samples[SAMPLE_LABELS == label].mean(axis=(0, 2))
        np.testing.assert_allclose(rows, ROW_FINE_PROBABILITY[label], atol=0.15)


def test_unconditional_model_samples_the_data_fine_fraction_whatever_the_label(trained):
    model, unlabelled = trained["unconditional"], trained["unlabelled"]
    assert not model.conditional and model.class_embedding.shape == (1, 32)
    # No labels: every map pools into one class, whatever the labels say.
    pooled = fine_fraction_by_class(unlabelled, trained["labels"], 0)
    assert pooled.shape == (1,) and abs(pooled[0] - unlabelled.mean()) < 1e-12
    np.testing.assert_allclose(pooled, [0.40], atol=0.02)
    samples = draw(model, seed=2)
    np.testing.assert_allclose(fine_fraction_by_class(samples, SAMPLE_LABELS, 0), pooled, atol=0.1)
    np.testing.assert_allclose(samples.mean(axis=(0, 2)), UNLABELLED_ROW_FINE_PROBABILITY[0], atol=0.15)
    np.testing.assert_array_equal(draw(model, seed=2, labels=np.zeros(NUM_SAMPLES, np.int32)), samples)


def test_guidance_mixes_the_class_and_the_null_class(trained):
    model, key = trained["conditional"], jax.random.key(6)

    def guided(scale: float) -> np.ndarray:
        return np.asarray(sample_grain_maps(model, SAMPLE_LABELS, key, num_steps=SAMPLE_STEPS, guidance_scale=scale))

    null = np.full(NUM_SAMPLES, model.null_class, np.int32)
    np.testing.assert_array_equal(guided(0.0), draw(model, seed=6, labels=null))
    # Beyond 1, guidance moves each class away from the null class: class 0 coarser, class 1 finer.
    plain = fine_fraction_by_class(draw(model, seed=6), SAMPLE_LABELS, 2)
    sharpened = fine_fraction_by_class(guided(3.0), SAMPLE_LABELS, 2)
    assert sharpened[0] < plain[0] and sharpened[1] > plain[1], (plain, sharpened)


def test_sampling_is_seeded_shaped_and_jittable(trained):
    model = trained["conditional"]
    first = sample_grain_maps(model, SAMPLE_LABELS, jax.random.key(3), num_steps=SAMPLE_STEPS)
    assert first.shape == (NUM_SAMPLES, *GRAIN_SHAPE) and first.dtype == jnp.int32
    assert set(np.unique(first)) <= {0, 1}
    np.testing.assert_array_equal(draw(model, seed=3), first)
    assert (draw(model, seed=4) != np.asarray(first)).any()
    graphdef, params = nnx.split(model)
    jitted = jax.jit(lambda params, labels, key: sample_grain_maps((graphdef, params), labels, key,
                                                                   num_steps=SAMPLE_STEPS))
    np.testing.assert_array_equal(jitted(params, SAMPLE_LABELS, jax.random.key(3)), first)


def test_bad_grain_maps_and_labels_get_one_line_errors(trained):
    model, key = trained["conditional"], jax.random.key(0)
    grains, labels = trained["grains"][:8], trained["labels"][:8]
    cases = [
        (grains * 2, labels, r"grains must hold only 0 \(coarse\) and 1 \(fine\), found \[2\]"),
        (grains[:, :3], labels, r"grains must be \[batch, 4, 4\], got shape \(8, 3, 4\)"),
        (grains.astype(np.float32), labels, "grains must be integer grain ids"),
        (grains, labels[:4], r"labels must be \[8\]"),
        (grains, labels + 2, r"labels must lie in \[0, 2\] \(2: unconditional\), got 2\.\.3"),
    ]
    for bad_grains, bad_labels, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            grain_transformer_loss(model, bad_grains, bad_labels, key)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        sample_grain_maps(model, np.array([0, 3]), key)
    with pytest.raises(ValueError, match=r"found \[-1\]"):
        fine_fraction_by_class(grains - 1, labels, 2)


def test_fine_fraction_by_class_counts_regions():
    grains = np.array([[[1, 0], [0, 0]], [[1, 1], [1, 0]], [[0, 0], [0, 0]], [[1, 1], [1, 1]]], np.int8)
    labels = np.array([0, 0, 2, 2])
    # Class 0: 4 fine regions of 8; class 1: no maps (NaN, not "all coarse"); class 2: 4 of 8.
    np.testing.assert_array_equal(fine_fraction_by_class(grains, labels, 3), [0.5, np.nan, 0.5])
    np.testing.assert_array_equal(fine_fraction_by_class(grains, labels, 1), [0.5])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\), got 0\.\.2"):
        fine_fraction_by_class(grains, labels, 2)


def test_config_builds_the_documented_model_and_names_bad_fields():
    section = default_grain_transformer_config()
    assert section.choice_temperature == math.inf  # a random keep order keeps the fine fraction
    assert grain_sampling_settings(section) == dict(num_steps=8, temperature=1.0, choice_temperature=math.inf,
                                                    guidance_scale=1.0)
    section.update(width=16, depth=2, num_heads=2)
    for num_classes, table_rows, conditional in ((10, 11, True), (1, 1, False), (0, 1, False)):
        model = nnx.eval_shape(lambda: grain_transformer_from_config(section, num_classes, (16, 16), nnx.Rngs(0)))
        assert model.class_embedding.shape == (table_rows, 16) and model.conditional == conditional
        assert model.num_tokens == 256 and model.head.kernel.shape == (16, 2) and model.mask_id == 2
    for field, value, message in (("num_heads", 3, "config.grain_transformer.width: 16 is not divisible"),
                                  ("label_drop_probability", 1.0, "config.grain_transformer.label_drop_probability"),
                                  ("guidance_scale", math.inf, "config.grain_transformer.guidance_scale"),
                                  ("dtype", "float16", "config.grain_transformer.dtype")):
        bad = section.copy_and_resolve_references()
        bad[field] = value
        with pytest.raises(ConfigError, match=message):
            grain_transformer_from_config(bad, 2, (16, 16), nnx.Rngs(0))


def test_sampling_under_a_mesh_matches_one_device(trained):
    """As a trainer draws maps on a pod: parameters sharded by their logical axes, labels on data x fsdp."""
    model = trained["conditional"]
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, model=2)))
    graphdef, _ = nnx.split(model)
    params = jax.device_put(sharding.params_of(model), sharding.param_shardings(model, mesh, DEFAULT_RULES))
    labels = jax.device_put(SAMPLE_LABELS, sharding.batch_sharding(mesh, SAMPLE_LABELS.shape))
    with jax.set_mesh(mesh), axis_rules(DEFAULT_RULES):
        maps = sample_grain_maps((graphdef, params), labels, jax.random.key(3), num_steps=SAMPLE_STEPS)
    assert maps.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(maps, draw(model, seed=3))
