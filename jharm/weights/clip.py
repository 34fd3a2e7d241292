"""transformers CLIP checkpoints <-> jharm's Flax CLIP towers.

Accepts a local folder with ``config.json`` and ``model.safetensors`` (or a
safe ``pytorch_model.bin``) of a CLIPTextModel(WithProjection),
CLIPVisionModel(WithProjection) or a full CLIPModel (then the other tower's
keys are ignored), or a single weight file plus a config. Never downloads.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jharm.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from jharm.weights.convert import default_key_fn, flax_to_torch, torch_to_flax
from jharm.weights.io import WeightsError, find_weights_file, load_state_dict, read_json, write_model_folder

KEY_FN = default_key_fn({"layers"})
_WEIGHT_STEMS = ("model", "pytorch_model")


def _resolve(path: str, config: dict | None) -> tuple[str, dict]:
    if os.path.isdir(path):
        return find_weights_file(path, _WEIGHT_STEMS), config or read_json(os.path.join(path, "config.json"))
    if not os.path.isfile(path):
        raise WeightsError(f"CLIP checkpoint not found: {path}")
    if config is None:
        config_path = os.path.join(os.path.dirname(path), "config.json")
        config = read_json(config_path)
    return path, config


def _has(state_dict: dict, key: str) -> bool:
    return key in state_dict


_TOWER_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.", "pre_layrnorm.", "post_layernorm.")


def _with_tower_prefix(state_dict: dict, prefix: str) -> dict:
    """transformers >= 5 saves a bare CLIPTextModel/CLIPVisionModel without the
    ``text_model.``/``vision_model.`` prefix that SD checkpoints (and the
    WithProjection classes) carry; accept both."""
    if any(k.startswith(prefix) for k in state_dict):
        return state_dict
    return {(prefix + k if k.startswith(_TOWER_ROOTS) else k): v for k, v in state_dict.items()}


# Per tower: module, config, its key prefix, its projection key, and the other tower's keys to ignore.
_TOWERS = {
    "text": (CLIPTextModel, CLIPTextConfig, "text_model.", "text_projection.weight",
             (r"^vision_model\.", r"^visual_projection\.")),
    "vision": (CLIPVisionModel, CLIPVisionConfig, "vision_model.", "visual_projection.weight",
               (r"^text_model\.", r"^text_projection\.")),
}


def _load_tower(tower: str, path: str, config: dict | None, dtype: str):
    module_cls, config_cls, prefix, projection_key, other_tower = _TOWERS[tower]
    weights, raw_config = _resolve(path, config)
    state_dict = _with_tower_prefix(load_state_dict(weights), prefix)
    cfg = config_cls.from_hf(raw_config, with_projection=_has(state_dict, projection_key), dtype=dtype)
    module = module_cls(cfg)
    template = jax.eval_shape(module.init_params, jax.random.key(0))
    params = torch_to_flax(state_dict, template, KEY_FN, source=weights,
                           ignore_unexpected=(r"position_ids$", r"^logit_scale$") + other_tower)
    return module, jax.tree.map(jnp.asarray, params), cfg


def load_clip_text_model(path: str, *, config: dict | None = None, dtype: str = "float32"):
    """Load the text tower. Returns ``(module, params, CLIPTextConfig)``.

    The projection is included when the checkpoint has ``text_projection.weight``.
    """
    return _load_tower("text", path, config, dtype)


def load_clip_vision_model(path: str, *, config: dict | None = None, dtype: str = "float32"):
    """Load the vision tower. Returns ``(module, params, CLIPVisionConfig)``."""
    return _load_tower("vision", path, config, dtype)


def load_clip_model(path: str, *, dtype: str = "float32"):
    """Both towers and ``logit_scale`` of a CLIPModel folder.

    Returns ``(text_module, text_params, vision_module, vision_params, logit_scale)``.
    """
    text_module, text_params, _ = load_clip_text_model(path, dtype=dtype)
    vision_module, vision_params, _ = load_clip_vision_model(path, dtype=dtype)
    weights, _ = _resolve(path, None)
    state_dict = load_state_dict(weights)
    if "logit_scale" not in state_dict:
        raise WeightsError(f"{weights}: no logit_scale; not a CLIPModel checkpoint")
    return text_module, text_params, vision_module, vision_params, jnp.asarray(np.reshape(state_dict["logit_scale"], ()))


def _write_folder(out_dir: str, config: dict, state_dict: dict) -> str:
    return write_model_folder(out_dir, config, state_dict, "model.safetensors", metadata={"format": "pt"})


def _float32(params: Any) -> Any:
    return jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params))


def export_clip_text_model(config: CLIPTextConfig, params, out_dir: str) -> str:
    """A folder ``transformers.CLIPTextModel(WithProjection).from_pretrained`` loads."""
    arch = "CLIPTextModelWithProjection" if config.with_projection else "CLIPTextModel"
    return _write_folder(out_dir, dict(config.to_hf(), architectures=[arch]), flax_to_torch(_float32(params), KEY_FN))


def export_clip_vision_model(config: CLIPVisionConfig, params, out_dir: str) -> str:
    arch = "CLIPVisionModelWithProjection" if config.with_projection else "CLIPVisionModel"
    return _write_folder(out_dir, dict(config.to_hf(), architectures=[arch]), flax_to_torch(_float32(params), KEY_FN))


def export_clip_model(text_config: CLIPTextConfig, text_params, vision_config: CLIPVisionConfig, vision_params,
                      logit_scale, out_dir: str) -> str:
    """A full CLIPModel folder (both towers with projections + logit_scale)."""
    if not (text_config.with_projection and vision_config.with_projection):
        raise ValueError("a CLIPModel needs both projections (with_projection=True on both configs)")
    if text_config.projection_dim != vision_config.projection_dim:
        raise ValueError(f"projection dims differ: text {text_config.projection_dim}, vision {vision_config.projection_dim}")
    state = flax_to_torch(_float32(text_params), KEY_FN)
    state.update(flax_to_torch(_float32(vision_params), KEY_FN))
    state["logit_scale"] = np.asarray(logit_scale, np.float32).reshape(())
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": text_config.projection_dim,
              "text_config": text_config.to_hf(), "vision_config": vision_config.to_hf()}
    return _write_folder(out_dir, config, state)
