"""Converts the published LPIPS (VGG16, v0.1) weights into the project's format, and loads them.

Two layouts are read, as PyTorch files or ``.safetensors``:

* torchvision's ``vgg16-397923af.pth`` (``features.{0,2,5,...,28}.weight/bias``; the classifier is
  ignored) together with the LPIPS heads ``lpips/weights/v0.1/vgg.pth`` from
  richzhang/PerceptualSimilarity (``lin0.model.1.weight`` .. ``lin4.model.1.weight``);
* one state dict of the ``lpips`` package's whole ``LPIPS(net="vgg")`` module, whose VGG weights
  sit in ``net.slice1.0.weight`` .. ``net.slice5.28.weight`` next to the ``lin*`` heads.

Names may carry a prefix (``module.``, ``perceptual_loss.``, ...), as in checkpoints that hold the
LPIPS module inside a larger one; a name that matches twice is an error, never a guess.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nativetok_jax.models.frozen.lpips import LPIPS, TAP_CHANNELS, VGG16_LAYOUT
from nativetok_jax.pretrained import files

KIND = "lpips"


def _torchvision_conv_indices() -> list[tuple[int, int]]:
    """``(index in vgg16().features, LPIPS slice number)`` of each convolution, in order.

    Every convolution is followed by a ReLU and every pool ends a slice, so the indices run
    0, 2, 5, 7, 10, ... and slices 1..5 hold the blocks between pools.
    """
    indices, position, block = [], 0, 1
    for entry in VGG16_LAYOUT:
        if entry == "M":
            position += 1
            block += 1
        else:
            indices.append((position, block))
            position += 2
    return indices


def _conv_shapes() -> list[tuple[int, int]]:
    """``(in_channels, out_channels)`` of each VGG16 convolution."""
    shapes, in_channels = [], 3
    for entry in VGG16_LAYOUT:
        if entry != "M":
            shapes.append((in_channels, entry))
            in_channels = entry
    return shapes


class _Lookup:
    """Finds parameters by their reference name, exactly or after a ``prefix.``; records misses."""

    def __init__(self, state: Mapping[str, np.ndarray]):
        self.state = state
        self.missing: list[str] = []
        self.misshaped: list[str] = []
        self.ambiguous: list[str] = []

    def take(self, names: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray | None:
        """The array under the first of ``names`` (alternative spellings) present, as float32."""
        for name in names:
            matches = [name] if name in self.state else [k for k in self.state if k.endswith("." + name)]
            if len(matches) > 1:
                self.ambiguous.append(f"{name} ({', '.join(sorted(matches)[:2])}, ...)")
                return None
            if matches:
                value = np.asarray(self.state[matches[0]])
                if value.shape != shape:
                    self.misshaped.append(f"{matches[0]} {value.shape} vs {shape}")
                    return None
                return value.astype(np.float32)
        self.missing.append(names[0])
        return None

    def problems(self) -> list[str]:
        out = []
        for label, items in (("missing", self.missing), ("wrong shape", self.misshaped),
                             ("ambiguous", self.ambiguous)):
            if items:
                shown = ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")
                out.append(f"{len(items)} {label}: {shown}")
        return out


def _read(path: str) -> dict[str, np.ndarray]:
    state = files.read_state_dict(path)
    if not state:
        raise files.WeightsError(f"{path} holds no tensors")
    return state


def lpips_arrays(
    vgg_state: Mapping[str, np.ndarray] | None, lin_state: Mapping[str, np.ndarray], *, source: str
) -> dict[str, np.ndarray]:
    """The flat ``{"convs/0/kernel": HWIO array, ...}`` of :class:`LPIPS` from PyTorch state dicts.

    With ``vgg_state`` the VGG16 weights come from it (torchvision names); without, from
    ``lin_state`` (the whole-module ``net.sliceN.M`` names).
    """
    heads = _Lookup(lin_state)
    vgg = _Lookup(vgg_state if vgg_state is not None else lin_state)
    flat: dict[str, np.ndarray] = {}
    for i, ((index, block), (c_in, c_out)) in enumerate(zip(_torchvision_conv_indices(), _conv_shapes())):
        for suffix, shape in (("weight", (c_out, c_in, 3, 3)), ("bias", (c_out,))):
            names = (f"features.{index}.{suffix}", f"net.slice{block}.{index}.{suffix}")
            if vgg_state is None:
                names = names[::-1]
            value = vgg.take(names, shape)
            if value is not None and suffix == "weight":
                flat[f"convs/{i}/kernel"] = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
            elif value is not None:
                flat[f"convs/{i}/bias"] = value
    for i, channels in enumerate(TAP_CHANNELS):
        # ``model.0`` is the head's dropout; a module built with use_dropout=False has no dropout
        # layer, so its convolution is ``model.0``.
        value = heads.take((f"lin{i}.model.1.weight", f"lin{i}.model.0.weight"), (1, channels, 1, 1))
        if value is not None:
            flat[f"heads/{i}/kernel"] = value.transpose(2, 3, 1, 0)
    problems = vgg.problems() + heads.problems()
    if problems:
        raise files.WeightsError(f"{source} is not an LPIPS VGG16 checkpoint: " + "; ".join(problems))
    return flat


def convert_lpips(vgg_path: str | None, lin_path: str, out_path: str) -> None:
    """Writes the ``kind="lpips"`` weights file ``out_path``.

    ``vgg_path``: torchvision's ``vgg16-397923af.pth``, or ``None`` when ``lin_path`` is a whole
    ``lpips.LPIPS(net="vgg")`` state dict that already holds the VGG16 weights.
    ``lin_path``: the LPIPS heads (``lpips/weights/v0.1/vgg.pth``) or that whole state dict.
    """
    vgg_state = _read(vgg_path) if vgg_path is not None else None
    lin_state = _read(lin_path)
    sources = [p for p in (vgg_path, lin_path) if p is not None]
    flat = lpips_arrays(vgg_state, lin_state, source=" + ".join(sources))
    files.save_weights(
        out_path,
        flat,
        kind=KIND,
        source=[os.path.basename(p) for p in sources],
        network="vgg16",
        version="0.1",
    )


def load_lpips(path: str, *, dtype: jnp.dtype = jnp.float32) -> LPIPS:
    """An :class:`LPIPS` holding the converted weights in ``path`` (a ``kind="lpips"`` file)."""
    flat, _ = files.load_weights(path, kind=KIND)
    # Shapes only, then zeros: random initialisation of 15M weights about to be replaced is slow.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0), dtype=dtype)))
    model = nnx.merge(graphdef, jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), state))
    files.load_into(model, flat, source=path)
    return model
