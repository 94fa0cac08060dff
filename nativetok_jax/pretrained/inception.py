"""Converts the FID InceptionV3 weights into the project's format, and loads them.

Reads pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` uses the same names and shapes), as a PyTorch file
or ``.safetensors``. Its names map one to one onto :class:`InceptionV3`'s::

    Conv2d_1a_3x3.conv.weight [O, I, kh, kw]  -> Conv2d_1a_3x3/conv/kernel [kh, kw, I, O]
    Mixed_5b.branch1x1.bn.weight / .bias      -> Mixed_5b/branch1x1/bn/scale / bias
    Mixed_5b.branch1x1.bn.running_mean / _var -> Mixed_5b/branch1x1/bn/mean / var
    fc.weight [1008, 2048] / fc.bias          -> fc/kernel [2048, 1008] / fc/bias

``num_batches_tracked`` counters are dropped. Any other name (an ``AuxLogits`` head, say, from
torchvision's ImageNet InceptionV3, which is a different network) is an error, never skipped.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nativetok_jax.models.frozen.inception import InceptionV3
from nativetok_jax.pretrained import files

KIND = "fid_inception"

_BATCH_NORM_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def fid_inception_arrays(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The flat ``{"Conv2d_1a_3x3/conv/kernel": HWIO array, ...}`` of a PyTorch state dict."""
    flat: dict[str, np.ndarray] = {}
    for name, value in state.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "num_batches_tracked":
            continue
        value = np.asarray(value, dtype=np.float32)
        if module.endswith(".bn") and leaf in _BATCH_NORM_NAMES:
            leaf = _BATCH_NORM_NAMES[leaf]
        elif leaf == "weight" and value.ndim == 4:
            leaf, value = "kernel", value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif leaf == "weight" and value.ndim == 2:
            leaf, value = "kernel", value.T
        flat[f"{module.replace('.', '/')}/{leaf}"] = value
    return flat


@functools.lru_cache(maxsize=4)
def _abstract_model(image_size: int | None, dtype: jnp.dtype) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and shapes of an :class:`InceptionV3`, traced once (tracing its init takes a second)."""
    return nnx.split(nnx.eval_shape(
        lambda: InceptionV3(rngs=nnx.Rngs(0), image_size=image_size, dtype=dtype)))


def _model_from_arrays(flat: Mapping[str, np.ndarray], *, source: str, image_size: int | None,
                       dtype: jnp.dtype) -> InceptionV3:
    """An :class:`InceptionV3` holding ``flat`` (checked strictly by ``files.load_into``).

    The model is built abstractly and filled from host arrays, then moved to the device in one
    go: running the random initialisers, or updating device arrays one by one, would take
    seconds for this 24M-parameter network.
    """
    graphdef, state = _abstract_model(image_size, dtype)
    model = nnx.merge(graphdef, jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), state))
    files.load_into(model, flat, source=source)
    nnx.update(model, jax.device_put(nnx.state(model)))
    return model


def convert_fid_inception(pth_path: str, out_path: str) -> None:
    """Writes the ``kind="fid_inception"`` weights file ``out_path`` from the PyTorch FID weights.

    The names and shapes are checked against the model before anything is written, so a wrong
    file fails here, in one line, not when it is loaded.
    """
    state = files.read_state_dict(pth_path)
    if not state:
        raise files.WeightsError(f"{pth_path} holds no tensors")
    flat = fid_inception_arrays(state)
    _model_from_arrays(flat, source=f"{pth_path} (as the FID InceptionV3)", image_size=None,
                       dtype=jnp.float32)
    files.save_weights(out_path, flat, kind=KIND, source=os.path.basename(pth_path),
                       network="inception-2015-12-05")


def load_inception(path: str, *, image_size: int | None = 299,
                   dtype: jnp.dtype = jnp.float32) -> InceptionV3:
    """An :class:`InceptionV3` holding the converted weights in ``path`` (a ``kind="fid_inception"`` file)."""
    flat, _ = files.load_weights(path, kind=KIND)
    return _model_from_arrays(flat, source=path, image_size=image_size, dtype=dtype)
