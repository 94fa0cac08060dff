"""MaskGIT's parallel iterative decoding for :class:`MaskedTokenTransformer` (Chang et al., 2022).

Decoding starts from L ``[MASK]`` ids. Each of a fixed number of steps predicts every masked
position at once, samples an id for each, keeps the ones the model is most confident about and
masks the rest again; how many stay masked follows a cosine schedule, so early steps commit to
few tokens and late steps to many. Tokens once kept never change.

The whole loop is one jitted ``lax.scan`` with static shapes: which positions stay masked is a
boolean mask from confidence ranks, never a gather of data-dependent size.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nativetok_jax.generation.sampling import filter_logits, guide
from nativetok_jax.layers.partitioning import constrain
from nativetok_jax.models.generators.masked_generator import MaskedTokenTransformer

# cos(pi/2 * r) * L lands on an integer for some (r, L) up to rounding (cos(pi/3) = 0.5000000000000001):
# without the slack, ceil would keep one token too many masked.
_ROUNDING_SLACK = 1e-9


@functools.cache
def _masked_counts(num_steps: int, num_tokens: int) -> tuple[int, ...]:
    """Tokens still masked before decoding (index 0) and after each step (index ``step + 1``)."""
    if num_steps < 1 or num_tokens < 1:
        raise ValueError(f"need num_steps >= 1 and num_tokens >= 1, got {num_steps} and {num_tokens}")
    counts = [num_tokens]
    for step in range(num_steps):
        if step == num_steps - 1:
            target = 0
        else:
            target = math.ceil(math.cos(0.5 * math.pi * (step + 1) / num_steps) * num_tokens - _ROUNDING_SLACK)
        # Every step commits at least one token while any is left.
        counts.append(max(0, min(target, counts[-1] - 1)))
    return tuple(counts)


def mask_schedule(step: int | jax.Array, num_steps: int, num_tokens: int) -> int | jax.Array:
    """How many of ``num_tokens`` are still masked after decoding step ``step`` (0-based).

    ``ceil(cos(pi/2 * (step + 1) / num_steps) * num_tokens)``, lowered where needed so every step
    commits at least one token (while any is left), and 0 after the last step; ``step = -1``
    (before decoding) gives ``num_tokens``. With more steps than tokens the surplus steps commit
    nothing. ``step`` may be traced; the result is then an int32 array.
    """
    counts = _masked_counts(num_steps, num_tokens)
    if isinstance(step, (int, np.integer)):
        if not -1 <= step < num_steps:
            raise ValueError(f"step must lie in [-1, {num_steps}), got {step}")
        return counts[step + 1]
    return jnp.asarray(counts, jnp.int32)[step + 1]


def _guided_logits(
    model: MaskedTokenTransformer, ids: jax.Array, labels: jax.Array, guidance_scale: jax.Array, guided: bool
) -> jax.Array:
    """``uncond + scale * (cond - uncond)`` from one pass over the doubled batch, or plain ``cond``."""
    if not guided:
        return model(ids, labels)
    null = jnp.full_like(labels, model.null_class)
    both = model(jnp.concatenate([ids, ids]), jnp.concatenate([labels, null]))
    conditional, unconditional = jnp.split(both, 2)
    return guide(conditional, unconditional, guidance_scale)


def decode_step(
    model: MaskedTokenTransformer,
    ids: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    step: jax.Array,
    *,
    num_steps: int,
    temperature: jax.Array,
    choice_temperature: jax.Array,
    guidance_scale: jax.Array,
    guided: bool,
    random_order: bool,
    top_k: int,
    top_p: jax.Array | None,
) -> jax.Array:
    """One MaskGIT step: sample every masked position, keep the most confident, re-mask the rest."""
    unknown = ids == model.mask_id
    logits = _guided_logits(model, ids, labels, guidance_scale, guided).astype(jnp.float32)
    sample_key, choice_key = jax.random.split(jax.random.fold_in(key, step))
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    sampled = jnp.where(unknown, jax.random.categorical(sample_key, filtered), ids)
    # Confidence is the model's own (guided) probability of the sampled id, as in MaskGIT's
    # reference: not the tempered or filtered one, so that temperature 0 (greedy) still ranks
    # positions by how sure the model is instead of calling every choice certain.
    if random_order:
        # Which positions are kept does not depend on what was sampled there, so every kept id
        # is a draw from the model's conditional (confidence ranking favours likelier ids).
        confidence = jax.random.uniform(choice_key, unknown.shape)
    else:
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        confidence = jnp.take_along_axis(log_probs, sampled[..., None], axis=-1)[..., 0]
        # Gumbel noise on the confidences, annealed to 0, lets early steps keep less likely tokens.
        anneal = 1.0 - (step + 1) / num_steps
        confidence = confidence + choice_temperature * anneal * jax.random.gumbel(choice_key, confidence.shape)
    confidence = jnp.where(unknown, confidence, jnp.inf)
    # Unique ranks (a stable sort) make the re-masked count exact even when confidences tie.
    ranks = jnp.argsort(jnp.argsort(confidence, axis=-1), axis=-1)
    remask = ranks < mask_schedule(step, num_steps, ids.shape[1])
    return constrain(jnp.where(remask, model.mask_id, sampled), ("batch", "length"))


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens", "num_steps", "top_k", "nucleus", "guided",
                                             "random_order", "return_history"))
def _sample(
    graphdef: nnx.GraphDef,
    params: Any,
    labels: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    choice_temperature: jax.Array,
    guidance_scale: jax.Array,
    top_p: jax.Array,
    *,
    num_tokens: int,
    num_steps: int,
    top_k: int,
    nucleus: bool,
    guided: bool,
    random_order: bool,
    return_history: bool,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    model = nnx.merge(graphdef, params)
    if num_tokens != model.num_tokens:
        raise ValueError(f"the model generates {model.num_tokens} tokens, num_tokens is {num_tokens}")
    if not 0 <= top_k <= model.vocab_size:
        raise ValueError(f"top_k must lie in [0, {model.vocab_size}] (0: all ids), got {top_k}")
    labels = constrain(labels, ("batch",))
    ids = constrain(jnp.full((labels.shape[0], num_tokens), model.mask_id, jnp.int32), ("batch", "length"))
    decode = functools.partial(
        decode_step,
        model,
        labels=labels,
        key=key,
        num_steps=num_steps,
        temperature=temperature,
        choice_temperature=choice_temperature,
        guidance_scale=guidance_scale,
        guided=guided,
        random_order=random_order,
        top_k=top_k,
        top_p=top_p if nucleus else None,
    )

    def body(ids: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        ids = decode(ids, step=step)
        return ids, ids if return_history else None

    ids, history = jax.lax.scan(body, ids, jnp.arange(num_steps))
    return (ids, history) if return_history else ids


def sample(
    model: MaskedTokenTransformer | tuple[nnx.GraphDef, Any],
    labels: jax.Array,
    *,
    key: jax.Array,
    num_tokens: int,
    num_steps: int = 8,
    temperature: float = 1.0,
    choice_temperature: float = 4.5,
    guidance_scale: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    return_history: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Class-conditional token ids ``int32 [B, num_tokens]`` for ``labels [B]``, by MaskGIT decoding.

    Args:
      model: the generator, or its ``(graphdef, params)`` (params: ``nnx.State`` or a plain dict).
      labels: class ids; ``model.null_class`` asks for an unconditional sample.
      key: the seed; the same key gives the same ids.
      num_tokens: sequence length; must be the model's.
      num_steps: decoding steps (MaskGIT and NativeTok use 8).
      temperature: divides the logits before sampling each id (>= 0; 0 is greedy decoding, the
        limit). The confidences that rank positions are the model's untempered probabilities.
      choice_temperature: scale of the Gumbel noise added to the log-probability confidences that
        decide which tokens to keep, annealed linearly to 0 at the last step (MaskGIT: 4.5).
        ``math.inf`` keeps a uniformly random choice of positions instead: the kept ids are then
        unbiased draws from the model's conditionals (finite values favour each position's
        likelier id, which shifts id frequencies; the grain transformer uses inf for this).
      guidance_scale: classifier-free guidance, ``logits = uncond + scale * (cond - uncond)``
        computed on a doubled batch. 1.0 (default) is plain conditional sampling and skips the
        doubled batch; 0.0 samples from the unconditional (null-class) model; > 1 sharpens.
      top_k: if set (> 0), each position samples among its ``top_k`` most likely ids only.
      top_p: nucleus filtering of each position's ids, as in the AR sampler (1: off).
      return_history: also return the ids after every step, ``[num_steps, B, L]``, with
        ``model.mask_id`` where a position is still masked.

    Compiled once per model structure, batch shape, ``num_steps``, ``top_k``, whether top-p,
    guidance and random order are on, and ``return_history``; temperatures, top-p and the guidance scale are traced. Under a mesh with
    axis rules active (``jax.set_mesh(mesh)`` and ``axis_rules(rules)``) the batch follows the
    ``batch`` rule.
    """
    if isinstance(model, tuple):
        graphdef, params = model
    else:
        graphdef, params = nnx.split(model)
    if not temperature >= 0 or not choice_temperature >= 0:
        raise ValueError(f"temperature and choice_temperature must be >= 0, got {temperature} and {choice_temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return _sample(
        graphdef,
        params,
        jnp.asarray(labels, jnp.int32),
        key,
        jnp.float32(temperature),
        jnp.float32(choice_temperature),
        jnp.float32(guidance_scale),
        jnp.float32(top_p),
        num_tokens=num_tokens,
        num_steps=num_steps,
        top_k=int(top_k or 0),
        nucleus=top_p < 1,
        guided=float(guidance_scale) != 1.0,
        random_order=math.isinf(choice_temperature),
        return_history=return_history,
    )
