"""The mean-colour shortcut: each image's mean colour, sent exactly in the first token ids.

With ``model.shortcut = "mean_colour"`` a tokenizer spends 24 bits of its code on the image's
mean colour at 8 bits per channel, and its networks work on the rest: the encoder sees the image
minus that colour, and the decoder's output has it added back (parameter-free; the tokenizer
counterpart of the Dynamic VAE's block-mean shortcut, after DC-AE's residual autoencoding,
arXiv 2410.10733 Sec. 3.2). It exists because a tokenizer trained on a few photographs misses
the mean colour of unseen ones by about 4 grey levels, which caps a flat crop near 36 dB where a
same-bits thumbnail reaches 49 dB (docs/models_that_learn.md, "Smooth crops").

The colour travels as ordinary ids of the tokenizer's own codebook, in front of the learned ones,
so the bit count stays ``ids x log2(codebook_size)`` and generators model it like any token. Its
24 bits are written most significant first and interleaved over the channels (R7 G7 B7 R6 G6 B6
... R0 G0 B0), ``log2(codebook_size)`` bits per id, the last id padded with zeros. A prefix that
holds only some of those bits gives each channel its known high bits and the middle of the
unknown range (a 12-bit id alone is the colour at 4 bits per channel, as the same-bits codec
under 24 bits). Needs a power-of-two codebook.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

COLOUR_BITS = 24  # 8 bits x 3 channels
SHORTCUTS = ("none", "mean_colour")


def bits_per_id(codebook_size: int) -> int:
    """``log2(codebook_size)``; raises ``ValueError`` unless it is a power of two >= 2."""
    if codebook_size < 2 or codebook_size & (codebook_size - 1):
        raise ValueError(f"the mean-colour shortcut needs a power-of-two codebook, got {codebook_size}")
    return codebook_size.bit_length() - 1


def colour_id_count(codebook_size: int) -> int:
    """How many ids carry the 24 colour bits: ``ceil(24 / log2(codebook_size))`` (2 for 4,096 codes)."""
    return math.ceil(COLOUR_BITS / bits_per_id(codebook_size))


def quantized_mean(images: jax.Array) -> jax.Array:
    """Images ``[B, H, W, 3]`` in [-1, 1] -> their mean colours ``[B, 3]`` rounded to the nearest of
    the 256 uint8 levels (float32, in the same [-1, 1] units); no gradient flows through it."""
    levels = jnp.clip(jnp.round((jnp.mean(images.astype(jnp.float32), axis=(1, 2)) + 1.0) * 127.5), 0.0, 255.0)
    return jax.lax.stop_gradient(levels / 127.5 - 1.0)


def _levels(colour: jax.Array) -> jax.Array:
    """[-1, 1] colours of :func:`quantized_mean` -> int32 levels 0..255."""
    return jnp.clip(jnp.round((colour + 1.0) * 127.5), 0, 255).astype(jnp.int32)


def colour_to_ids(colour: jax.Array, codebook_size: int) -> jax.Array:
    """Quantised mean colours ``[B, 3]`` ([-1, 1] units) -> int32 ids ``[B, colour_id_count]``."""
    bits, count = bits_per_id(codebook_size), colour_id_count(codebook_size)
    shifts = 7 - jnp.arange(8)
    stream = (_levels(colour)[:, None, :] >> shifts[None, :, None]) & 1  # [B, 8, 3]: bit 7-i of channel c
    stream = stream.reshape(colour.shape[0], COLOUR_BITS)  # R7 G7 B7 R6 ...
    stream = jnp.pad(stream, ((0, 0), (0, count * bits - COLOUR_BITS))).reshape(-1, count, bits)
    return jnp.sum(stream << (bits - 1 - jnp.arange(bits)), axis=-1).astype(jnp.int32)


def ids_to_colour(ids: jax.Array, codebook_size: int, num_visible: int | jax.Array | None = None) -> jax.Array:
    """Colour ids ``[B, colour_id_count]`` -> mean colours ``[B, 3]`` in [-1, 1].

    ``num_visible`` (an int or ``[B]`` ints; None: all): only the first ``num_visible`` ids are read;
    each channel keeps its known high bits and takes the middle of its unknown low ones (128 when
    none is known).
    """
    bits, count = bits_per_id(codebook_size), colour_id_count(codebook_size)
    batch = ids.shape[0]
    stream = (ids[:, :, None] >> (bits - 1 - jnp.arange(bits))) & 1  # [B, count, bits]
    stream = stream.reshape(batch, count * bits)[:, :COLOUR_BITS].reshape(batch, 8, 3)
    visible = count if num_visible is None else num_visible
    known_bits = jnp.reshape(jnp.minimum(jnp.asarray(visible) * bits, COLOUR_BITS), (-1, 1, 1))
    known = (3 * jnp.arange(8)[:, None] + jnp.arange(3)[None, :])[None] < known_bits  # [B or 1, 8, 3]
    weights = (1 << (7 - jnp.arange(8)))[None, :, None]
    value = jnp.sum(jnp.where(known, stream, 0) * weights, axis=1)  # [B, 3]
    known_count = jnp.broadcast_to(jnp.sum(known, axis=1), value.shape)  # known bits per channel
    middle = jnp.where(known_count < 8, 1 << jnp.maximum(7 - known_count, 0), 0)
    return (value + middle).astype(jnp.float32) / 127.5 - 1.0
