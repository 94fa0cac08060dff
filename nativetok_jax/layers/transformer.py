"""Pre-LN transformer blocks and a scanned stack of them.

A stack keeps one set of *stacked* parameters (leading ``layers`` axis) and applies them with
``jax.lax.scan``, so compile time does not grow with depth, and the checkpoint layout is one
array per parameter whatever the depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.layers.attention import Attention
from nativetok_jax.layers.mlp import Mlp
from nativetok_jax.layers.norm import LayerNorm
from nativetok_jax.layers.partitioning import constrain
from nativetok_jax.layers.remat import rematerialized


class Block(nnx.Module):
    """``x + MHA(LN(x))`` then ``x + MLP(LN(x))``; ``norm_epsilon`` is the LayerNorms' (1e-6; PyTorch's
    default, 1e-5, for weights trained with it: TiTok's); ``attention_logits`` as
    :class:`Attention`'s ``logits``."""

    def __init__(
        self, width: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
        norm_epsilon: float = 1e-6, attention_logits: str = "float32",
    ):
        self.attention_norm = LayerNorm(width, rngs=rngs, epsilon=norm_epsilon)
        self.attention = Attention(width, num_heads, rngs=rngs, dtype=dtype, logits=attention_logits)
        self.mlp_norm = LayerNorm(width, rngs=rngs, epsilon=norm_epsilon)
        self.mlp = Mlp(width, int(width * mlp_ratio), rngs=rngs, dtype=dtype)

    def __call__(
        self, x: jax.Array, *, key_mask: jax.Array | None = None, attention_mask: jax.Array | None = None,
        num_queries: int | None = None,
    ) -> jax.Array:
        """Returns all rows, or only the last ``num_queries`` rows (their keys see every row);
        ``key_mask`` and ``attention_mask`` as :class:`Attention` takes them."""
        residual = x if num_queries is None else x[:, -num_queries:]
        h = residual + self.attention(self.attention_norm(x), key_mask=key_mask, attention_mask=attention_mask,
                                      num_queries=num_queries)
        h = h + self.mlp(self.mlp_norm(h))
        return constrain(h, ("batch", "length", "embed"))


def stacked(make, count: int, axis_name: str, rngs: nnx.Rngs):
    """Builds ``count`` independent copies of ``make(rngs)`` as one module with stacked parameters."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=0, out_axes=0, axis_size=count, transform_metadata={nnx.PARTITION_NAME: axis_name})
    def build(rngs: nnx.Rngs):
        return make(rngs)

    return build(rngs)


def slice_stack(module: nnx.Module, index) -> nnx.Module:
    """The module at ``index`` (int, slice or traced int) of a stacked module."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))


class BlockStack(nnx.Module):
    """``depth`` blocks with stacked parameters, applied with ``lax.scan``.

    ``unroll=True`` unrolls the scan in the compiled program (no while loop): faster steps on
    some backends, compile time growing with depth, and FLOP counts that XLA's cost analysis
    gets right (it counts a while loop's body once).
    """

    def __init__(
        self,
        width: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        remat: bool = False,
        unroll: bool = False,
        norm_epsilon: float = 1e-6,
        attention_logits: str = "float32",
    ):
        if depth < 1:
            raise ValueError(f"a transformer stack needs depth >= 1, got {depth}")
        self.layers = stacked(
            lambda r: Block(width, num_heads, mlp_ratio, rngs=r, dtype=dtype, norm_epsilon=norm_epsilon,
                            attention_logits=attention_logits), depth, "layers", rngs
        )
        self.depth = depth
        self.remat = remat
        self.unroll = unroll

    def __call__(
        self, x: jax.Array, *, key_mask: jax.Array | None = None, attention_mask: jax.Array | None = None,
        last_layer_queries: int | None = None,
    ) -> jax.Array:
        """Applies every layer; with ``last_layer_queries`` the last layer computes only those rows.
        ``key_mask`` and ``attention_mask`` (as :class:`Attention` takes them) hold in every layer."""
        graphdef, state = nnx.split(self.layers)

        def layer(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, key_mask=key_mask, attention_mask=attention_mask), None

        layer = rematerialized(layer, self.remat)
        num_full = self.depth - (last_layer_queries is not None)
        x, _ = jax.lax.scan(layer, x, jax.tree.map(lambda a: a[:num_full], state), unroll=self.unroll)
        if last_layer_queries is not None:
            last = nnx.merge(graphdef, jax.tree.map(lambda a: a[-1], state))
            x = last(x, key_mask=key_mask, attention_mask=attention_mask, num_queries=last_layer_queries)
        return x
