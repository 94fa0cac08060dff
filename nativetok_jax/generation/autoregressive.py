"""Sampling token ids from the autoregressive GPT, with a key/value cache or without one.

The whole loop over positions runs inside one jitted program (``lax.fori_loop``), compiled once
per (model graph, batch size, token count, top-k, whether top-p and guidance are on, cache or
not); temperature, top-p and the guidance scale are traced, so changing them does not
recompile.

Classifier-free guidance runs the conditional and the null-class rows as one doubled batch,
interleaved (row 2b is sample b's conditional row, 2b+1 its unconditional one) so that a
sharded batch keeps both rows of a sample on the same device and mixing them needs no
communication.

Position ``i`` draws with ``fold_in(key, i)`` in both samplers, so the cached sampler and the
uncached reference (which recomputes the whole prefix every step, for tests and benchmarks)
give identical tokens for identical logits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.generation.sampling import filter_logits, guide
from nativetok_jax.layers.partitioning import constrain
from nativetok_jax.models.generators.gpt import GPT

Params = Any


@functools.lru_cache(maxsize=64)
def sampler(
    graphdef: nnx.GraphDef,
    *,
    num_tokens: int,
    top_k: int = 0,
    nucleus: bool = False,
    guided: bool = False,
    use_cache: bool = True,
    cache_dtype: jnp.dtype | None = None,
) -> Callable[..., jax.Array]:
    """The jitted ``(params, labels, key, temperature, top_p, guidance_scale) -> ids [B, num_tokens]``.

    ``nucleus`` turns top-p filtering on and ``guided`` classifier-free guidance (the doubled
    batch); both change the program, so they are static. Memoised: asking again for the same
    settings returns the same function and its compiled programs.
    """

    def run(params: Params, labels: jax.Array, key: jax.Array, temperature, top_p, guidance_scale) -> jax.Array:
        model: GPT = nnx.merge(graphdef, params)
        batch = labels.shape[0]
        labels = constrain(labels.astype(jnp.int32), ("batch",))
        if guided:
            null = jnp.full_like(labels, model.null_class)
            row_labels = jnp.stack([labels, null], axis=1).reshape(-1)
        else:
            row_labels = labels
        row_labels = constrain(row_labels, ("batch",))

        def as_rows(values: jax.Array) -> jax.Array:
            return jnp.repeat(values, 2, axis=0) if guided else values

        def draw(row_logits: jax.Array, position: jax.Array) -> jax.Array:
            """The next token of every sample from the rows' logits ``[rows, vocab]``."""
            if guided:
                pairs = row_logits.reshape(batch, 2, row_logits.shape[-1])
                logits = guide(pairs[:, 0], pairs[:, 1], guidance_scale)
            else:
                logits = row_logits
            logits = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p if nucleus else None)
            logits = constrain(logits, ("batch", "vocab"))
            return jax.random.categorical(jax.random.fold_in(key, position), logits).astype(jnp.int32)

        def write(tokens: jax.Array, new: jax.Array, position: jax.Array) -> jax.Array:
            tokens = jax.lax.dynamic_update_slice(tokens, new[:, None], (0, position))
            return constrain(tokens, ("batch", "length"))

        tokens = constrain(jnp.zeros((batch, num_tokens), jnp.int32), ("batch", "length"))
        if use_cache:

            def cached_step(position, carry):
                tokens, ids, cache = carry
                row_logits, cache = model.decode_step(ids, position, cache)
                new = draw(row_logits, position)
                return write(tokens, new, position), as_rows(new), cache

            cache = model.init_cache(row_labels.shape[0], num_tokens, cache_dtype)
            tokens, _, _ = jax.lax.fori_loop(0, num_tokens, cached_step, (tokens, row_labels, cache))
            return tokens

        def uncached_step(position, tokens):
            # Later slots still hold zeros; the causal mask keeps them out of row ``position``.
            features = model.features(as_rows(tokens), row_labels)
            row_logits = model.logits(jax.lax.dynamic_index_in_dim(features, position, axis=1, keepdims=False))
            return write(tokens, draw(row_logits, position), position)

        return jax.lax.fori_loop(0, num_tokens, uncached_step, tokens)

    return jax.jit(run)


def sample(
    model: GPT | tuple[nnx.GraphDef, Params],
    labels: jax.Array,
    *,
    key: jax.Array,
    num_tokens: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    guidance_scale: float = 1.0,
    use_cache: bool = True,
    cache_dtype: jnp.dtype | None = None,
) -> jax.Array:
    """Samples ``[B, num_tokens]`` int32 token ids for class ``labels`` ``[B]``.

    Args:
      model: a :class:`GPT`, or its ``(graphdef, params)`` (params: ``nnx.State`` or plain dict).
      labels: class ids; ``model.null_class`` samples the unconditional model.
      key: the seed; position i draws with ``fold_in(key, i)``.
      num_tokens: how many tokens (default ``model.num_tokens``, the most it accepts).
      temperature: >= 0; divides the (guided) logits; 0 is greedy decoding (the limit).
      top_k: keep only the k most likely tokens (0: all; 1: greedy).
      top_p: nucleus filtering, keep the smallest most-likely set with mass >= top_p (1: all).
      guidance_scale: ``uncond + s * (cond - uncond)``; anything but 1 doubles the batch.
      use_cache: the key/value-cached sampler; False recomputes the prefix every step.
      cache_dtype: the cache's dtype (default the model's compute dtype).

    Under ``jax.set_mesh(mesh)`` and ``axis_rules(rules)`` the batch is split along ``batch``.
    """
    if isinstance(model, nnx.Module):
        graphdef, params = nnx.split(model)
        gpt = model
    else:
        graphdef, params = model
        gpt = nnx.merge(graphdef, params)
    num_tokens = gpt.num_tokens if num_tokens is None else num_tokens
    if not 1 <= num_tokens <= gpt.num_tokens:
        raise ValueError(f"num_tokens must be in 1..{gpt.num_tokens}, got {num_tokens}")
    if jnp.ndim(labels) != 1:
        raise ValueError(f"labels must be [batch], got shape {jnp.shape(labels)}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy decoding), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    run = sampler(
        graphdef,
        num_tokens=num_tokens,
        top_k=int(top_k),
        nucleus=top_p < 1,
        guided=guidance_scale != 1,
        use_cache=use_cache,
        cache_dtype=None if cache_dtype is None else jnp.dtype(cache_dtype),
    )
    scalars = (jnp.float32(temperature), jnp.float32(top_p), jnp.float32(guidance_scale))
    return run(params, jnp.asarray(labels, jnp.int32), key, *scalars)
