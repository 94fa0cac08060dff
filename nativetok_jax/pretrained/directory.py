"""The pretrained-model directory: the config as JSON and the parameters as safetensors.

    DIR/config.json        {"format": "nativetok_jax", "format_version": 1, "kind": "tokenizer",
                            "config": {...the run's resolved config...}, ...}
    DIR/model.safetensors  every parameter, named by its '/'-joined path ("mit/embed/kernel"; a list
                           layer's index is a path part: "encoder/down/0/...")

This is what TiTok and Hugging Face users expect of a released model: two plain files that any
safetensors reader (PyTorch, NumPy, JAX) opens, no orbax checkpoint, no training state, no
pickle. Every kind of run exports to it, each class with ``save_pretrained`` / ``from_pretrained``:

    kind         class                                       what DIR holds besides the two files
    tokenizer    nativetok_jax.Tokenizer                     (HNT runs: the last stage's tokenizer)
    generator    generation.pretrained.TrainedGenerator      its tokenizer in DIR/tokenizer/
    dvae         nativetok_jax.dvae.DVAE                     the entropy thresholds file, DIR/thresholds.json
    dit          generation.diffusion_models.TrainedDiT      nothing: the SD-VAE file stays the config's
    d2it         generation.diffusion_models.TrainedD2iT     its DVAE in DIR/dvae/

The DiT layout (what a converter of released DiT checkpoints targets) is in docs/export.md. From a
training workdir of any kind, ``python -m nativetok_jax.pretrained.export`` writes one
(``pretrained/export.py``). This module imports no model: the model classes use it.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from nativetok_jax.config import config_from_dict
from nativetok_jax.pretrained.files import WeightsError, read_safetensors

FORMAT = "nativetok_jax"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
KINDS = ("tokenizer", "generator", "dvae", "dit", "d2it")


def host_arrays(params: Any) -> dict[str, np.ndarray]:
    """``{"a/b/c": numpy array}`` of a nested dict of (possibly sharded, multi-host) arrays."""
    flat = {"/".join(map(str, key)): value for key, value in traverse_util.flatten_dict(params).items()}
    if any(isinstance(v, jax.Array) and not v.is_fully_addressable for v in flat.values()):
        flat = multihost_utils.process_allgather(flat, tiled=True)
    return {key: np.ascontiguousarray(jax.device_get(value)) for key, value in flat.items()}


def save_pretrained(directory: str, *, kind: str, config: ml_collections.ConfigDict, params: Any,
                    **meta: Any) -> None:
    """Writes ``config.json`` and ``model.safetensors`` into ``directory`` (created; files replaced).

    ``params`` is a nested dict of arrays (sharded ones are gathered); ``meta`` goes into the JSON
    beside the config (JSON-serialisable values). On several hosts only process 0 writes; every
    process must call it. Each file is written to a temporary name and renamed, so a crash never
    leaves a half-written model under the final name.
    """
    from safetensors.numpy import save

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    arrays = host_arrays(params)
    if jax.process_index() != 0:
        return
    root = epath.Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, **meta,
              "config": json.loads(config.to_json_best_effort())}
    _atomic_write(root / WEIGHTS_FILE, save(arrays, metadata={"format": FORMAT, "kind": kind}))
    _atomic_write(root / CONFIG_FILE, json.dumps(header, indent=2, sort_keys=True).encode())


def _atomic_write(path: epath.Path, data: bytes) -> None:
    """A temporary file beside ``path``, renamed over it: readers never see half a file."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_bytes(data)
    tmp.replace(path)


def load_pretrained(directory: str, *, kind: str) -> tuple[ml_collections.ConfigDict, dict[str, Any], dict[str, Any]]:
    """``(config, params, meta)`` from a directory :func:`save_pretrained` wrote.

    ``params`` is a nested dict of numpy arrays; ``meta`` is the JSON header without the config.
    Raises :class:`~nativetok_jax.pretrained.files.WeightsError` (one line, naming the file) for a
    missing or unreadable file, another format, or a model of another ``kind``.
    """
    root = epath.Path(directory)
    config_path, weights_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.exists():
            raise WeightsError(f"{path} not found: {directory!r} is not an exported model (save_pretrained)")
    try:
        header = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{config_path} is not readable JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or "config" not in header:
        raise WeightsError(f"{config_path} is not a {FORMAT} export (no 'format': '{FORMAT}' and 'config')")
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise WeightsError(f"{config_path} has format_version {header['format_version']}; this version reads "
                           f"up to {FORMAT_VERSION}: update nativetok_jax")
    if header.get("kind") != kind:
        raise WeightsError(f"{config_path} holds a {header.get('kind')!r}, expected a {kind!r}")
    config = config_from_dict(header.pop("config"))
    if "://" in str(weights_path):  # gs:// and the like: the safetensors library reads local files
        with tempfile.TemporaryDirectory() as local:
            weights_path.copy(os.path.join(local, WEIGHTS_FILE))
            arrays = read_safetensors(os.path.join(local, WEIGHTS_FILE))
    else:
        arrays = read_safetensors(os.fspath(weights_path))
    params = traverse_util.unflatten_dict(arrays, sep="/")
    return config, params, header
