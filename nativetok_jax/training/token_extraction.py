"""Token extraction: encode a dataset once with a trained tokenizer, for generator training.

Example ``i`` is image ``i mod len(source)`` cropped as the tokenizer's training data is
(``config.data``: a random square of ``crop_min``..``crop_max`` of the short side and a random
flip, drawn from ``(seed, i)``; or the centre square when crops are whole), so the store is the
same whoever makes it and whenever an interrupted extraction resumes. See
:mod:`nativetok_jax.data.token_store` for the files.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from nativetok_jax.data import token_store
from nativetok_jax.data.images import center_crop
from nativetok_jax.data.pipeline import SkippedImages, decode, random_crop
from nativetok_jax.tokenizer import Tokenizer


def example_image(source: Any, index: int, data: ml_collections.ConfigDict, image_size: int, seed: int,
                  skipped: SkippedImages) -> tuple[np.ndarray, int] | None:
    """Example ``index``'s crop and label (``None`` when the image cannot be read)."""
    element = source[index % len(source)]
    image = decode(element["image"], skipped, element.get("name", f"element {index % len(source)}"))
    if image is None:
        return None
    if data.crop_min < 1.0 or data.flip:
        rng = np.random.default_rng([seed, index])
        image = random_crop(image, rng, image_size, data.crop_min, data.crop_max, data.flip)
    else:
        image = center_crop(image, image_size)
    return image, int(element["label"])


def extract_tokens(
    tokenizer: Tokenizer,
    source: Any,
    directory: str,
    *,
    data: ml_collections.ConfigDict,
    num_examples: int,
    num_classes: int,
    seed: int,
    description: dict[str, Any],
    batch_size: int = 64,
    shard_size: int = 4096,
) -> token_store.TokenSource:
    """Encodes ``num_examples`` examples into ``directory`` (resuming, or reusing a finished store)."""
    shard_size = max(batch_size, shard_size // batch_size * batch_size)
    meta = dict(description, num_examples=num_examples, shard_size=shard_size, seed=seed,
                num_tokens=tokenizer.num_tokens, codebook_size=tokenizer.codebook_size,
                image_size=tokenizer.image_size, num_classes=num_classes,
                crops=[data.crop_min, data.crop_max, bool(data.flip)])
    todo = token_store.open_for_writing(directory, meta)
    if todo:
        logging.info("encoding %d examples into %s (%d shards to write)", num_examples, directory, len(todo))
    skipped = SkippedImages()
    for shard in todo:
        indices = range(shard * shard_size, min((shard + 1) * shard_size, num_examples))
        examples = [example_image(source, i, data, tokenizer.image_size, seed, skipped) for i in indices]
        examples = [e for e in examples if e is not None]
        images = np.stack([e[0] for e in examples]) if examples else np.zeros((0,) + (tokenizer.image_size,) * 2 + (3,), np.uint8)
        ids = [_encode_padded(tokenizer, images[i : i + batch_size], batch_size) for i in range(0, len(images), batch_size)]
        if jax.process_index() == 0:
            token_store.write_shard(directory, shard,
                                    np.concatenate(ids) if ids else np.zeros((0, tokenizer.num_tokens), np.int32),
                                    np.array([e[1] for e in examples], np.int32))
    if jax.process_index() == 0 and (todo or not token_store.read_meta(directory).get("complete")):
        written = token_store.mark_complete(directory)
        logging.info("token store %s complete: %d examples", directory, written)
    return token_store.TokenSource(directory)


def _encode_padded(tokenizer: Tokenizer, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Encodes a batch padded to ``batch_size``, so every call reuses one compiled program."""
    padded = np.concatenate([images, np.zeros((batch_size - len(images),) + images.shape[1:], images.dtype)])
    return np.asarray(tokenizer.encode(padded))[: len(images)]
