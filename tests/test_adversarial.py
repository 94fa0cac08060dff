"""The adversarial objective: hinge and LeCam values, VQGAN's adaptive weight, the patch
discriminator, and a train step in which each player's update moves only its own parameters."""

import pytest
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import tiny_config
from nativetok_jax import sharding
from nativetok_jax.models.nativetok import build_model
from nativetok_jax.models.discriminator import PatchDiscriminator
from nativetok_jax.training import losses as L
from nativetok_jax.training.adversarial import build_discriminator
from nativetok_jax.training.state import build_state
from nativetok_jax.training.tokenizer_objective import tokenizer_train_step


def test_hinge_losses_and_lecam_match_hand_computed_values():
    real = jnp.array([2.0, 0.5, -1.0])
    fake = jnp.array([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2.5] -> mean 7/6.
    np.testing.assert_allclose(L.hinge_discriminator_loss(real, fake), 0.5 * (5 / 6 + 7 / 6), rtol=1e-6)
    np.testing.assert_allclose(L.hinge_generator_loss(fake), -(-2.0 + 0.0 + 1.5) / 3, rtol=1e-6)
    # relu(real - 0.25)^2 = [3.0625, .0625, 0]; relu(0.75 - fake)^2 = [7.5625, .5625, 0].
    lecam = L.lecam_regularizer(real, fake, real_ema=jnp.float32(0.75), fake_ema=jnp.float32(0.25))
    np.testing.assert_allclose(lecam, (3.0625 + 0.0625) / 3 + (7.5625 + 0.5625) / 3, rtol=1e-6)


def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms():
    rng = np.random.default_rng(0)
    h, w, y, v = (rng.normal(size=s).astype(np.float32) for s in [(6, 4), (4, 3), (6, 3), (3,)])
    reconstruction_loss = lambda kernel: jnp.mean(jnp.square(h @ kernel - y))
    generator_loss = lambda kernel: -jnp.mean((h @ kernel) @ v)
    rec_grad = 2 * h.T @ (h @ w - y) / y.size  # d/dW mean((hW - y)^2)
    gan_grad = -np.outer(h.sum(0), v) / len(h)  # d/dW -mean(hWv)
    expected = np.linalg.norm(rec_grad) / (np.linalg.norm(gan_grad) + 1e-4)
    np.testing.assert_allclose(L.adaptive_weight(reconstruction_loss, generator_loss, jnp.asarray(w)), expected, rtol=1e-5)
    # The clip, and no gradient through the weight.
    np.testing.assert_allclose(L.adaptive_weight(reconstruction_loss, generator_loss, jnp.asarray(w), max_weight=0.01), 0.01)
    grad = jax.grad(lambda k: L.adaptive_weight(reconstruction_loss, generator_loss, k))(jnp.asarray(w))
    assert not np.any(grad)


def test_patch_discriminator_shapes_and_vqgan_parameter_count():
    discriminator = PatchDiscriminator(rngs=nnx.Rngs(0))  # VQGAN's NLayerDiscriminator(ndf=64, n_layers=3)
    count = sum(x.size for x in jax.tree.leaves(nnx.state(discriminator, nnx.Param)))
    assert count == 2_765_633  # the PyTorch original's count
    assert discriminator(jnp.zeros((2, 256, 256, 3))).shape == (2, 30, 30)  # VQGAN's 30x30 patches
    assert discriminator(jnp.zeros((1, 32, 32, 3))).shape == (1, 2, 2)


def _adversarial_step(generator_lr: float, discriminator_lr: float):
    config = tiny_config()
    config.train.update(batch_size=8, learning_rate=generator_lr, warmup_steps=0, ema_decay=0.0)
    config.train.losses.update(adversarial_weight=0.5, lecam_weight=0.1)
    config.discriminator.update(width=8, depth=2, learning_rate=discriminator_lr)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_of(config)
    built = build_state(lambda r: build_model(config.model, r), train=config.train, mesh=mesh, rules=rules, num_steps=10)
    discriminator, part, part_shardings = build_discriminator(config, 10, mesh, rules)
    built.add_part("discriminator", part, part_shardings)
    state = built.state
    image_sharding = sharding.batch_sharding(mesh, (8, 16, 16, 3))
    step = tokenizer_train_step(built, config, 8, discriminator=discriminator)
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    batch = {"image": jax.device_put(images, image_sharding), "label": np.zeros(8, np.int32)}
    before = jax.tree.map(np.asarray, state)
    with jax.set_mesh(mesh):
        after, metrics = step(state, batch)
    return before, jax.tree.map(np.asarray, after), jax.device_get(metrics)


def _changed(before, after) -> bool:
    return any(np.any(a != b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


@pytest.mark.slow
def test_each_player_updates_only_its_own_parameters():
    # The generator cannot learn (lr 0): only the discriminator's parameters move, and back.
    before, after, metrics = _adversarial_step(generator_lr=0.0, discriminator_lr=1e-2)
    assert not _changed(before["params"], after["params"])
    assert _changed(before["discriminator"]["params"], after["discriminator"]["params"])
    assert metrics["adversarial_weight"] > 0 and np.isfinite(metrics["discriminator_loss"])
    before, after, _ = _adversarial_step(generator_lr=1e-2, discriminator_lr=0.0)
    assert _changed(before["params"], after["params"])
    assert not _changed(before["discriminator"]["params"], after["discriminator"]["params"])
    # LeCam's running means follow the discriminator's mean logits: decay 0.999 from 0.
    lecam = after["discriminator"]["lecam"]
    assert lecam["real"] != 0 and abs(lecam["real"]) < 0.01


def test_discriminator_schedule_spans_the_updates_it_makes_not_the_whole_run():
    """Its optimiser counts only its own updates (none before the GAN starts), so a cosine decay to 0
    over a 10-step run whose GAN starts at step 6 must reach its end in 4 updates: the 4th update's
    rate is cos-decay(3 / 4) = 0.146 of the peak (over 10 updates it would be 0.794)."""
    config = tiny_config()
    config.train.num_steps = 10
    config.train.losses.update(adversarial_weight=0.5, adversarial_start_step=6)
    config.discriminator.update(width=8, depth=2, learning_rate=1.0, final_learning_rate_ratio=0.0,
                                warmup_steps=0, weight_decay=0.0)
    mesh = sharding.make_mesh(config.mesh)
    discriminator, part, _ = build_discriminator(config, 10, mesh, sharding.rules_of(config))
    params = jax.tree.map(np.asarray, part["params"])
    grads = jax.tree.map(np.ones_like, params)  # Adam's first moments / root second moments are then 1
    opt_state = discriminator.optimizer.init(params)
    rates = []
    for _ in range(4):
        updates, opt_state = discriminator.optimizer.update(grads, opt_state, params)
        rates.append(-float(jax.tree.leaves(updates)[0].ravel()[0]))
    expected = [0.5 * (1 + np.cos(np.pi * k / 4)) for k in range(4)]
    np.testing.assert_allclose(rates, expected, rtol=1e-4)
