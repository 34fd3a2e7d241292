"""The device mesh over ("data", "fsdp", "tensor") and batch placement.

Axis types are given explicitly as ``AxisType.Auto``: jharm's models are plain
linen modules without sharding annotations, and under ``AxisType.Explicit``
every op whose output sharding is ambiguous (a conv with a channel-sharded
kernel, for one) must name an ``out_sharding``, which those modules cannot do.
With Auto axes, ``jax.jit`` in/out ``NamedSharding``s pin the state and the
batch, and XLA's partitioner chooses the layouts in between.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jharm.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
# Batch rows are split over both data-parallel axes: FSDP is data parallel too.
BATCH_AXES = ("data", "fsdp")


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolve ``{"data": d, "fsdp": f, "tensor": t}`` (one may be -1 = "the rest")."""
    dims = [int(sizes[name]) for name in MESH_AXES]
    free = [i for i, d in enumerate(dims) if d == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, found {dict(zip(MESH_AXES, dims))}")
    if any(d == 0 or d < -1 for d in dims):
        raise ConfigError(f"mesh: axis sizes must be positive or -1, found {dict(zip(MESH_AXES, dims))}")
    known = math.prod(d for d in dims if d != -1)
    if free:
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices are not divisible by the fixed axes "
                              f"{dict(zip(MESH_AXES, dims))}")
        dims[free[0]] = num_devices // known
    if math.prod(dims) != num_devices:
        raise ConfigError(f"mesh: {dict(zip(MESH_AXES, dims))} needs {math.prod(dims)} devices, "
                          f"found {num_devices}")
    return tuple(dims)


def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
    """Build the ("data", "fsdp", "tensor") mesh over ``devices`` (default: all, all hosts)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows over ("data", "fsdp"), every other dim replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh) -> int:
    """How many ways the batch dim is split."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a *global* host batch on the mesh, rows over ("data", "fsdp").

    Every process holds the same global batch (``Task.make_batch`` is a pure
    function of the step), so each one just hands over the slices its own
    devices own; this works unchanged on one host and on a pod.
    """
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ConfigError(f"batch[{name!r}] is a scalar; batches need a leading batch dim")
        if value.shape[0] % batch_divisor(mesh):
            raise ConfigError(f"batch[{name!r}] has {value.shape[0]} rows, not divisible by the "
                              f"data x fsdp mesh size {batch_divisor(mesh)}")
        out[name] = jax.make_array_from_callback(value.shape, batch_sharding(mesh, value.ndim),
                                                 lambda index, v=value: v[index])
    return out
