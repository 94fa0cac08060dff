"""The codebook's care (training/codebook.py): the nearest-code search, spherical k-means and the
dead-code restart, each against a computation in numpy; the trainer's restart renews only the dead
rows (codebook, EMA, Adam moments); its settings are validated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from nativetok_jax import sharding
from nativetok_jax.config import ConfigError, validate_training
from nativetok_jax.layers.partitioning import axis_rules
from nativetok_jax.models.nativetok import build_model
from nativetok_jax.training import codebook as care
from nativetok_jax.training.state import build_state
from nativetok_jax.training.tokenizer_objective import tokenizer_train_step
from nativetok_jax.training.trainer import CodebookFit


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_the_nearest_code_search_in_chunks_matches_a_brute_force_argmax(monkeypatch):
    monkeypatch.setattr(care, "_CHUNK", 64)  # 1,000 points: 16 chunks, the last one padded
    rng = np.random.default_rng(0)
    points = unit(rng.normal(size=(1000, 6))).astype(np.float32)
    codebook = rng.normal(size=(37, 6)).astype(np.float32) * rng.uniform(0.5, 3, size=(37, 1)).astype(np.float32)
    ids, similarity = care.nearest_codes(jnp.asarray(points), jnp.asarray(codebook))
    cosine = points @ unit(codebook).T
    np.testing.assert_array_equal(np.asarray(ids), cosine.argmax(-1))
    np.testing.assert_allclose(np.asarray(similarity), cosine.max(-1), rtol=1e-5, atol=1e-6)


def test_spherical_kmeans_is_lloyds_iteration_with_cosine_similarity():
    rng = np.random.default_rng(1)
    points = unit(rng.normal(size=(300, 4))).astype(np.float32)
    start = unit(rng.normal(size=(8, 4))).astype(np.float32)
    start[7] *= 40  # codes need not be unit vectors: the search normalises them
    expected = unit(start)
    for _ in range(3):  # numpy's Lloyd: nearest by cosine, normalised mean, empty codes stay
        ids = (points @ expected.T).argmax(-1)
        for k in range(len(expected)):
            if np.any(ids == k):
                expected[k] = unit(points[ids == k].sum(0))
    got = care.spherical_kmeans(jnp.asarray(points), jnp.asarray(start), 3)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_kmeans_serves_the_outputs_better_than_its_random_start():
    rng = np.random.default_rng(2)
    centres = np.eye(4, dtype=np.float32)
    sizes = [900, 50, 30, 20]  # a random choice of outputs mostly lands in the big cluster
    points = jnp.asarray(unit(np.concatenate([c + 0.3 * rng.normal(size=(n, 4)) for c, n in zip(centres, sizes)])),
                         jnp.float32)
    key = jax.random.key(0)
    similarity = lambda codes: float(jnp.mean(care.nearest_codes(points, codes)[1]))
    start = care.fit_codebook(points, 16, key)
    fitted = care.fit_codebook(points, 16, key, kmeans_iterations=10)
    assert fitted.shape == (16, 4) and fitted.dtype == jnp.float32
    assert similarity(fitted) > similarity(start)  # Lloyd's iterations never serve the outputs worse


def test_dead_codes_are_reseeded_at_the_worst_served_outputs_and_live_ones_stay():
    codebook = np.array([[1, 0, 0], [0, 1, 0], [0, 0, -1], [-1, 0, 0]], np.float32)
    near = unit(np.array([[1, 0.01, 0], [0.01, 1, 0], [1, 0, 0.01]], np.float32))
    far = unit(np.array([[0, 0.2, 1]], np.float32))  # served badly by every code
    points = np.concatenate([near, far, far])
    renewed, dead = care.restart_dead_codes(jnp.asarray(points), jnp.asarray(codebook), jax.random.key(3))
    renewed, dead = np.asarray(renewed), np.asarray(dead)
    # Code 1 serves far too (cos 0.196 > 0), so only codes 2 and 3 are dead.
    np.testing.assert_array_equal(dead, [False, False, True, True])
    np.testing.assert_array_equal(renewed[:2], codebook[:2])
    distance = 2 - 2 * np.max(points @ codebook.T, -1)
    assert distance[3:].sum() / distance.sum() > 0.99  # the far outputs carry almost all the weight
    for row in renewed[2:]:
        assert np.linalg.norm(row - far[0]) < 0.1 or np.min(np.linalg.norm(near - row, axis=-1)) < 0.1


def test_with_every_output_on_a_code_the_restart_draws_uniformly():
    codebook = np.eye(3, dtype=np.float32)
    points = np.eye(3, dtype=np.float32)[[0, 0, 1]]
    renewed, dead = care.restart_dead_codes(jnp.asarray(points), jnp.asarray(codebook), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(dead), [False, False, True])
    assert np.all(np.isfinite(np.asarray(renewed)))
    assert np.min(np.linalg.norm(points - np.asarray(renewed)[2], axis=-1)) < 0.1


def test_the_fit_comes_at_the_warmups_end_and_restarts_every_so_many_steps_after_it():
    events = {step: care.care_at(step, 800, 200) for step in range(0, 1500)}
    assert {s: e for s, e in events.items() if e} == {800: "fit", 1000: "restart", 1200: "restart", 1400: "restart"}
    assert [s for s in range(0, 700) if care.care_at(s, 0, 200)] == [200, 400, 600]  # no warm-up: no fit
    assert not any(care.care_at(s, 800, 0) for s in range(801, 3000))


def test_batches_needed_counts_outputs_per_code():
    assert care.batches_needed(4096, 32, 32) == 4
    assert care.batches_needed(4096, 32, 32, per_code=8) == 32
    assert care.batches_needed(4096, 256, 32, per_code=8) == 4
    assert care.batches_needed(4096, 32, 32, per_code=100) == 64  # the limit
    assert care.batches_needed(16, 256, 32) == 1


@pytest.mark.parametrize("field,value", [("samples_per_code", 0), ("kmeans_iterations", -1),
                                         ("restart_dead_every", -100)])
def test_bad_codebook_settings_name_the_field(field, value):
    config = tiny_config()
    config.train.codebook[field] = value
    with pytest.raises(ConfigError, match=f"train.codebook.{field}"):
        validate_training(config)


@pytest.mark.slow
def test_the_restart_renews_only_dead_rows_with_their_ema_and_fresh_moments():
    config = tiny_config()
    config.train.update(batch_size=8, num_steps=4, warmup_steps=0, ema_decay=0.5)
    config.train.codebook.update(samples_per_code=1, restart_dead_every=1)
    mesh = sharding.make_mesh(config.mesh)
    built = build_state(lambda r: build_model(config.model, r), train=config.train, mesh=mesh,
                        rules=sharding.rules_of(config))
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    batch = {"image": images, "label": np.zeros(8, np.int32)}
    state, _ = tokenizer_train_step(built, config, 8)(built.state, batch)  # the EMA of a trained step
    adam = lambda s: s["opt_state"][1][0]  # (clip, adamw) -> adamw's scale_by_adam state
    state = jax.tree.map(lambda x: x, state)
    for moment in (adam(state).mu, adam(state).nu):  # as if every code had learned
        moment["quantizer"]["codebook"] = jnp.ones_like(moment["quantizer"]["codebook"])
    fit = CodebookFit(built, config, sharding.batch_sharding(mesh, (8, 16, 16, 3)))
    before = jax.tree.map(np.asarray, jax.device_get(state))
    state = fit.restart(state, iter([batch] * fit.count))
    after = jax.tree.map(np.asarray, jax.device_get(state))

    codebook = before["params"]["quantizer"]["codebook"]
    with jax.set_mesh(mesh), axis_rules(sharding.rules_of(config)):
        points = np.concatenate([np.asarray(fit._encode(before["params"], images))] * fit.count)
    used = np.zeros(len(codebook), bool)
    used[(points @ unit(codebook).T).argmax(-1)] = True
    assert 0 < used.sum() < len(codebook)
    new = after["params"]["quantizer"]["codebook"]
    np.testing.assert_array_equal(new[used], codebook[used])
    assert not np.any(np.all(new[~used] == codebook[~used], axis=-1))
    np.testing.assert_array_equal(after["ema"]["quantizer"]["codebook"][~used], new[~used])
    np.testing.assert_array_equal(after["ema"]["quantizer"]["codebook"][used],
                                  before["ema"]["quantizer"]["codebook"][used])
    for moment in ("mu", "nu"):
        old, fresh = getattr(adam(before), moment)["quantizer"]["codebook"], getattr(adam(after), moment)["quantizer"]["codebook"]
        assert not np.any(fresh[~used]) and np.all(old == 1)
        np.testing.assert_array_equal(fresh[used], old[used])
    np.testing.assert_array_equal(adam(after).mu["decoder"]["head"]["kernel"], adam(before).mu["decoder"]["head"]["kernel"])
