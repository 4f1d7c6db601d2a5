"""Sharding as data: the device mesh and the logical-axis rules that place every parameter.

Mesh axes are `('data', 'fsdp', 'tensor')`. The batch is split over `data` and `fsdp`;
parameters are split over `fsdp` (their `embed` dimension, ZeRO-3 style) and `tensor` (heads,
MLP and vocabulary dimensions, Megatron style). A rule that names a mesh axis the dimension is
not divisible by falls back to replication for that dimension (e.g. BERT's 30522-row vocabulary
on tensor=8) rather than failing; `param_partition_specs` reports such fallbacks.

Axis types are `Auto` on purpose: the encoder and losses are written on global arrays and let
the partitioner place collectives (big_vision/SigLIP style); `Explicit` axes (the `jax.make_mesh`
default since jax 0.7) would make every op's output sharding part of its type, which this code
does not need and which constrains the compiler on the tensor axis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or a tuple of mesh axes, or None for replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
)


def make_mesh(axes: Mapping[str, int] | Sequence[tuple[str, int]], devices=None) -> Mesh:
    """A mesh over `devices` (default: all) from {'data': -1, 'fsdp': 1, 'tensor': 1}.

    One axis may be -1 ("the rest of the devices"). Axes left out have size 1. The product must
    equal the device count; the error says which sizes were asked for.
    """
    axes = dict(axes)
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axis {sorted(unknown)}; the axes are {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(axes.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise ValueError(f"mesh: sizes {dict(zip(MESH_AXES, sizes))} do not fit {len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh: sizes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} devices but {len(devices)} are present"
        )
    try:
        return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    except (ValueError, NotImplementedError):
        # jax.make_mesh only knows physical topologies of real accelerators; fall back to a plain
        # reshape (the order jax.devices() gives) for device sets it cannot lay out.
        return Mesh(np.array(devices).reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules=DEFAULT_RULES,
) -> P:
    """PartitionSpec for one array; a dimension not divisible by its mesh axes is replicated."""
    table = dict(rules)
    spec, used = [], set()
    for name, dim in zip(logical_axes, shape):
        target = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"no sharding rule for logical axis {name!r}; rules cover {sorted(table)}")
        mesh_axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        # Size-1 axes and axes already used by another dimension contribute nothing.
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1 and a not in used)
        if mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            used.update(mesh_axes)
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            spec.append(None)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def param_partition_specs(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """A pytree like `state` (an nnx.State of Params) holding each parameter's PartitionSpec."""

    def spec(v):
        axes = getattr(v, "logical_axes", None) or (None,) * len(v.shape)
        return v.replace(logical_to_spec(axes, v.shape, mesh, rules))

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    specs = param_partition_specs(state, mesh, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_axes(rules=DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes the rows of a batch are split over: the `batch` rule.

    The one source of truth for the data layout (`batch_sharding`), the encoder's activation
    constraints and the loss's row-sharded logits (`row_axes`).
    """
    axes = dict(rules)["batch"]
    return (axes,) if isinstance(axes, str) else tuple(axes)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=DEFAULT_RULES) -> NamedSharding:
    """Rows over the batch axes, every other dimension replicated."""
    axes = tuple(a for a in batch_axes(rules) if mesh.shape[a] > 1)
    return NamedSharding(mesh, P(axes or None, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh, rules=DEFAULT_RULES) -> int:
    """How many ways the batch is split: the global batch must be a multiple of this."""
    return math.prod(mesh.shape[a] for a in batch_axes(rules))


def row_axes(rows: int, rules=DEFAULT_RULES) -> tuple[str, ...] | None:
    """Inside a trace: the set mesh's batch axes (size > 1) if `rows` splits over them, else None.

    For `with_sharding_constraint` on activations and logits ([rows, ...] kept row-sharded).
    None without a mesh (`jax.set_mesh`) or when the rows do not divide (a small eval batch).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    axes = tuple(a for a in batch_axes(rules) if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or rows % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes


def constrain_rows(x: jax.Array, rules=DEFAULT_RULES) -> jax.Array:
    """`x` [rows, ...] constrained to be row-sharded over the batch axes (no-op where `row_axes` is None)."""
    axes = row_axes(x.shape[0], rules)
    if axes is None:
        return x
    return jax.lax.with_sharding_constraint(x, P(axes, *([None] * (x.ndim - 1))))


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    """Places every parameter of `model` by the rules (in place) and returns the model."""
    state = nnx.state(model)
    shardings = param_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model
