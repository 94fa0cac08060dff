"""The attention's ``logits`` option (layers/attention.py): scores and softmax in the compute
dtype against jax's float32 path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nativetok_jax.schema import ConfigError
from nativetok_jax.models.dit.transformer import dit_model_config, validate_dit_model
from nativetok_jax.layers.attention import Attention, attention_in_compute_dtype, softmax


def _qkv(seed: int, rows: int = 9, heads: int = 4, head_dim: int = 16):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (2, rows, heads, head_dim)) for k in keys]


def test_softmax_by_reciprocal_is_jax_s_with_its_gradient():
    x = 4 * jax.random.normal(jax.random.key(3), (3, 5, 40))
    np.testing.assert_allclose(softmax(x), jax.nn.softmax(x), rtol=1e-6, atol=1e-7)
    weights = jnp.cos(jnp.arange(40.0))
    grads = [jax.grad(lambda x, f=f: jnp.sum(jnp.sin(f(x)) * weights))(x) for f in (softmax, jax.nn.softmax)]
    np.testing.assert_allclose(*grads, rtol=1e-4, atol=1e-5)
    low = np.asarray(softmax(x.astype(jnp.bfloat16)), np.float32)
    np.testing.assert_allclose(low, jax.nn.softmax(x), atol=2 ** -7)  # bfloat16's rounding of values <= 1


def test_compute_dtype_attention_is_jax_s_in_float32_with_masks():
    q, k, v = _qkv(0)
    key_mask = (jnp.arange(9) < 6).reshape(1, 1, 1, 9)
    causal = jnp.tril(jnp.ones((9, 9), bool))[None, None]
    for mask in (None, key_mask, key_mask & causal):
        np.testing.assert_allclose(attention_in_compute_dtype(q, k, v, mask),
                                   jax.nn.dot_product_attention(q, k, v, mask=mask), atol=1e-6)


@pytest.mark.parametrize("num_queries", [None, 1])
def test_bfloat16_logits_match_float32_logits_within_bfloat16_tolerance(num_queries):
    """The same bfloat16 layer with float32 and with bfloat16 scores/softmax: outputs and
    gradients agree to bfloat16's precision (8 bits of mantissa)."""
    x = jax.random.normal(jax.random.key(1), (2, 33, 64))
    key_mask = jnp.arange(33) != 5
    layers = {logits: Attention(64, 4, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, logits=logits)
              for logits in ("float32", "compute")}

    def loss(layer, x):
        y = layer(x, key_mask=key_mask, num_queries=num_queries).astype(jnp.float32)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y

    results = {name: nnx.value_and_grad(loss, has_aux=True, argnums=(0, 1))(layer, x)
               for name, layer in layers.items()}
    (_, y32), (g32_params, g32_x) = results["float32"]
    (_, y16), (g16_params, g16_x) = results["compute"]
    assert y16.dtype == y32.dtype and y16.shape == y32.shape
    scale = float(jnp.abs(y32).max())
    np.testing.assert_allclose(y16, y32, atol=0.02 * scale)
    # The key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared by a
    # row's scores), so it is compared against the other gradients' scale, not its own.
    g16 = dict(nnx.to_flat_state(nnx.state(g16_params)), x=g16_x)
    g32 = dict(nnx.to_flat_state(nnx.state(g32_params)), x=g32_x)
    assert g16.keys() == g32.keys()
    norms = {name: np.linalg.norm(np.asarray(g32[name], np.float32)) for name in g32}
    for name in g32:
        a, b = (np.asarray(g[name][...] if name != "x" else g[name], np.float32) for g in (g16, g32))
        reference = norms[name] if "key_bias" not in str(name) else max(norms.values())
        assert np.linalg.norm(a - b) <= 0.03 * reference, name


def test_compute_logits_in_float32_is_jax_s_path():
    x = jax.random.normal(jax.random.key(2), (2, 7, 32))
    a = Attention(32, 2, rngs=nnx.Rngs(0), logits="float32")
    b = Attention(32, 2, rngs=nnx.Rngs(0), logits="compute")
    np.testing.assert_array_equal(a(x), b(x))


def test_unknown_logits_are_refused():
    with pytest.raises(ValueError, match="attention logits"):
        Attention(32, 2, rngs=nnx.Rngs(0), logits="bfloat16")
    model = dit_model_config("S", 8)
    model.attention_logits = "half"
    with pytest.raises(ConfigError, match="model.attention_logits"):
        validate_dit_model(model, check_files=False)
