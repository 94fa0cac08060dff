"""Token order: the order in which a generator reads a tokenizer's ids.

The token-order experiment (``nativetok_jax/experiments/token_order.py``, issue 15) asks whether
NativeTok's gain comes from its *causal order* or from *easier codes*. Its ``native_permuted`` and
``native_reversed`` arms keep NativeTok's ids and change only the order the AR generator reads
them in, so one field, ``generator.token_order.permutation``, says which order:

- ``"identity"``: the tokenizer's own order (every other arm);
- ``"reversed"``: position ``j`` reads tokenizer position ``L - 1 - j``;
- ``"random:<seed>"``: a fixed permutation drawn from ``numpy.random.default_rng(seed)``.

The store reader permutes (:class:`ReorderedTokens` wraps a :class:`TokenSource`, so a store is
extracted once and read in any order), and the generator's sampled ids go back to the
tokenizer's order before decoding (:func:`to_tokenizer_order`), so samples stay correct.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nativetok_jax.errors import UserError
from nativetok_jax.data.token_store import TokenSource

IDENTITY, REVERSED, RANDOM = "identity", "reversed", "random"


class TokenOrderError(UserError, ValueError):
    """A ``token_order.permutation`` that names no order; the message says what is accepted."""


def token_permutation(spec: str, num_tokens: int) -> np.ndarray:
    """The reading order ``spec`` names: int64 ``[num_tokens]``; generator position ``j`` reads
    tokenizer position ``permutation[j]``.

    Raises:
      TokenOrderError: ``spec`` is not ``"identity"``, ``"reversed"`` or ``"random:<int seed>"``.
    """
    if spec == IDENTITY:
        return np.arange(num_tokens)
    if spec == REVERSED:
        return np.arange(num_tokens)[::-1].copy()
    kind, _, seed = str(spec).partition(":")
    if kind != RANDOM or not seed.lstrip("-").isdigit():
        raise TokenOrderError(f"generator.token_order.permutation: must be 'identity', 'reversed' or "
                              f"'random:<seed>', got {spec!r}")
    return np.random.default_rng(int(seed)).permutation(num_tokens)


def to_reading_order(ids: Any, permutation: np.ndarray) -> Any:
    """Tokenizer-order ids ``[..., L]`` -> the generator's reading order (numpy or jax arrays)."""
    return ids[..., permutation]


def to_tokenizer_order(ids: Any, permutation: np.ndarray) -> Any:
    """The inverse of :func:`to_reading_order`: generated ids ``[..., L]`` -> the tokenizer's order,
    ready for ``Tokenizer.decode``."""
    return ids[..., np.argsort(permutation)]


class ReorderedTokens:
    """A :class:`TokenSource` read in another order: ``source[i]["ids"]`` and ``arrays()`` give the
    ids permuted by ``permutation``; everything else (labels, sizes, ``meta``) is the store's."""

    def __init__(self, source: TokenSource, permutation: np.ndarray):
        if sorted(np.asarray(permutation).tolist()) != list(range(source.num_tokens)):
            raise TokenOrderError(f"a reading order of {source.num_tokens} tokens must permute "
                                  f"0..{source.num_tokens - 1}, got {np.asarray(permutation).tolist()}")
        self.source = source
        self.permutation = np.asarray(permutation)
        self.meta = source.meta
        self.num_tokens, self.codebook_size, self.num_classes = source.num_tokens, source.codebook_size, source.num_classes

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        item = self.source[index]
        return dict(item, ids=to_reading_order(item["ids"], self.permutation))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        ids, labels = self.source.arrays()
        return to_reading_order(ids, self.permutation), labels


def reading_order(source: TokenSource, spec: str) -> TokenSource | ReorderedTokens:
    """``source`` read in the order ``spec`` names (itself for ``"identity"``)."""
    if spec == IDENTITY:
        return source
    return ReorderedTokens(source, token_permutation(spec, source.num_tokens))
