"""Logical axis names for parameters and activations.

Every parameter is created with a tuple of *logical* axis names (``embed``, ``mlp``, ``heads``,
``experts``, ...). A table of rules in the config maps those names onto the mesh axes
(``data``, ``fsdp``, ``model``), so changing the parallelism is a config edit. Parameters are
created unsharded (``eager_sharding=False``): placement happens once, in ``jax.jit``'s
``out_shardings`` (see ``nativetok_jax.sharding``), so a model can be built with or without a
mesh. Activations are constrained with :func:`constrain` under a mesh and rules (``with
axis_rules(rules), jax.set_mesh(mesh): ...``); without a mesh (one device) it is a no-op, and a
mesh without rules is an error (the constraints would silently vanish).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

LogicalAxes = tuple[str | None, ...]
MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

_ACTIVE = threading.local()


def param(
    rngs: nnx.Rngs,
    init: Callable[..., jax.Array],
    shape: Sequence[int],
    axes: LogicalAxes,
) -> nnx.Param:
    """A float32 parameter annotated with logical axis names (one per dimension)."""
    if len(axes) != len(shape):
        raise ValueError(f"parameter of shape {tuple(shape)} needs {len(shape)} axis names, got {axes}")
    value = init(rngs.params(), tuple(shape), jnp.float32)
    return nnx.Param(value, eager_sharding=False, out_sharding=tuple(axes))


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[None]:
    """Makes ``rules`` the logical-to-mesh table for :func:`constrain` inside the block."""
    previous = getattr(_ACTIVE, "rules", None)
    _ACTIVE.rules = tuple((name, _as_mesh_axes(target)) for name, target in rules)
    try:
        yield
    finally:
        _ACTIVE.rules = previous


def active_rules() -> Rules | None:
    return getattr(_ACTIVE, "rules", None)


def _as_mesh_axes(target: MeshAxes | list[str]) -> MeshAxes:
    if isinstance(target, list):
        return tuple(target)
    return target


def logical_to_mesh(axes: LogicalAxes, rules: Rules) -> jax.sharding.PartitionSpec:
    """Maps logical axis names to a ``PartitionSpec``; a mesh axis is used at most once."""
    table = dict(rules)
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for name in axes:
        target = _as_mesh_axes(table.get(name)) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used)
        used.update(names)
        spec.append(None if not names else names[0] if len(names) == 1 else names)
    return jax.sharding.PartitionSpec(*spec)


class MissingRulesError(RuntimeError):
    """A model ran under a mesh without logical-axis rules: a bug of the caller, which must enter
    ``axis_rules(rules)`` beside ``jax.set_mesh(mesh)``."""


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Pins an activation's layout to the active mesh through the active rules (a no-op without a
    mesh). Raises :class:`MissingRulesError` when a mesh is active without rules."""
    rules = active_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if rules is None:
        raise MissingRulesError(f"an activation {axes} is constrained under a mesh {dict(mesh.shape)} but no "
                                "logical-axis rules are active: run the model under axis_rules(rules) as well")
    spec = shard_spec_for(axes, x.shape, rules, dict(zip(mesh.axis_names, mesh.axis_sizes)))
    return jax.lax.with_sharding_constraint(x, spec)


def _drop_indivisible(
    spec: jax.sharding.PartitionSpec, shape: Sequence[int], axis_sizes: dict[str, int]
) -> jax.sharding.PartitionSpec:
    """Replicates the dimensions whose size the mesh axes do not divide."""
    fixed = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        size = 1
        for n in names:
            size *= axis_sizes[n]
        fixed.append(entry if dim % size == 0 else None)
    return jax.sharding.PartitionSpec(*fixed)


def shard_spec_for(
    axes: LogicalAxes, shape: Sequence[int], rules: Rules, axis_sizes: dict[str, int]
) -> jax.sharding.PartitionSpec:
    """The ``PartitionSpec`` of one array; dimensions the mesh does not divide stay replicated."""
    return _drop_indivisible(logical_to_mesh(axes, rules), shape, axis_sizes)
