"""The decoder: prefix decoding hides exactly the tokens after the prefix, for any k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from nativetok_jax.models.nativetok import build_model

NUM_TOKENS = 8


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(num_tokens=NUM_TOKENS).model, nnx.Rngs(0))


def random_ids(seed: int, batch: int = 2) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, NUM_TOKENS), 0, 64)


@pytest.mark.parametrize("k", [1, NUM_TOKENS // 2, NUM_TOKENS])
def test_prefix_decoding_ignores_tokens_after_k(model, k):
    decode = jax.jit(lambda m, ids, k: m.decode_ids(ids, k))
    ids, other = random_ids(0), random_ids(1)
    mixed = ids.at[:, k:].set(other[:, k:])  # same first k tokens, different rest
    out = decode(model, ids, k)
    assert out.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(decode(model, mixed, k), out)
    if k < NUM_TOKENS:
        changed = ids.at[:, k - 1].set((ids[:, k - 1] + 1) % 64)  # the last visible token matters
        assert np.abs(decode(model, changed, k) - out).max() > 1e-5


def test_all_tokens_visible_equals_no_mask(model):
    ids = random_ids(2)
    np.testing.assert_allclose(model.decode_ids(ids, NUM_TOKENS), model.decode_ids(ids), rtol=1e-6)


def test_per_example_prefix_lengths(model):
    ids = random_ids(3, batch=3)
    lengths = jnp.array([1, 4, 8])
    together = model.decode_ids(ids, lengths)
    for i, k in enumerate([1, 4, 8]):
        np.testing.assert_allclose(together[i], model.decode_ids(ids[i : i + 1], k)[0], rtol=1e-5, atol=1e-6)


def test_proxy_code_head_gives_logits_per_grid_cell():
    config = tiny_config(num_tokens=NUM_TOKENS)
    config.model.decoder.head = "proxy_codes"
    model = build_model(config.model, nnx.Rngs(0))
    logits = model.decode_ids(random_ids(4), 3)
    assert logits.shape == (2, 4, 4, config.model.decoder.proxy_codebook_size)
