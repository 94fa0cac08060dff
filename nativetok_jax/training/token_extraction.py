"""Token extraction: encode a dataset once with a trained tokenizer, for generator training.

:func:`encode_into_store` is the one writer of every array store (this module's token store, the
diffusion trainer's latent store with its autoencoder, D²iT's grain latent store with its DVAE),
split over processes with barriers. Example ``i`` is image ``i mod len(source)`` cropped as the tokenizer's training data is
(``config.data``: a random square of ``crop_min``..``crop_max`` of the short side and a random
flip, drawn from ``(seed, i)``; when crops are whole, the centre square and the random flip), so the store is the
same whoever makes it and whenever an interrupted extraction resumes. See
:mod:`nativetok_jax.data.token_store` for the files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from nativetok_jax import sharding, storage
from nativetok_jax.data import token_store
from nativetok_jax.data.images import center_crop
from nativetok_jax.data.pipeline import SkippedImages, decode, random_crop
from nativetok_jax.tokenizer import Tokenizer

# Each process encodes its shards on its own devices, data-parallel.
LOCAL_MESH = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))


def local_mesh() -> jax.sharding.Mesh:
    """This process's own devices, data-parallel: where a store's encoder runs, so that no
    process waits for another while encoding its shards."""
    return sharding.make_mesh(LOCAL_MESH, jax.local_devices())


def example_image(source: Any, index: int, data: ml_collections.ConfigDict, image_size: int, seed: int,
                  skipped: SkippedImages) -> tuple[np.ndarray, int] | None:
    """Example ``index``'s crop and label (``None`` when the image cannot be read)."""
    element = source[index % len(source)]
    image = decode(element["image"], skipped, element.get("name", f"element {index % len(source)}"))
    if image is None:
        return None
    rng = np.random.default_rng([seed, index])
    if data.crop_min < 1.0:
        image = random_crop(image, rng, image_size, data.crop_min, data.crop_max, data.flip)
    else:  # whole crops: the centre square (LlamaGen's and TiTok's extraction), flipped at random
        image = center_crop(image, image_size)
        if data.flip and rng.random() < 0.5:
            image = np.ascontiguousarray(image[:, ::-1])
    return image, int(element["label"])


def extract_tokens(
    tokenizer: Tokenizer,
    source: Any,
    directory: storage.PathLike,
    *,
    data: ml_collections.ConfigDict,
    num_examples: int,
    num_classes: int,
    seed: int,
    description: dict[str, Any],
    batch_size: int = 64,
    shard_size: int = 4096,
) -> token_store.TokenSource:
    """Encodes ``num_examples`` examples into ``directory`` (resuming, or reusing a finished store).

    See :func:`encode_into_store`; the store records the tokenizer's sizes besides ``description``.
    On several processes every one gathers a copy of the tokenizer onto its own devices first
    (collective: every process takes part, even one with nothing left to encode).

    Raises :class:`token_store.TokenStoreError` when ``directory`` holds a store made with
    other settings (every process raises it: they all read the same ``meta.json``).
    """
    meta = dict(description, num_tokens=tokenizer.num_tokens, codebook_size=tokenizer.codebook_size,
                image_size=tokenizer.image_size, num_classes=num_classes)
    encoder = tokenizer.with_mesh(local_mesh()) if jax.process_count() > 1 else tokenizer
    return encode_into_store(
        lambda images: np.asarray(encoder.encode(images)), source, directory, data=data,
        image_size=tokenizer.image_size, num_examples=num_examples, seed=seed, description=meta,
        batch_size=batch_size, shard_size=shard_size, value_shapes=(tokenizer.num_tokens,),
        store=token_store.TokenSource)


Values = np.ndarray | Mapping[str, np.ndarray]


def encode_into_store(
    encode: Callable[[np.ndarray], Values],
    source: Any,
    directory: storage.PathLike,
    *,
    data: ml_collections.ConfigDict,
    image_size: int,
    num_examples: int,
    seed: int,
    description: dict[str, Any],
    value_shapes: tuple[int, ...] | Mapping[str, tuple[int, ...]],
    store: type[token_store.ArraySource] = token_store.TokenSource,
    batch_size: int = 64,
    shard_size: int = 4096,
) -> token_store.ArraySource:
    """Encodes ``num_examples`` crops of ``source`` with ``encode`` into the store ``directory``
    (resuming, or reusing a finished store), and opens it as ``store``.

    ``encode`` maps uint8 images ``[batch_size, image_size, image_size, 3]`` (the last batch of a
    shard padded with copies of its last image, so one compiled program serves every call) to
    ``{field: [batch_size, *value_shapes[field]]}`` for the fields of ``store.FIELDS`` (or, for a
    store of one field, that field's array, ``value_shapes`` its shape); the values are kept in
    the dtypes ``encode`` gives them. ``encode`` runs on each process's own devices (see
    :func:`local_mesh`): a process may have no shard to encode.

    Shards hold ``shard_size`` examples (whole batches; fewer when a process's share of
    ``num_examples`` is smaller, so every process has work; a resumed store keeps its own). On
    several processes every one calls this with the same arguments: shard ``i`` is encoded and
    written by process ``i mod process_count`` alone, on its own devices (so no host waits for
    another while encoding); the processes then meet at a barrier, process 0 marks the store
    complete, and all open it after a second one. What is left to encode is read from the shard
    files, and only a shard's owner writes it, so processes resuming an interrupted extraction
    cannot disagree about the work.

    Raises :class:`token_store.TokenStoreError` when ``directory`` holds a store made with
    other settings (``description``, the crops, the seed and the sizes; every process raises it).
    """
    process, num_processes = jax.process_index(), jax.process_count()
    fields = tuple(store.FIELDS)
    if not isinstance(value_shapes, Mapping):
        value_shapes = {fields[0]: tuple(value_shapes)}
    recorded = token_store.read_meta(directory)
    if recorded is not None:  # a store keeps the shards it began with, whoever resumes it
        shard_size = recorded["shard_size"]
    else:  # whole batches, and at most a process's share, so that every process has work
        share = -(-num_examples // num_processes)
        shard_size = max(batch_size, min(shard_size // batch_size, -(-share // batch_size)) * batch_size)
    meta = dict(description, num_examples=num_examples, shard_size=shard_size, seed=seed,
                crops=[data.crop_min, data.crop_max, bool(data.flip)])
    existing = token_store.check_meta(directory, meta)
    # Process 0 marks a store complete only after every process has passed this point (the first
    # barrier below), so all processes take the same branch.
    if existing is not None and existing.get("complete"):
        return store(directory)
    if existing is None and process == 0:
        token_store.write_meta(directory, dict(meta, complete=False))
    mine = [i for i in token_store.missing_shards(directory, meta, fields) if i % num_processes == process]
    if mine:
        logging.info("encoding %s of %d examples into %s (%d shards)", "all" if num_processes == 1 else
                     f"process {process}'s share", num_examples, directory, len(mine))
    skipped = SkippedImages()
    for shard in mine:
        indices = range(shard * shard_size, min((shard + 1) * shard_size, num_examples))
        examples = [example_image(source, i, data, image_size, seed, skipped) for i in indices]
        examples = [e for e in examples if e is not None]
        batches = [_encode_padded(encode, np.stack([e[0] for e in examples[i : i + batch_size]]), batch_size,
                                  fields[0]) for i in range(0, len(examples), batch_size)]
        values = {name: np.concatenate([b[name] for b in batches]) if batches
                  else np.zeros((0, *value_shapes[name]), store.FIELDS[name]) for name in fields}
        token_store.write_shard(directory, shard, values, np.array([e[1] for e in examples], np.int32))
    if num_processes > 1:
        multihost_utils.sync_global_devices(f"store {directory}: shards written")
    if process == 0:
        written = token_store.mark_complete(directory)
        logging.info("%s store %s complete: %d examples", store.kind, directory, written)
    if num_processes > 1:
        multihost_utils.sync_global_devices(f"store {directory}: complete")
    return store(directory)


def _encode_padded(encode: Callable[[np.ndarray], Values], images: np.ndarray, batch_size: int,
                   field: str) -> dict[str, np.ndarray]:
    """``{field: values}`` of a batch padded to ``batch_size`` with copies of its last image (so
    every call reuses one compiled program, and no encoder sees a blank image)."""
    padded = np.concatenate([images, np.repeat(images[-1:], batch_size - len(images), axis=0)])
    values = encode(padded)
    values = dict(values) if isinstance(values, Mapping) else {field: values}
    return {name: np.asarray(value)[: len(images)] for name, value in values.items()}
