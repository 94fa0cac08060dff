"""One mesh (``data``, ``fsdp``, ``model``) from the config, and where every array lives on it.

Parameters carry logical axis names (``nativetok_jax.layers.partitioning``); the config's rules
map them onto this mesh. The mesh uses *auto* axis types: shardings are given at ``jit``
boundaries and as constraints, and XLA's partitioner does the rest.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx, traverse_util
from jax.experimental import multihost_utils

from nativetok_jax.config import validate_mesh, validate_rules
from nativetok_jax.layers.partitioning import Rules, axis_rules, shard_spec_for

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
Params = dict[str, Any]


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The ``(data, fsdp, model)`` mesh over ``devices`` (default: all of them)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = validate_mesh(mesh_config, len(devices))
    return jax.make_mesh(
        tuple(sizes[a] for a in MESH_AXES),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def rules_of(config: ml_collections.ConfigDict) -> Rules:
    """The logical-axis rules of ``config.sharding.rules``, checked against the mesh axes."""
    validate_rules(config.sharding.rules, MESH_AXES)
    return tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in config.sharding.rules)


def params_of(module: nnx.Module) -> Params:
    """A module's parameters as a plain nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def param_axes(model: nnx.Module) -> Params:
    """The logical axis names of every parameter, as a tree shaped like the parameters."""
    flat = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        flat[tuple(path)] = tuple(variable.get_metadata().get("out_sharding") or (None,) * variable.ndim)
    return traverse_util.unflatten_dict(flat)


def param_shardings(model: nnx.Module, mesh: jax.sharding.Mesh, rules: Rules) -> Params:
    """A ``NamedSharding`` per parameter; dimensions the mesh does not divide stay replicated."""
    axis_sizes = dict(mesh.shape)
    shapes = params_of(model)
    return jax.tree.map(
        lambda axes, shape: jax.sharding.NamedSharding(mesh, shard_spec_for(axes, shape.shape, rules, axis_sizes)),
        param_axes(model),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def restore_placement(axes: Params, mesh: jax.sharding.Mesh, rules: Rules):
    """:data:`nativetok_jax.checkpoints.Placement` for a model whose parameters carry the logical
    ``axes`` (:func:`param_axes`): a stored parameter of any shape (an earlier HNT stage's fewer
    experts, too) is sharded by its own axis names through ``rules``; one the model does not have is
    replicated (the caller's shape check then names it)."""
    table = {tuple(map(str, path)): names for path, names in
             traverse_util.flatten_dict(axes, is_leaf=lambda _, x: isinstance(x, tuple)).items()}
    axis_sizes = dict(mesh.shape)

    def place(path: tuple[str, ...], shape: tuple[int, ...]) -> jax.sharding.Sharding:
        names = table.get(path)
        if names is None or len(names) != len(shape):
            return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return jax.sharding.NamedSharding(mesh, shard_spec_for(names, shape, rules, axis_sizes))

    return place


def batch_sharding(mesh: jax.sharding.Mesh, shape: Sequence[int]) -> jax.sharding.NamedSharding:
    """Splits the leading (batch) dimension over ``data`` and ``fsdp`` when they divide it."""
    spec = shard_spec_for(("batch",) + (None,) * (len(shape) - 1), shape, (("batch", BATCH_AXES),), dict(mesh.shape))
    return jax.sharding.NamedSharding(mesh, spec)


def init_sharded(
    build: Callable[[nnx.Rngs], nnx.Module], seed: int, mesh: jax.sharding.Mesh, rules: Rules
) -> tuple[nnx.GraphDef, Params, Params]:
    """Initialises parameters directly into their shardings (no host copy of the full model).

    Returns ``(graphdef, params, shardings)`` with ``params`` a plain nested dict of arrays.
    """
    abstract = nnx.eval_shape(lambda: build(nnx.Rngs(seed)))
    graphdef, _ = nnx.split(abstract)
    shardings = param_shardings(abstract, mesh, rules)

    with axis_rules(rules):  # every activation constraint of the model in force, as in the step
        params = initialize(lambda: params_of(build(nnx.Rngs(seed))), shardings, mesh)
    return graphdef, params, shardings


_ABSTRACT = contextvars.ContextVar("abstract_initialization", default=False)


@contextlib.contextmanager
def abstract_initialization() -> Iterator[None]:
    """Within it, :func:`initialize` (so ``init_sharded``, ``build_state`` and every builder on
    them) only traces: arrays are ``ShapeDtypeStruct``\\ s with their shardings, on devices that
    need not run anything (an ahead-of-time compile for a TPU topology)."""
    token = _ABSTRACT.set(True)
    try:
        yield
    finally:
        _ABSTRACT.reset(token)


def initialize(fn: Callable[..., Any], shardings: Any, mesh: jax.sharding.Mesh, *args: Any,
               donate: bool = False) -> Any:
    """``jax.jit(fn, out_shardings=shardings)(*args)`` under ``mesh`` (``donate``: the arguments),
    or within :func:`abstract_initialization` the ``ShapeDtypeStruct``\\ s it would return."""
    jitted = jax.jit(fn, out_shardings=shardings, donate_argnums=tuple(range(len(args))) if donate else ())
    with jax.set_mesh(mesh):
        if not _ABSTRACT.get():
            return jitted(*args)
        shapes = jax.eval_shape(jitted, *args)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def summarize(problems: list[str], limit: int = 8) -> str:
    """The first ``limit`` problems, then how many more: one line for an error message."""
    return "; ".join(problems[:limit]) + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")


def mismatches(expected: Params, given: Params) -> list[str]:
    """Human-readable differences in names and shapes between two parameter trees."""
    # Keys joined as text: nnx.List indices are ints in a live model and strings in a checkpoint.
    flat_expected = {"/".join(map(str, k)): np.shape(v) for k, v in traverse_util.flatten_dict(expected).items()}
    flat_given = {"/".join(map(str, k)): np.shape(v) for k, v in traverse_util.flatten_dict(given).items()}
    problems = [f"missing {k}" for k in flat_expected if k not in flat_given]
    problems += [f"unexpected {k}" for k in flat_given if k not in flat_expected]
    problems += [
        f"{k} has shape {flat_given[k]}, expected {shape}"
        for k, shape in flat_expected.items()
        if k in flat_given and flat_given[k] != shape
    ]
    return problems



def place_params(params: Params, shapes: Params, shardings: Params, what: str) -> Params:
    """``params`` checked against ``shapes`` (names and shapes, else a one-line ``ValueError``
    naming ``what``) and placed in ``shardings``."""
    problems = mismatches(shapes, params)
    if problems:
        raise ValueError(f"parameters do not fit this {what}: {summarize(problems)}")
    return jax.device_put(jax.tree.map(jax.numpy.asarray, params), shardings)


def host_params(params: Params) -> Params:
    """Every parameter whole, as host numpy arrays (gathered from the other processes first when
    sharded across them: on several processes every one of them must call this together)."""
    if not all(x.is_fully_addressable for x in jax.tree.leaves(params)):
        params = multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def run_batched(fn: Callable[..., Any], mesh: jax.sharding.Mesh, rules: Rules, params: Params, *arrays: Any,
                **static: Any) -> Any:
    """``fn(params, *arrays, **static)`` with each array (``None`` passes through) split over the
    batch axes, under the mesh and the axis rules; on several hosts every host gets whole results."""
    placed = [None if a is None else jax.device_put(a, batch_sharding(mesh, np.shape(a))) for a in arrays]
    with jax.set_mesh(mesh), axis_rules(rules):
        result = fn(params, *placed, **static)
    return jax.tree.map(
        lambda r: r if r.is_fully_addressable else multihost_utils.process_allgather(r, tiled=True), result)
