"""The class-conditional autoregressive generator over tokenizer ids (LlamaGen-style GPT).

The sequence is ``[class ; t_1 .. t_{L-1}]`` and row ``i`` predicts ``t_{i+1}``: the class
embedding takes the first position (as LlamaGen's c2i models), so ``L`` rows predict all ``L``
tokens. The class table has one extra *null* row (index ``num_classes``) that training swaps in
for a fraction of labels, so one network is both the conditional and the unconditional model
that classifier-free guidance mixes at sampling time.

Blocks are pre-norm: ``x + Attn(RMSNorm(x))`` with rotary positions, then
``x + SwiGLU(RMSNorm(x))``; a final RMSNorm and an untied linear head give the logits. Block
parameters are stacked along a ``layers`` axis and applied with ``lax.scan`` (``remat`` wraps
each layer in ``jax.checkpoint``). Decoding with a key/value cache (``init_cache`` +
``decode_step``) scans the same layers with the cache stacked along ``layers`` too.

Sizes (LlamaGen's; ``mlp_hidden`` defaults to :func:`llama_hidden_size`, i.e.
``4 * width * 2/3`` rounded up to a multiple of 256):

| name | depth | width | heads | mlp_hidden |
| --- | --- | --- | --- | --- |
| LlamaGen-B | 12 | 768 | 12 | 2048 |
| LlamaGen-L | 24 | 1024 | 16 | 2816 |
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nativetok_jax.layers.cached_attention import CachedSelfAttention, KVCache
from nativetok_jax.layers.norm import RMSNorm
from nativetok_jax.layers.partitioning import constrain, param
from nativetok_jax.layers.remat import rematerialized
from nativetok_jax.layers.swiglu import SwiGLU, llama_hidden_size
from nativetok_jax.layers.transformer import stacked

EMBEDDING_INIT = nnx.initializers.normal(stddev=0.02)
ROW_AXES = ("batch", "length", "embed")
CACHE_AXES = ("layers", "batch", "length", "heads", "head_dim")


class DecoderBlock(nnx.Module):
    """``x + Attn(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))``, causal."""

    def __init__(self, width: int, num_heads: int, mlp_hidden: int, *, rngs: nnx.Rngs, dtype: jnp.dtype):
        self.attention_norm = RMSNorm(width, rngs=rngs)
        self.attention = CachedSelfAttention(width, num_heads, rngs=rngs, dtype=dtype)
        self.mlp_norm = RMSNorm(width, rngs=rngs)
        self.mlp = SwiGLU(width, mlp_hidden, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        h = x + self.attention(self.attention_norm(x), positions)
        return constrain(h + self.mlp(self.mlp_norm(h)), ROW_AXES)

    def decode(self, x: jax.Array, start: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """The new rows ``x`` at positions ``start ..``, and their keys/values for the cache."""
        attended, rows = self.attention.decode(self.attention_norm(x), start, cache)
        h = x + attended
        return constrain(h + self.mlp(self.mlp_norm(h)), ROW_AXES), rows


class GPT(nnx.Module):
    def __init__(
        self,
        *,
        vocab_size: int,
        num_tokens: int,
        num_classes: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_hidden: int | None = None,
        dtype: jnp.dtype = jnp.float32,
        remat: bool = False,
        unroll: bool = False,
        zero_head: bool = True,
        rngs: nnx.Rngs,
    ):
        """
        Args:
          vocab_size: the tokenizer's codebook size.
          num_tokens: tokens per image, the longest sequence the model reads or samples.
          num_classes: class labels ``0 .. num_classes-1``; ``num_classes`` is the null class.
          mlp_hidden: SwiGLU hidden width (default LlamaGen's, :func:`llama_hidden_size`).
          dtype: compute dtype (parameters stay float32; norms, softmax and logits are float32).
          remat: recompute each layer's activations in the backward pass.
          unroll: unroll the layer scan (XLA's cost analysis counts a loop body once).
          zero_head: start the output head at zero (LlamaGen does: uniform initial predictions).
        """
        if depth < 1:
            raise ValueError(f"GPT needs depth >= 1, got {depth}")
        mlp_hidden = llama_hidden_size(width) if mlp_hidden is None else mlp_hidden
        self.token_embedding = param(rngs, EMBEDDING_INIT, (vocab_size, width), ("vocab", "embed"))
        self.class_embedding = param(rngs, EMBEDDING_INIT, (num_classes + 1, width), ("classes", "embed"))
        self.layers = stacked(
            lambda r: DecoderBlock(width, num_heads, mlp_hidden, rngs=r, dtype=dtype), depth, "layers", rngs
        )
        self.final_norm = RMSNorm(width, rngs=rngs)
        head_init = nnx.initializers.zeros if zero_head else EMBEDDING_INIT
        self.head = param(rngs, head_init, (width, vocab_size), ("embed", "vocab"))
        self.vocab_size = vocab_size
        self.num_tokens = num_tokens
        self.num_classes = num_classes
        self.width = width
        self.depth = depth
        self.num_heads = num_heads
        self.dtype = dtype
        self.remat = remat
        self.unroll = unroll

    @property
    def null_class(self) -> int:
        """The label of the unconditional model (classifier-free guidance)."""
        return self.num_classes

    def _embed(self, table: nnx.Param, ids: jax.Array) -> jax.Array:
        return jnp.take(table[...], ids, axis=0, mode="clip").astype(self.dtype)

    def _inputs(self, tokens: jax.Array, labels: jax.Array) -> jax.Array:
        """``[class ; t_1 .. t_{L-1}]`` embedded: ``[B, L, width]``."""
        classes = self._embed(self.class_embedding, labels)[:, None]
        return constrain(jnp.concatenate([classes, self._embed(self.token_embedding, tokens[:, :-1])], 1), ROW_AXES)

    def features(self, tokens: jax.Array, labels: jax.Array) -> jax.Array:
        """The final-normed hidden rows ``[B, L, width]`` with teacher forcing (row i predicts token i)."""
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.num_tokens:
            raise ValueError(f"tokens must be [batch, 1..{self.num_tokens}], got shape {tokens.shape}")
        if labels.shape != tokens.shape[:1]:
            raise ValueError(f"labels must be [batch] = {tokens.shape[:1]}, got shape {labels.shape}")
        x = self._inputs(tokens, labels)
        positions = jnp.arange(tokens.shape[1])
        graphdef, state = nnx.split(self.layers)

        def layer(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, positions), None

        layer = rematerialized(layer, self.remat)
        x, _ = jax.lax.scan(layer, x, state, unroll=self.unroll)
        return self.final_norm(x)

    def logits(self, features: jax.Array) -> jax.Array:
        """float32 logits ``[B, (L,) vocab]`` of hidden rows ``[B, (L,) width]``."""
        logits = jnp.einsum(
            "...d,dv->...v", features.astype(self.dtype), self.head[...].astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        return constrain(logits, ("batch", "vocab") if logits.ndim == 2 else ("batch", "length", "vocab"))

    def __call__(self, tokens: jax.Array, labels: jax.Array) -> jax.Array:
        """Teacher-forced causal logits ``[B, L, vocab]``: row i predicts ``tokens[:, i]``."""
        return self.logits(self.features(tokens, labels))

    def drop_labels(self, labels: jax.Array, key: jax.Array, probability: float) -> jax.Array:
        """Replaces each label by the null class with ``probability`` (classifier-free guidance training)."""
        return jnp.where(jax.random.bernoulli(key, probability, labels.shape), self.null_class, labels)

    def next_token_loss(
        self,
        tokens: jax.Array,
        labels: jax.Array,
        *,
        label_drop_key: jax.Array | None = None,
        label_drop_probability: float = 0.1,
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Mean next-token cross-entropy (nats) and metrics.

        Labels are dropped to the null class only when ``label_drop_key`` is given (training).
        Metrics: ``loss``, ``accuracy`` (top-1), ``nll_by_position`` (``[L]``, mean over the
        batch; its mean is ``loss``), ``perplexity``.
        """
        if label_drop_key is not None:
            labels = self.drop_labels(labels, label_drop_key, label_drop_probability)
        logits = self(tokens, labels)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_probs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]  # [B, L]
        nll_by_position = nll.mean(0)
        loss = nll_by_position.mean()
        accuracy = (jnp.argmax(logits, -1) == tokens).astype(jnp.float32).mean()
        metrics = dict(loss=loss, accuracy=accuracy, nll_by_position=nll_by_position, perplexity=jnp.exp(loss))
        return loss, metrics

    def init_cache(self, batch_size: int, max_length: int | None = None, dtype: jnp.dtype | None = None) -> KVCache:
        """An empty cache ``[layers, batch, max_length, heads, head_dim]`` (default: num_tokens slots)."""
        max_length = self.num_tokens if max_length is None else max_length
        shape = (self.depth, batch_size, max_length, self.num_heads, self.width // self.num_heads)
        cache = KVCache.zeros(shape, self.dtype if dtype is None else dtype)
        return KVCache(constrain(cache.key, CACHE_AXES), constrain(cache.value, CACHE_AXES))

    def decode_step(self, ids: jax.Array, position: jax.Array | int, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Feeds one row per sequence and returns the next token's float32 logits ``[B, vocab]``.

        Args:
          ids: ``[B]``: class labels at ``position`` 0 (``null_class`` for the unconditional
            model), else the token sampled at the previous step, i.e. ``t_position``.
          position: the row's position (traced is fine); every earlier slot must be filled.
          cache: from :meth:`init_cache` or the previous step.
        """
        row = jnp.where(
            position == 0, self._embed(self.class_embedding, ids), self._embed(self.token_embedding, ids)
        )[:, None]
        row = constrain(row, ROW_AXES)
        graphdef, state = nnx.split(self.layers)

        def layer(h, inputs):
            layer_state, layer_key, layer_value = inputs
            return nnx.merge(graphdef, layer_state).decode(h, position, KVCache(layer_key, layer_value))

        row, rows = jax.lax.scan(layer, row, (state, cache.key, cache.value), unroll=self.unroll)
        cache = cache.insert(rows, position)
        cache = KVCache(constrain(cache.key, CACHE_AXES), constrain(cache.value, CACHE_AXES))
        return self.logits(self.final_norm(row))[:, 0], cache
