"""Mixture of Causal Expert Transformer (NativeTok paper, Sec. 3.2; docs/nativetok.md "The tokenizer" 2).

Expert ``i`` (0-based here) is a small transformer that reads
``[X_latent ; t_0 .. t_{i-1} ; q_i]`` and returns its output at the query row as token ``t_i``,
so token ``i`` depends on the image and the earlier tokens only. There is no gating: expert ``i``
runs for token ``i`` alone.

The experts' parameters are stacked along a leading ``experts`` axis and applied with
``lax.scan``. To give every scan step the same shapes, the earlier tokens live in a fixed buffer
of slots and the attention mask hides the slots not yet written, which is exactly running
expert ``i`` on the unpadded sequence (:meth:`CausalExperts.reference` does that, in a Python
loop, for tests and benchmarks). Compile time therefore does not grow with ``L``.

One buffer of all ``L`` slots would make every expert compute over ``L`` slot rows, most of them
masked (at L = 128 with 65 context rows: 194 rows where the prototype's expert ``i`` has
``65 + i + 1``). So the experts run in ``chunks`` consecutive groups, one scan each, whose buffer
holds only the slots that group can see: with 4 chunks of L/4 experts the buffers hold L/4, L/2,
3L/4 and L slots, and the expected row count falls from ``C + L + 1`` to ``C + 5L/8 + 1``
(prototype: ``C + L/2 + 1``). Compile time grows with the number of chunks, never with ``L``.

Each expert also owns a ``slot_position`` vector added to its token when it enters the buffer,
so later experts know which position a prior token came from (full attention is otherwise
blind to order). Prior tokens are the continuous, pre-quantisation outputs, as in the prototype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.layers.norm import LayerNorm
from nativetok_jax.layers.partitioning import constrain, param
from nativetok_jax.layers.remat import rematerialized
from nativetok_jax.layers.transformer import BlockStack, slice_stack, stacked
from nativetok_jax.models.nativetok.embeddings import POSITION_INIT


class Expert(nnx.Module):
    """One causal expert: a learned query, an input LayerNorm and ``depth`` transformer blocks."""

    def __init__(
        self,
        width: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        unroll: bool = False,
        attention_logits: str = "float32",
    ):
        self.query = param(rngs, POSITION_INIT, (width,), ("embed",))
        self.slot_position = param(rngs, POSITION_INIT, (width,), ("embed",))
        self.input_norm = LayerNorm(width, rngs=rngs)
        self.blocks = BlockStack(width, depth, num_heads, mlp_ratio, rngs=rngs, dtype=dtype, unroll=unroll,
                                 attention_logits=attention_logits)

    def _with_query(self, context: jax.Array) -> jax.Array:
        q = jnp.broadcast_to(self.query[...].astype(context.dtype), (context.shape[0], 1, context.shape[-1]))
        return jnp.concatenate([context, q], axis=1)

    def padded(self, x_latent: jax.Array, slots: jax.Array, index: jax.Array) -> jax.Array:
        """Token ``index`` from ``[X_latent ; slots ; q]`` with slots ``>= index`` masked out."""
        sequence = self.input_norm(self._with_query(jnp.concatenate([x_latent, slots], axis=1)))
        num_context, num_slots = x_latent.shape[1], slots.shape[1]
        row = jnp.arange(num_context + num_slots + 1)
        key_mask = (row < num_context + index) | (row == num_context + num_slots)
        return self.blocks(sequence, key_mask=key_mask, last_layer_queries=1)[:, 0]

    def unpadded(self, x_latent: jax.Array, prior: jax.Array) -> jax.Array:
        """The prototype's computation: every row of ``[X_latent ; prior ; q]``, then the query's."""
        sequence = self.input_norm(self._with_query(jnp.concatenate([x_latent, prior], axis=1)))
        return self.blocks(sequence)[:, -1]

    def to_slot(self, token: jax.Array) -> jax.Array:
        return token + self.slot_position[...].astype(token.dtype)


def chunk_bounds(num_experts: int, chunks: int) -> list[int]:
    """Expert indices where the chunks start, plus ``num_experts``: ``chunks`` (at most
    ``num_experts``) consecutive groups whose sizes differ by at most one, the larger ones first
    (early chunks have the short buffers, so that is where extra experts cost least).

    >>> chunk_bounds(5, 2)
    [0, 3, 5]
    """
    if chunks < 1:
        raise ValueError(f"the experts need chunks >= 1, got {chunks}")
    chunks = min(chunks, num_experts)
    return [-(-num_experts * k // chunks) for k in range(chunks + 1)]


class CausalExperts(nnx.Module):
    """``num_experts`` experts with stacked parameters, applied position by position with a scan
    per chunk (see the module docstring)."""

    def __init__(
        self,
        num_experts: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        remat: bool = False,
        scan: bool = True,
        unroll: bool = False,
        chunks: int = 1,
        attention_logits: str = "float32",
    ):
        self.bounds = chunk_bounds(num_experts, chunks)
        self.stack = stacked(
            lambda r: Expert(width, depth, num_heads, mlp_ratio, rngs=r, dtype=dtype, unroll=unroll,
                             attention_logits=attention_logits),
            num_experts,
            "experts",
            rngs,
        )
        self.num_experts = num_experts
        self.width = width
        self.remat = remat
        self.scan = scan
        self.unroll = unroll

    def empty_slots(self, x_latent: jax.Array) -> jax.Array:
        return jnp.zeros((x_latent.shape[0], self.num_experts, self.width), x_latent.dtype)

    def __call__(
        self,
        x_latent: jax.Array,
        *,
        start: int = 0,
        stop: int | None = None,
        slots: jax.Array | None = None,
        frozen: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        """Runs experts ``start .. stop-1``.

        Args:
          x_latent: ``[B, 1 + N, width]`` from the Meta Image Transformer.
          start, stop: the expert range; a range that does not start at 0 needs the ``slots``
            written by the experts before it (hierarchical training runs the frozen experts
            first, then the trainable ones).
          slots: ``[B, num_experts, width]`` buffer of earlier tokens (only slots ``< start`` are read).
          frozen: these experts' parameters get no gradient (hierarchical training freezes the
            previous stage's experts), so XLA computes no weight gradients for them; gradients
            still flow through them to ``x_latent`` and the earlier slots, so a trainable MIT
            keeps learning from every token. With a frozen MIT too, nothing before them needs a
            gradient and XLA runs no backward pass through them at all.

        Returns:
          ``(tokens [B, stop - start, width], slots)``.
        """
        stop = self.num_experts if stop is None else stop
        if not 0 <= start < stop <= self.num_experts:
            raise ValueError(f"expert range [{start}, {stop}) is outside [0, {self.num_experts})")
        if not self.scan:
            if (start, stop, slots) != (0, self.num_experts, None):
                raise ValueError("the unrolled reference (scan=False) runs all experts from empty slots only")
            return self.reference(x_latent)
        if slots is None:
            if start:
                raise ValueError("running experts from a start > 0 needs the slots of the earlier experts")
            slots = self.empty_slots(x_latent)
        graphdef, state = nnx.split(self.stack)

        def step(slots, inputs):
            expert_state, index = inputs
            expert = nnx.merge(graphdef, expert_state)
            token = expert.padded(x_latent, slots, index)
            slots = jax.lax.dynamic_update_index_in_dim(slots, expert.to_slot(token), index, axis=1)
            return slots, token

        step = rematerialized(step, self.remat)
        if frozen:  # their own parameters only (see the docstring)
            state = jax.lax.stop_gradient(state)
        tokens = []
        for first, last in zip(self.bounds, self.bounds[1:]):
            first, last = max(first, start), min(last, stop)
            if first >= last:
                continue
            # This chunk's experts see slots < last only: its buffer holds just those.
            ranged = jax.tree.map(lambda a: a[first:last], state)
            buffer, chunk_tokens = jax.lax.scan(
                step, slots[:, :last], (ranged, jnp.arange(first, last)), unroll=self.unroll
            )
            slots = jnp.concatenate([buffer, slots[:, last:]], axis=1)
            tokens.append(chunk_tokens)
        tokens = jnp.concatenate(tokens, axis=0) if len(tokens) > 1 else tokens[0]
        return constrain(jnp.swapaxes(tokens, 0, 1), ("batch", "length", "embed")), slots

    def reference(self, x_latent: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The unrolled, unpadded prototype computation: a Python loop, one trace per expert.

        For tests and benchmarks; returns ``(tokens, slots)`` like ``__call__``.
        """
        tokens, prior = [], x_latent[:, :0]
        for i in range(self.num_experts):
            expert = slice_stack(self.stack, i)
            token = expert.unpadded(x_latent, prior)
            tokens.append(token)
            prior = jnp.concatenate([prior, expert.to_slot(token)[:, None]], axis=1)
        return jnp.stack(tokens, axis=1), prior
