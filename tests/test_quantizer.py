"""The quantiser: cosine lookup, loss values, straight-through gradients, usage statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from nativetok_jax.models.nativetok import build_model
from nativetok_jax.sharding import params_of
from nativetok_jax.models.nativetok.quantizer import Quantizer, code_statistics, rotation_trick


def quantizer_with(codebook: np.ndarray, commitment_weight: float = 0.25) -> Quantizer:
    q = Quantizer(*codebook.shape, commitment_weight=commitment_weight, rngs=nnx.Rngs(0))
    q.codebook[...] = jnp.asarray(codebook, jnp.float32)
    return q


def test_lookup_is_argmax_of_cosine_similarity():
    rng = np.random.default_rng(0)
    codebook = rng.normal(size=(64, 12)) * rng.uniform(0.1, 5.0, size=(64, 1))  # norms must not matter
    z = rng.normal(size=(3, 10, 12)) * 3.0
    cosine = (z / np.linalg.norm(z, axis=-1, keepdims=True)) @ (
        codebook / np.linalg.norm(codebook, axis=-1, keepdims=True)
    ).T
    out = quantizer_with(codebook)(jnp.asarray(z, jnp.float32))
    np.testing.assert_array_equal(out.ids, cosine.argmax(-1))
    assert out.ids.dtype == jnp.int32
    expected = codebook[cosine.argmax(-1)]
    np.testing.assert_allclose(out.tokens, expected / np.linalg.norm(expected, axis=-1, keepdims=True), atol=1e-6)


def test_losses_on_a_hand_made_case():
    # z = (3, 4) normalises to (0.6, 0.8); the nearest unit code is (0, 1).
    out = quantizer_with(np.array([[1.0, 0.0], [0.0, 2.0]]), commitment_weight=0.25)(jnp.array([[3.0, 4.0]]))
    assert int(out.ids[0]) == 1
    squared = ((0.0 - 0.6) ** 2 + (1.0 - 0.8) ** 2) / 2  # mean over the 2 dimensions = 0.2
    assert float(out.codebook_loss) == pytest.approx(squared, rel=1e-6)
    assert float(out.commitment_loss) == pytest.approx(squared, rel=1e-6)
    assert float(out.loss) == pytest.approx(squared * 1.25, rel=1e-6)


def test_codebook_loss_moves_codes_and_commitment_loss_moves_inputs():
    q = quantizer_with(np.array([[1.0, 0.0], [0.0, 1.0]]))
    z = jnp.array([[3.0, 4.0]])

    def gradients(name):
        g_q, g_z = nnx.grad(lambda q, z: getattr(q(z), name), argnums=(0, 1))(q, z)
        return np.abs(g_q.codebook[...]).sum(), np.abs(g_z).sum()

    g_code, g_z = gradients("codebook_loss")
    assert g_code > 0 and g_z == 0
    g_code, g_z = gradients("commitment_loss")
    assert g_code == 0 and g_z > 0


def test_straight_through_gradient_equals_gradient_through_normalisation():
    q = quantizer_with(np.random.default_rng(1).normal(size=(16, 4)))
    z = jnp.asarray(np.random.default_rng(2).normal(size=(5, 4)), jnp.float32)
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(5, 4)), jnp.float32)

    through_quantiser = jax.grad(lambda z: jnp.sum(weights * q(z).tokens))(z)
    through_identity = jax.grad(lambda z: jnp.sum(weights * z / jnp.linalg.norm(z, axis=-1, keepdims=True)))(z)
    np.testing.assert_allclose(through_quantiser, through_identity, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_reconstruction_gradient_reaches_the_encoder():
    model = build_model(tiny_config().model, nnx.Rngs(0))
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)

    def reconstruction_loss(model):
        reconstruction, _ = model(images)
        return jnp.mean(jnp.square(reconstruction - images))

    grads = params_of(nnx.jit(nnx.grad(reconstruction_loss))(model))
    for part in ("mit", "experts", "token_head"):
        assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[part])) > 0, part


def test_usage_statistics():
    perplexity, usage = code_statistics(jnp.array([0, 0, 1, 1, 2, 2, 3, 3]), codebook_size=16)
    assert float(perplexity) == pytest.approx(4.0, rel=1e-6)  # uniform over 4 codes
    assert float(usage) == pytest.approx(4 / 16)
    perplexity, usage = code_statistics(jnp.full((10,), 5), codebook_size=16)
    assert float(perplexity) == pytest.approx(1.0)
    assert float(usage) == pytest.approx(1 / 16)


def test_the_rotation_trick_gives_the_code_forward_and_the_rotated_gradient_backward():
    rng = np.random.default_rng(3)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    z = unit(rng.normal(size=(5, 6))).astype(np.float32)
    q = unit(rng.normal(size=(5, 6))).astype(np.float32)
    g = rng.normal(size=(5, 6)).astype(np.float32)
    np.testing.assert_allclose(rotation_trick(jnp.asarray(z), jnp.asarray(q)), q, atol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(rotation_trick(x, jnp.asarray(q)) * g))(jnp.asarray(z))
    for zi, qi, gi, got in zip(z, q, g, np.asarray(grad)):
        # The rotation in the plane of z and q by their angle, built from that angle (Rodrigues),
        # not from the two reflections the implementation uses.
        u = zi
        w = unit(qi - (qi @ u) * u)
        c, s = qi @ u, w @ qi
        rotation = np.eye(6) + s * (np.outer(w, u) - np.outer(u, w)) + (c - 1) * (np.outer(u, u) + np.outer(w, w))
        np.testing.assert_allclose(rotation @ zi, qi, atol=1e-5)
        np.testing.assert_allclose(got, rotation.T @ gi, atol=1e-5)
        assert np.linalg.norm(got) == pytest.approx(np.linalg.norm(gi), rel=1e-5)  # a rotation keeps norms


def test_the_rotation_estimator_quantises_like_straight_through():
    rng = np.random.default_rng(4)
    codebook = rng.normal(size=(32, 8))
    z = jnp.asarray(rng.normal(size=(2, 7, 8)), jnp.float32)
    plain = quantizer_with(codebook)(z)
    q = Quantizer(*codebook.shape, estimator="rotation", rngs=nnx.Rngs(0))
    q.codebook[...] = jnp.asarray(codebook, jnp.float32)
    rotated = q(z)
    np.testing.assert_array_equal(rotated.ids, plain.ids)
    np.testing.assert_allclose(rotated.tokens, plain.tokens, atol=1e-5)
    assert float(rotated.loss) == pytest.approx(float(plain.loss))
    with pytest.raises(ValueError, match="estimator"):
        Quantizer(4, 2, estimator="gumbel", rngs=nnx.Rngs(0))
