"""Multi-head attention through ``jax.nn.dot_product_attention``.

The fused call lets GPUs use the cuDNN kernel and TPUs XLA's. ``num_queries`` computes only the
last rows' outputs while keys and values still come from every row: the causal experts need
just their query row in their last layer.

``logits`` (:data:`ATTENTION_LOGITS`, a model config's ``attention_logits``) is the precision of
the attention scores ``q k^T`` and their softmax:

- ``"float32"``: ``jax.nn.dot_product_attention``, whose XLA path computes scores and softmax in
  float32 whatever the compute dtype (MaxText's ``float32_logits=True``);
- ``"compute"``: scores and softmax in the compute dtype (MaxText's default): with bfloat16
  compute, the ``[batch, heads, rows, rows]`` scores, their softmax and its gradient are bfloat16,
  half the bytes of the elementwise work around the two products (the softmax's sum still
  accumulates in float32). The same as ``"float32"`` when the compute dtype is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.schema import ATTENTION_LOGITS  # see the module docstring
from nativetok_jax.layers.partitioning import constrain, param

# LeCun-normal over the right fan-in: the model width for q/k/v, heads x head_dim for the output.
PROJECTION_INIT = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
OUTPUT_INIT = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)



@jax.custom_jvp
def softmax(scores: jax.Array) -> jax.Array:
    """``jax.nn.softmax(scores, axis=-1)`` in ``scores``' dtype, normalised by multiplying with the
    reciprocal of the float32 row sum instead of dividing every score by it: one reciprocal per
    row and a multiplication per score, where XLA's TPU cost model charges a division per score
    (about 8 % of a bfloat16 attention's forward and backward time at these models' shapes).
    Its derivative is ``jax.nn.softmax``'s (no division either)."""
    shifted = scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True))
    unnormalised = jnp.exp(shifted)
    reciprocal = 1.0 / jnp.sum(unnormalised.astype(jnp.float32), -1, keepdims=True)
    return unnormalised * reciprocal.astype(unnormalised.dtype)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
    (scores,), (tangent,) = primals, tangents
    y = softmax(scores)
    return y, y * (tangent - (y * tangent).sum(-1, keepdims=True))


def attention_in_compute_dtype(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``jax.nn.dot_product_attention(q, k, v, mask=mask)`` with scores and softmax in ``q``'s dtype
    (``"compute"`` logits). ``q [B, Tq, H, D]``, ``k`` and ``v`` ``[B, T, H, D]``; ``mask``
    broadcasts to ``[B, H, Tq, T]`` (False: not attended; a row with none attends uniformly, as
    jax's does)."""
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # scaled before the product (MaxText's order)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.asarray(-0.7 * jnp.finfo(scores.dtype).max, scores.dtype))
    probabilities = softmax(scores)
    return jnp.einsum("bhqk,bkhd->bqhd", probabilities, v)


class Attention(nnx.Module):
    def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
                 logits: str = "float32"):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        if logits not in ATTENTION_LOGITS:
            raise ValueError(f"attention logits {logits!r}: must be one of {ATTENTION_LOGITS}")
        head_dim = width // num_heads
        in_axes = ("embed", "heads", "head_dim")
        self.query = param(rngs, PROJECTION_INIT, (width, num_heads, head_dim), in_axes)
        self.key = param(rngs, PROJECTION_INIT, (width, num_heads, head_dim), in_axes)
        self.value = param(rngs, PROJECTION_INIT, (width, num_heads, head_dim), in_axes)
        self.query_bias = param(rngs, nnx.initializers.zeros, (num_heads, head_dim), in_axes[1:])
        self.key_bias = param(rngs, nnx.initializers.zeros, (num_heads, head_dim), in_axes[1:])
        self.value_bias = param(rngs, nnx.initializers.zeros, (num_heads, head_dim), in_axes[1:])
        self.out = param(rngs, OUTPUT_INIT, (num_heads, head_dim, width), ("heads", "head_dim", "embed"))
        self.out_bias = param(rngs, nnx.initializers.zeros, (width,), ("embed",))
        self.dtype = dtype
        self.logits = logits

    def _project(self, x: jax.Array, kernel: nnx.Param, bias: nnx.Param) -> jax.Array:
        y = jnp.einsum("btd,dhk->bthk", x, kernel[...].astype(self.dtype))
        y = y + bias[...].astype(self.dtype)
        return constrain(y, ("batch", "length", "heads", "head_dim"))

    def __call__(
        self,
        x: jax.Array,
        *,
        key_mask: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        num_queries: int | None = None,
    ) -> jax.Array:
        """Attends from ``x`` (or its last ``num_queries`` rows) to the rows ``key_mask`` allows.

        Args:
          x: ``[batch, length, width]``.
          key_mask: boolean ``[length]`` or ``[batch, length]``; False rows are never attended to.
          attention_mask: boolean ``[length, length]`` (query row, key row), the same for every
            example and head; False pairs are never attended. Combined with ``key_mask``.
          num_queries: if set, only the last ``num_queries`` rows are computed.
        """
        x = x.astype(self.dtype)
        queries = x if num_queries is None else x[:, -num_queries:]
        q = self._project(queries, self.query, self.query_bias)
        k = self._project(x, self.key, self.key_bias)
        v = self._project(x, self.value, self.value_bias)
        mask = None if key_mask is None else key_mask.reshape(-1, 1, 1, key_mask.shape[-1])  # [B|1, 1, 1, T]
        if attention_mask is not None:
            pairs = attention_mask[-queries.shape[1] :][None, None]  # [1, 1, Tq, T]: the computed rows'
            mask = pairs if mask is None else mask & pairs
        if self.logits == "compute" and self.dtype != jnp.float32:
            y = attention_in_compute_dtype(q, k, v, mask)
        else:
            y = jax.nn.dot_product_attention(q, k, v, mask=mask)
        y = jnp.einsum("bthk,hkd->btd", y, self.out[...].astype(self.dtype))
        return y + self.out_bias[...].astype(self.dtype)
