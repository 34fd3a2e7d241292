"""Reading and writing weight files safely.

safetensors first; a PyTorch ``.bin``/``.pt``/``.pth`` only through
``torch.load(weights_only=True)`` (which refuses pickles with code payloads);
nothing else is ever unpickled. Writes are atomic (temp file + rename) so a
crash never leaves a half-written file that looks complete.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Mapping

import numpy as np


class WeightsError(ValueError):
    """A weight file or its contents are wrong; the message names the file and key."""


SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _to_numpy_tensor(tensor) -> np.ndarray:
    # bfloat16 has no numpy dtype in torch's .numpy(); go through float32.
    import torch

    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


def load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(path))
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from None
    except Exception as err:  # safetensors raises bare exceptions for some bf16 files
        if "bfloat16" in str(err) or "bf16" in str(err).lower():
            return _load_safetensors_via_torch(path)
        raise WeightsError(f"{path}: not a readable safetensors file: {err}") from None


def _load_safetensors_via_torch(path: str) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: _to_numpy_tensor(v) for k, v in load_file(path).items()}


def load_torch_pickle(path: str) -> dict[str, np.ndarray]:
    """Load a PyTorch checkpoint with ``weights_only=True``; refuse anything else."""
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{path}: reading a PyTorch pickle needs torch installed (or convert it to safetensors)") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for code payloads, RuntimeError for corrupt zips
        raise WeightsError(
            f"{path}: refused or unreadable PyTorch file (only plain tensors are loaded, "
            f"weights_only=True): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    return _flatten_torch_object(obj, path)


def _flatten_torch_object(obj, path: str, prefix: str = "") -> dict[str, np.ndarray]:
    import torch

    out: dict[str, np.ndarray] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = _to_numpy_tensor(obj)
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            out.update(_flatten_torch_object(value, path, f"{prefix}{key}."))
    elif isinstance(obj, (list, tuple)):  # e.g. an EMA's shadow_params: keys "<prefix><i>"
        for index, value in enumerate(obj):
            out.update(_flatten_torch_object(value, path, f"{prefix}{index}."))
    elif isinstance(obj, (int, float, str, type(None))):
        pass  # metadata such as "epoch"; not weights
    else:
        raise WeightsError(f"{path}: unexpected object of type {type(obj).__name__} at key {prefix.rstrip('.')!r}")
    return out


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Load one weight file (or a sharded ``*.index.json``) into ``{key: ndarray}``."""
    if not os.path.exists(path):
        raise WeightsError(f"weight file not found: {path}")
    if path.endswith(".index.json"):
        return _load_sharded(path)
    if path.endswith(SAFE_SUFFIXES):
        return load_safetensors(path)
    if path.endswith(PICKLE_SUFFIXES):
        return load_torch_pickle(path)
    raise WeightsError(f"{path}: unknown weight format (expected .safetensors, or .bin/.pt/.pth/.ckpt)")


def _load_sharded(index_path: str) -> dict[str, np.ndarray]:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as err:
        raise WeightsError(f"{index_path}: not a valid sharded-checkpoint index: {err}") from None
    folder = os.path.dirname(index_path)
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        out.update(load_state_dict(os.path.join(folder, shard)))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise WeightsError(f"{index_path}: keys listed in the index but absent from the shards: {missing[:10]}")
    return out


def find_weights_file(folder: str, stems: tuple[str, ...]) -> str:
    """Return the weight file in ``folder`` for one of ``stems``, safetensors first.

    ``stems`` are base names such as ``("model", "pytorch_model")``.
    """
    if not os.path.isdir(folder):
        raise WeightsError(f"model folder not found: {folder}")
    candidates = []
    for suffix in (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json"):
        for stem in stems:
            candidates.append(os.path.join(folder, stem + suffix))
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise WeightsError(
        f"{folder}: no weight file found; looked for {', '.join(os.path.basename(c) for c in candidates)}"
    )


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise WeightsError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as err:
        raise WeightsError(f"{path}: not valid JSON: {err}") from None


def atomic_write_bytes(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str, metadata: dict | None = None) -> None:
    """Write ``state_dict`` to ``path`` atomically (contiguous float arrays)."""
    from safetensors.numpy import save

    # order="C", not ascontiguousarray: the latter turns 0-d scalars (logit_scale) into shape (1,).
    arrays = {k: np.asarray(v, order="C") for k, v in state_dict.items()}
    atomic_write_bytes(path, save(arrays, metadata=metadata))


def write_model_folder(out_dir: str, config: dict, state_dict: Mapping[str, np.ndarray], weights_name: str,
                       metadata: dict | None = None) -> str:
    """Write ``config.json`` + ``weights_name`` (safetensors) as a model folder, atomically.

    Built in a temporary sibling folder and renamed into place; an existing
    folder is moved aside first and deleted after, so a crash leaves either the
    old folder or the complete new one, never a partial model.
    """
    import shutil

    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.tmp-")
    try:
        atomic_write_json(os.path.join(tmp, "config.json"), config)
        save_safetensors(state_dict, os.path.join(tmp, weights_name), metadata=metadata)
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.old-")
            os.rename(out_dir, os.path.join(old, "previous"))
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
