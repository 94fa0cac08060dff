"""Weight files: the project's own ``.npz`` format, and readers for the formats it converts from.

The project's format is a plain ``.npz`` whose keys are '/'-joined NNX state paths
(``features/0/kernel``) and whose ``__meta__`` entry is a JSON header (``kind``, ``source``,
``format_version``, anything else the converter records). It is read with
``allow_pickle=False``, so loading a file can never run code. Foreign files are read the same
way: PyTorch files only through ``torch.load(weights_only=True)``, safetensors through the
``safetensors`` library and Flax msgpack through ``flax.serialization`` (both pickle-free).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from nativetok_jax.errors import UserError
from nativetok_jax import storage

FORMAT_VERSION = 1
_META_KEY = "__meta__"
_WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)


class WeightsError(UserError, ValueError):
    """A weight file that cannot be read, or whose contents do not fit the model."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts (or lists) of arrays -> ``{"a/b/0/c": array}``."""
    flat: dict[str, np.ndarray] = {}
    items = tree.items() if isinstance(tree, Mapping) else enumerate(tree)
    for key, value in items:
        path = f"{prefix}{key}"
        if isinstance(value, (Mapping, list, tuple)):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = np.asarray(value)
    return flat


def save_weights(path: storage.PathLike, flat: Mapping[str, np.ndarray], *, kind: str, **meta: Any) -> None:
    """Writes ``flat`` and a JSON header to ``path`` (local or a URL) whole."""
    header = {"kind": kind, "format_version": FORMAT_VERSION, **meta}
    arrays = {k: np.asarray(v) for k, v in flat.items()}
    if _META_KEY in arrays:
        raise WeightsError(f"'{_META_KEY}' is reserved and cannot be a parameter name")
    arrays[_META_KEY] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    storage.write_npz(path, **arrays)


def _read_bytes(path: storage.PathLike) -> bytes:
    """The bytes of a weights file, local or a URL (``WeightsError`` when there is none)."""
    file = storage.path(path)
    if not file.is_file():
        raise WeightsError(f"weights file not found: {path}")
    return file.read_bytes()


def load_weights(path: storage.PathLike, *, kind: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reads a file written by :func:`save_weights`; checks its ``kind`` when one is asked for."""
    raw = _read_bytes(path)
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:  # zipfile, ValueError, OSError: all mean "not our format"
        raise WeightsError(f"{path} is not a nativetok_jax weights file (.npz): {e}") from e
    if _META_KEY not in arrays:
        raise WeightsError(f"{path} has no '{_META_KEY}' header: convert it with nativetok_jax.convert")
    meta = json.loads(arrays.pop(_META_KEY).tobytes().decode())
    if kind is not None and meta.get("kind") != kind:
        raise WeightsError(f"{path} holds '{meta.get('kind')}' weights, expected '{kind}'")
    return arrays, meta


def read_state_dict(path: storage.PathLike) -> dict[str, np.ndarray]:
    """A PyTorch state dict (``.pth``/``.pt``/``.bin``/``.ckpt``) or a ``.safetensors`` file as numpy.

    PyTorch files are read with ``weights_only=True`` (tensors and plain containers only); a
    checkpoint that wraps its state dict (``{"state_dict": ...}``, ``{"model": ...}``) is unwrapped.
    """
    if str(path).endswith(".safetensors"):
        return read_safetensors(path)
    data = _read_bytes(path)
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f"reading {path} needs PyTorch (pip install torch, the CPU build is enough), "
            "or give the weights as .safetensors"
        ) from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"cannot read {path} as a PyTorch state dict: {first_line}") from e
    for wrapper in ("state_dict", "model", "params"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items() if hasattr(v, "numpy")}


def read_safetensors(path: storage.PathLike) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file (local or a URL) as numpy arrays, read by the ``safetensors``
    library (no PyTorch).

    bfloat16 tensors come back as float32 (exact). A truncated or malformed file raises
    :class:`WeightsError` with the library's reason on one line.
    """
    import tempfile

    from safetensors import SafetensorError
    from safetensors.numpy import load_file  # reads bfloat16 (as ml_dtypes.bfloat16); ``load(bytes)`` does not

    try:
        if storage.is_local(path):
            tensors = load_file(str(storage.path(path)))
        else:  # the library reads local files only: a remote file goes through a temporary copy
            with tempfile.NamedTemporaryFile(suffix=".safetensors") as local:
                local.write(_read_bytes(path))
                local.flush()
                tensors = load_file(local.name)
    except (SafetensorError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{path} is not a readable safetensors file: {reason}") from None
    return {name: array.astype(np.float32) if array.dtype.name == "bfloat16" else array
            for name, array in tensors.items()}


def read_flax_msgpack(path: storage.PathLike) -> dict[str, Any]:
    """A Flax checkpoint file written by ``flax.serialization`` (msgpack; no pickle)."""
    from flax import serialization

    data = _read_bytes(path)
    try:
        return serialization.msgpack_restore(data)
    except Exception as e:
        raise WeightsError(f"{path} is not a Flax msgpack checkpoint: {type(e).__name__}") from e


def model_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters and batch statistics as ``{"a/b/c": array}``."""
    state = nnx.state(model, _WEIGHTS)
    return {"/".join(map(str, path)): np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}


def load_into(model: nnx.Module, flat: Mapping[str, np.ndarray], *, source: str) -> None:
    """Copies ``flat`` into ``model``'s parameters; every missing, unexpected or misshaped name
    is listed in one error line (the first few of each), so a wrong file never loads half-way."""
    state = nnx.state(model, _WEIGHTS)
    expected = {"/".join(map(str, path)): v for path, v in nnx.to_flat_state(state)}
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    misshaped = sorted(
        f"{k} {tuple(np.shape(flat[k]))} vs {tuple(expected[k].shape)}"
        for k in set(expected) & set(flat)
        if tuple(np.shape(flat[k])) != tuple(expected[k].shape)
    )
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if names:
            shown = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
            problems.append(f"{len(names)} {label}: {shown}")
    if problems:
        raise WeightsError(f"{source} does not fit the model: " + "; ".join(problems))
    for path, variable in nnx.to_flat_state(state):
        key = "/".join(map(str, path))
        variable[...] = np.asarray(flat[key], dtype=variable[...].dtype)
    nnx.update(model, state)


def build_loaded(build: Callable[[], nnx.Module], flat: Mapping[str, np.ndarray], *, source: str) -> nnx.Module:
    """``build()``'s module holding ``flat`` (checked as :func:`load_into` does), on the default device.

    The module is built abstractly and filled with zeros first: random initialisation of tens of
    millions of parameters would cost seconds only to be overwritten.
    """
    import jax
    import jax.numpy as jnp

    graphdef, state = nnx.split(nnx.eval_shape(build))
    model = nnx.merge(graphdef, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state))
    load_into(model, flat, source=source)
    nnx.update(model, jax.tree.map(jnp.asarray, nnx.state(model)))  # numpy -> device arrays
    return model


def header_config(meta: Mapping[str, Any], from_dict: Callable[[Mapping[str, Any]], Any], *, source: str,
                  what: str) -> Any:
    """``from_dict(meta["config"])``; a header that does not fit is a one-line ``WeightsError``."""
    try:
        return from_dict(meta.get("config") or {})
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{source}: bad {what} config in the header ({e})") from None


def problems_line(missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
    """``"2 missing: a, b; 1 wrong shape: c (3, 4)"`` (the first four of each kind), or ``""``."""
    problems = []
    for label, names in (("missing", sorted(set(missing))), ("unexpected", sorted(set(unexpected))),
                         ("wrong shape", sorted(set(misshaped)))):
        if names:
            shown = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
            problems.append(f"{len(names)} {label}: {shown}")
    return "; ".join(problems)


def gather(expected: Mapping[str, tuple[int, ...]], source: Mapping[str, np.ndarray],
           fetch: Callable[[str, int | None], tuple[str, np.ndarray | None]], *, depth: Callable[[str], int],
           ignored: Callable[[str], bool] = lambda name: False, path: str, label: str, model: str) -> dict[str, np.ndarray]:
    """Our flat arrays from a foreign state dict, every problem in one ``WeightsError`` line.

    Args:
      expected: our parameter names and shapes; a stacked one (``depth(key) > 0``) has the layers first.
      source: the foreign arrays by their names.
      fetch: ``(key, layer or None) -> (the source's name, our array or None if the source lacks it)``.
      depth: the layer count of a stacked parameter, 0 for the others.
      ignored: source names that are read otherwise (or deliberately not), never "unexpected".
      path, label, model: for the message: the file, its layout and what it should fit.
    """
    flat, used, missing, misshaped = {}, set(), [], []
    for key, shape in expected.items():
        layers = depth(key)
        values = []
        for i in range(layers) if layers else (None,):
            name, value = fetch(key, i)
            used.add(name)
            if value is None:
                missing.append(name)
            elif value.shape != (shape[1:] if layers else shape):
                misshaped.append(f"{name} {tuple(np.shape(source.get(name, value)))}")
            else:
                values.append(value)
        if len(values) == max(layers, 1):
            flat[key] = np.stack(values) if layers else values[0]
    problems = problems_line(missing, [k for k in source if k not in used and not ignored(k)], misshaped)
    if problems:
        raise WeightsError(f"{path} ({label}) does not fit {model}: {problems}")
    return flat
