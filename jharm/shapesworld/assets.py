"""The shipped ShapesWorld models: write and load an asset folder, verified.

An asset folder (``jharm/shapesworld/assets/`` ships one) holds
``manifest.json`` and the files it lists with their sha256:

* ``judge.safetensors``, ``clip.safetensors``, ``t2i.safetensors``: Flax params,
  ``a/b/c`` keys;
* ``ip_adapter.safetensors``: the IP-Adapter in the official SD 1.5 layout;
* ``tokenizer/``: the tiny CLIP's vocab.json + merges.txt (an HF folder).

The manifest also records, per model, the task config it was trained with (so
the modules are rebuilt from it), the train settings, the seed and the
measured metrics. Loading checks the asset format version and every file's
sha256 first: a missing, altered or other-version file is an ``AssetError``
naming it; nothing ever falls back to random weights.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

from jharm.weights.io import atomic_write_json, load_safetensors, save_safetensors

ASSET_VERSION = 1  # bump when the models or the file layout change
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TOKENIZER_FILES = ("tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
                   "tokenizer/tokenizer_config.json")


class AssetError(RuntimeError):
    """A ShapesWorld asset is missing, altered (sha256), or from another asset version."""


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dir(folder: str | None) -> str:
    return DEFAULT_DIR if not folder else folder


def read_manifest(folder: str | None = None) -> dict:
    """The manifest of an asset folder, after checking its asset version."""
    path = os.path.join(_dir(folder), "manifest.json")
    if not os.path.isfile(path):
        raise AssetError(f"{path}: ShapesWorld asset manifest not found (run `jharm shapesworld build`)")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    found = manifest.get("asset_version")
    if found != ASSET_VERSION:
        raise AssetError(f"{path}: asset version {found!r} (written by jharm {manifest.get('jharm_version')}), "
                         f"this jharm reads version {ASSET_VERSION}; rebuild with `jharm shapesworld build`")
    return manifest


def verified_path(folder: str | None, name: str, manifest: dict | None = None) -> str:
    """The path of a manifest-listed file after checking that it exists and its sha256."""
    folder = _dir(folder)
    manifest = read_manifest(folder) if manifest is None else manifest
    path = os.path.join(folder, name)
    expected = manifest.get("files", {}).get(name)
    if expected is None:
        raise AssetError(f"{path}: not listed in {os.path.join(folder, 'manifest.json')}")
    if not os.path.isfile(path):
        raise AssetError(f"{path}: ShapesWorld asset file is missing")
    found = sha256(path)
    if found != expected:
        raise AssetError(f"{path}: sha256 {found} does not match the manifest's {expected} (altered file)")
    return path


def model_entry(folder: str | None, model: str) -> tuple[dict, dict]:
    """(manifest, its ``models[model]`` entry); an error if the model is not in the folder."""
    manifest = read_manifest(folder)
    if model not in manifest.get("models", {}):
        raise AssetError(f"{os.path.join(_dir(folder), 'manifest.json')}: no {model!r} model "
                         f"(found {sorted(manifest.get('models', {}))})")
    return manifest, manifest["models"][model]


def task_config(entry: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(entry["task"])


def load_params(folder: str | None, name: str, manifest: dict | None = None) -> dict:
    """Nested numpy params of a verified flat (``a/b/c`` keys) safetensors file."""
    flat = load_safetensors(verified_path(folder, name, manifest))
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


# --- writing (the build) ---------------------------------------------------------


def save_params(folder: str, name: str, params) -> None:
    flat = traverse_util.flatten_dict(params, sep="/")
    save_safetensors({k: np.asarray(v, np.float32) for k, v in flat.items()}, os.path.join(folder, name))


def record(folder: str, model: str, files: list[str], entry: dict, **top: Any) -> dict:
    """Add (or replace) a model's entry and its files' sha256 in the folder's manifest."""
    import jharm

    path = os.path.join(folder, "manifest.json")
    manifest = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    manifest.update(asset_version=ASSET_VERSION, jharm_version=jharm.__version__, **top)
    manifest.setdefault("files", {}).update({n: sha256(os.path.join(folder, n)) for n in files})
    manifest.setdefault("models", {})[model] = entry
    atomic_write_json(path, manifest)
    return manifest


def set_metrics(folder: str, model: str, metrics: dict) -> None:
    """Store measured metrics under ``models[model].metrics`` (the report's numbers)."""
    path = os.path.join(folder, "manifest.json")
    manifest = read_manifest(folder)
    manifest["models"][model]["metrics"] = metrics
    atomic_write_json(path, manifest)


# --- loading ---------------------------------------------------------------------


@dataclasses.dataclass
class JudgeAsset:
    config: ml_collections.ConfigDict  # the judge's task config (channels, features, world)
    params: dict


@dataclasses.dataclass
class ClipAsset:
    text_config: Any
    vision_config: Any
    text_params: dict
    vision_params: dict
    logit_scale: float
    tokenizer: Any
    config: ml_collections.ConfigDict


@dataclasses.dataclass
class T2IAsset:
    unet_config: Any
    unet_params: dict
    schedule: Any
    guidance_scale: float
    config: ml_collections.ConfigDict
    guidance_interval: tuple[float, float] | None = None  # CFG only for t_lo <= t < t_hi; None: every step


def load_judge(folder: str | None = None) -> JudgeAsset:
    manifest, entry = model_entry(folder, "judge")
    return JudgeAsset(task_config(entry), load_params(folder, entry["file"], manifest))


def load_tokenizer(folder: str | None = None):
    from jharm.tokenizer import CLIPTokenizer

    manifest = read_manifest(folder)
    for name in TOKENIZER_FILES:
        verified_path(folder, name, manifest)
    return CLIPTokenizer.from_pretrained(os.path.join(_dir(folder), "tokenizer"))


def load_clip(folder: str | None = None) -> ClipAsset:
    from jharm.shapesworld.tasks import clip_configs

    manifest, entry = model_entry(folder, "clip")
    tok = load_tokenizer(folder)
    tc = task_config(entry)
    text_cfg, vision_cfg = clip_configs(tc, tok)
    params = load_params(folder, entry["file"], manifest)
    return ClipAsset(text_cfg, vision_cfg, params["text"], params["vision"], float(params["logit_scale"]), tok, tc)


def load_t2i(folder: str | None = None) -> T2IAsset:
    from jharm.shapesworld.tasks import schedule_of, unet_config

    manifest, entry = model_entry(folder, "t2i")
    tc = task_config(entry)
    return T2IAsset(unet_config(tc, int(entry["cross_attention_dim"])), load_params(folder, entry["file"], manifest),
                    schedule_of(tc), float(entry["guidance_scale"]), tc, _manifest_interval(folder, entry))


def _manifest_interval(folder: str | None, entry: dict) -> tuple[float, float] | None:
    # A manifest without the key (written before the interval was configurable) means CFG at every step.
    where = f"{os.path.join(_dir(folder), 'manifest.json')}: models.t2i.guidance_interval"
    try:
        return interval_of(entry.get("guidance_interval"), where)
    except ValueError as err:
        raise AssetError(str(err)) from None


def interval_of(value, where: str = "guidance_interval") -> tuple[float, float] | None:
    """``(t_lo, t_hi)`` as floats from a config or manifest value (None stays None: CFG at every step)."""
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected [t_lo, t_hi] or null, found {value!r}") from None
    if not lo < hi:
        raise ValueError(f"{where}: expected t_lo < t_hi, found {value!r}")
    return lo, hi


def load_ip_adapter(folder: str | None = None):
    """(IPAdapter, T2IAsset): the adapter and the UNet it was trained on."""
    from jharm.models.ip_adapter import IPAdapter

    manifest, entry = model_entry(folder, "ip_adapter")
    t2i = load_t2i(folder)
    return IPAdapter.load(verified_path(folder, entry["file"], manifest), t2i.unet_config), t2i
