"""``jharm convert``: a local model folder -> a Flax params checkpoint.

Format (documented choice): a folder with ``params.safetensors`` whose keys are
Flax param paths joined by ``/`` (``text_model/encoder/layers_0/...``), the
same file the train loop writes at the end of a run, plus ``jharm.json`` with
the kind, the source folder and the model config. safetensors rather than
msgpack/orbax: it is mmap-able, safe to load, and readable by any framework.
Read it back with :func:`jharm.weights.diffusers.read_flax_params`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

import jax
import numpy as np
from flax import traverse_util

from jharm.weights.convert import count_params
from jharm.weights.io import atomic_write_json, read_json, save_safetensors


def _clip_text(src):
    from jharm.weights.clip import load_clip_text_model

    _, params, _ = load_clip_text_model(src)
    return params


def _clip_vision(src):
    from jharm.weights.clip import load_clip_vision_model

    _, params, _ = load_clip_vision_model(src)
    return params


def _clip(src):
    from jharm.weights.clip import load_clip_model

    _, text, _, vision, scale = load_clip_model(src)
    return {"text": text, "vision": vision, "logit_scale": scale}


def _unet(src):
    from jharm.weights.diffusers import load_unet

    return load_unet(src)[1]["params"]


def _vae(src):
    from jharm.weights.diffusers import load_vae

    return load_vae(src)[1]["params"]


def _pipeline(src):
    from jharm.pipeline import pipeline_params

    return pipeline_params(src)


CONVERTERS: dict[str, Callable[[str], dict]] = {
    "clip_text": _clip_text,
    "clip_vision": _clip_vision,
    "clip": _clip,
    "unet": _unet,
    "vae": _vae,
    "pipeline": _pipeline,
}


def convert_folder(kind: str, src: str, out_dir: str) -> tuple[str, int]:
    """Convert ``src`` (a local transformers/diffusers folder) of ``kind`` into
    ``out_dir``; returns (folder, param count). Written atomically."""
    if kind not in CONVERTERS:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(CONVERTERS)}")
    params = CONVERTERS[kind](src)
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(params), sep="/").items()}
    config_path = os.path.join(src, "config.json")
    manifest = {"kind": kind, "source": os.path.abspath(src), "num_params": count_params(params),
                "config": read_json(config_path) if os.path.isfile(config_path) else None}
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".convert-")
    try:
        save_safetensors(flat, os.path.join(staging, "params.safetensors"), metadata={"jharm_kind": kind})
        atomic_write_json(os.path.join(staging, "jharm.json"), manifest)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir, manifest["num_params"]
