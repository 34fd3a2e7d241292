"""The one mechanism that maps PyTorch state dicts onto Flax param trees and back.

Every model converter is ``torch_to_flax(state_dict, template, key_fn)`` with a
model-specific ``key_fn`` (Flax param path -> PyTorch key). Layout transforms
are decided by the Flax leaf name and rank, the same for every model:

* ``kernel`` rank 4: PyTorch conv OIHW -> Flax HWIO,
* ``kernel`` rank 3: PyTorch conv1d OIW -> Flax WIO,
* ``kernel`` rank 2: PyTorch linear (out, in) -> Flax (in, out),
* ``scale`` / ``embedding``: PyTorch ``weight``, unchanged,
* anything else (``bias``, raw params such as ``class_embedding``): unchanged.

All problems are collected and raised together: missing keys, unexpected keys
and every shape mismatch with the key, the expected and the found shape.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

from jharm.weights.io import WeightsError

ParamPath = tuple[str, ...]
KeyFn = Callable[[ParamPath], str]

_LEAF_RENAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def default_key_fn(list_names: Iterable[str] = ()) -> KeyFn:
    """Key function for modules named after their PyTorch attributes.

    Flax names ``<name>_<i>`` become ``<name>.<i>`` when ``<name>`` is a
    PyTorch ``ModuleList``/``Sequential`` (listed in ``list_names``), so that
    ``down_blocks_0/attentions_1/.../to_k/kernel`` maps to
    ``down_blocks.0.attentions.1....to_k.weight`` while ``linear_1`` (a plain
    attribute in diffusers) stays ``linear_1``.
    """
    names = frozenset(list_names)
    pattern = re.compile(r"(.+)_(\d+)")

    def key_fn(path: ParamPath) -> str:
        parts: list[str] = []
        for element in path[:-1]:
            match = pattern.fullmatch(element)
            if match and match.group(1) in names:
                parts.extend(match.groups())
            else:
                parts.append(element)
        parts.append(_LEAF_RENAMES.get(path[-1], path[-1]))
        return ".".join(parts)

    return key_fn


def torch_to_flax_leaf(path: ParamPath, value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 3:  # conv1d; OIW <-> WIO is its own inverse
        return np.ascontiguousarray(value.transpose(2, 1, 0))
    if path[-1] == "kernel" and value.ndim == 4:
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if path[-1] == "kernel" and value.ndim == 2:
        return np.ascontiguousarray(value.T)
    return value


def flax_to_torch_leaf(path: ParamPath, value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 3:  # conv1d; OIW <-> WIO is its own inverse
        return np.ascontiguousarray(value.transpose(2, 1, 0))
    if path[-1] == "kernel" and value.ndim == 4:
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    if path[-1] == "kernel" and value.ndim == 2:
        return np.ascontiguousarray(value.T)
    return value


def _shape_of(leaf) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", np.shape(leaf)))


def torch_to_flax(
    state_dict: dict[str, np.ndarray],
    template,
    key_fn: KeyFn,
    *,
    source: str,
    ignore_unexpected: Iterable[str] = (),
    consume: bool = True,
):
    """Build a Flax param tree shaped like ``template`` from ``state_dict``.

    Args:
      state_dict: ``{pytorch_key: array}``. With ``consume`` (default) entries
        are popped as they are converted, so that at most one extra copy of the
        weights is alive during conversion.
      template: a param tree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from
        ``jax.eval_shape(module.init, ...)``); fixes the expected names, shapes
        and dtypes.
      key_fn: Flax param path -> PyTorch key.
      source: the file or folder the weights came from (named in errors).
      ignore_unexpected: regexes of PyTorch keys that may be left over
        (buffers such as ``position_ids``).
    Returns:
      A nested dict of numpy arrays with the template's structure and dtypes.
    """
    flat_template = traverse_util.flatten_dict(_unfreeze(template))
    ignore = [re.compile(p) for p in ignore_unexpected]
    missing, mismatched = [], []
    out = {}
    used = set()
    for path, leaf in flat_template.items():
        key = key_fn(path)
        if key not in state_dict:
            missing.append(f"{key} (for {'/'.join(path)})")
            continue
        value = state_dict.pop(key) if consume else state_dict[key]
        used.add(key)
        value = torch_to_flax_leaf(path, np.asarray(value))
        expected = _shape_of(leaf)
        if tuple(value.shape) != expected:
            mismatched.append(f"{key}: expected {expected} (Flax {'/'.join(path)}), found {tuple(value.shape)}")
            continue
        out[path] = value.astype(getattr(leaf, "dtype", value.dtype), copy=False)
    remaining = [k for k in state_dict if k not in used]
    unexpected = sorted(k for k in remaining if not any(p.search(k) for p in ignore))
    if missing or mismatched or unexpected:
        lines = [f"{source}: weights do not match the model"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
        for line in mismatched[:20]:
            lines.append(f"  shape mismatch: {line}")
        raise WeightsError("\n".join(lines))
    return traverse_util.unflatten_dict(out)


def flax_to_torch(params, key_fn: KeyFn) -> dict[str, np.ndarray]:
    """Inverse of :func:`torch_to_flax`: ``{pytorch_key: array}`` (float32 numpy)."""
    flat = traverse_util.flatten_dict(_unfreeze(params))
    return {key_fn(path): flax_to_torch_leaf(path, np.asarray(value)) for path, value in flat.items()}


def _unfreeze(tree):
    if isinstance(tree, Mapping) and not isinstance(tree, dict):
        return {k: _unfreeze(v) for k, v in tree.items()}
    if isinstance(tree, dict):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree


def count_params(params) -> int:
    return int(sum(np.prod(_shape_of(x)) for x in traverse_util.flatten_dict(_unfreeze(params)).values()))
