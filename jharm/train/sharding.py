"""Logical axes for params and the rules that map them onto the mesh.

jharm's models are plain linen modules without sharding annotations, so the
logical axes of a leaf are derived in one place, :func:`logical_axes`, from its
path, leaf name and rank (diffusers/transformers names make that reliable):

====================================  =======================================
leaf                                  logical axes
====================================  =======================================
conv kernel (HWIO, rank 4)            (None, None, "conv_in", "conv_out")
attention q/k/v kernel                ("embed", "heads")
attention output kernel               ("heads", "embed")
MLP second layer (ff net_2, fc2)      ("mlp", "embed")
any other Dense kernel                ("embed", "mlp")
embedding table                       ("vocab", "embed")
bias, norm scale, rank <= 1           replicated
====================================  =======================================

A task may override the axes of some leaves (``Task.logical_axes``): MixBridge
gives its stacked experts a leading ``"experts"`` axis.

A rules table (MaxText style) maps logical names to mesh axes. Presets:
``dp`` replicates every param; ``fsdp`` shards each rank >= 2 param over
"fsdp" on its largest dim divisible by the axis size; ``fsdp_tp`` also puts
attention heads, MLP hidden and conv output channels on "tensor" (and a
leading ``experts`` axis, which comes first and so takes "tensor" from the
dims inside an expert); ``ep`` (expert parallel) puts only ``experts`` on
"tensor" and replicates the rest. A dim that
the mesh axis size does not divide is never sharded (it stays replicated).
The same function applies to optimizer state (its leaves sit under the
param's path), so Adam moments are sharded exactly like their params.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jharm.config import ConfigError

PyTree = Any
Axes = tuple[str | None, ...]
# (path components, shape) -> logical axes, or None to use the default rule.
LogicalAxesFn = Callable[[tuple[str, ...], tuple[int, ...]], Axes | None]

# Module names (diffusers / transformers / guided-diffusion) of attention projections.
_QKV = re.compile(r"^(to_q|to_k|to_v|q_proj|k_proj|v_proj|query|key|value|qkv|to_k_ip|to_v_ip|add_[qkv]_proj)$")
_ATTN_OUT = re.compile(r"^(to_out(_0)?|out_proj|proj_out|to_add_out)$")
_MLP_OUT = re.compile(r"^(net_2|fc2|wo|dense_4h_to_h)$")

PRESETS: dict[str, dict[str, str | None]] = {
    "dp": {},
    "fsdp": {},
    "fsdp_tp": {"heads": "tensor", "mlp": "tensor", "conv_out": "tensor", "vocab": "tensor", "experts": "tensor"},
    "ep": {"experts": "tensor"},
}
# Presets that additionally shard every rank >= 2 param over "fsdp".
_FSDP_PRESETS = ("fsdp", "fsdp_tp")


def path_names(path) -> tuple[str, ...]:
    """``jax.tree_util`` key path -> tuple of plain strings."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return tuple(names)


def logical_axes(names: Sequence[str], shape: Sequence[int]) -> Axes:
    """Logical axis names of one leaf from its path components and shape."""
    rank = len(shape)
    leaf = names[-1] if names else ""
    parent = names[-2] if len(names) > 1 else ""
    lead = (None,) * max(rank - 2, 0)  # stacked leading dims (scanned layers, experts)
    if rank <= 1:
        return (None,) * rank
    if leaf == "embedding":
        return lead + ("vocab", "embed")
    if leaf != "kernel":
        return (None,) * rank
    if rank == 4 or rank == 5:  # conv HWIO (or stacked conv)
        return (None,) * (rank - 2) + ("conv_in", "conv_out")
    if _QKV.match(parent):
        return lead + ("embed", "heads")
    if _ATTN_OUT.match(parent):
        return lead + ("heads", "embed")
    if _MLP_OUT.match(parent):
        return lead + ("mlp", "embed")
    return lead + ("embed", "mlp")


def partition_spec(axes: Axes, shape: Sequence[int], mesh: Mesh, preset: str) -> PartitionSpec:
    """Map logical axes to a PartitionSpec under ``preset``, never splitting a dim
    that the mesh axis size does not divide and never using a mesh axis twice."""
    check_presets(preset)
    rules = PRESETS[preset]
    spec: list[str | None] = [None] * len(shape)
    used = set()
    for dim, name in enumerate(axes):
        mesh_axis = rules.get(name) if name else None
        if mesh_axis and mesh_axis not in used and shape[dim] % mesh.shape[mesh_axis] == 0:
            spec[dim] = mesh_axis
            used.add(mesh_axis)
    if preset in _FSDP_PRESETS and len(shape) >= 2 and mesh.shape["fsdp"] > 1:
        free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % mesh.shape["fsdp"] == 0]
        if free:
            spec[max(free, key=lambda d: (shape[d], d))] = "fsdp"
    return PartitionSpec(*spec)


def tree_shardings(tree: PyTree, mesh: Mesh, preset: str,
                   axes_fn: LogicalAxesFn | None = None) -> PyTree:
    """A NamedSharding for every array leaf of ``tree`` (arrays or ShapeDtypeStructs).

    ``axes_fn`` (``Task.logical_axes``) may override :func:`logical_axes` for a
    leaf by returning axes instead of None.
    """
    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        names = path_names(path)
        axes = axes_fn(names, shape) if axes_fn else None
        if axes is None:
            axes = logical_axes(names, shape)
        if len(axes) != len(shape):
            raise ConfigError(f"logical axes {axes} for {'/'.join(names)} do not match its shape {shape}")
        return NamedSharding(mesh, partition_spec(axes, shape, mesh, preset))
    return jax.tree_util.tree_map_with_path(one, tree)


def describe(shardings: PyTree) -> dict[str, str]:
    """``{"a/b/kernel": "PartitionSpec(...)"}`` for logs and tests."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {"/".join(path_names(path)): str(s.spec) for path, s in flat}


def check_presets(preset: str) -> None:
    """Raise a ConfigError for an unknown rules preset (used by config validation)."""
    if preset not in PRESETS:
        raise ConfigError(f"mesh.rules: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")

