"""A local Stable Diffusion folder (diffusers layout) as one bundle of Flax modules + params.

``load_pipeline(path)`` reads ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/`` and ``scheduler/scheduler_config.json`` (optionally
``image_encoder/`` and an IP-Adapter file). Every ``*_params`` field is an
apply-ready variables dict: ``pipe.unet.apply(pipe.unet_params, x, t, ctx)``.
Nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from jharm.weights.io import WeightsError, read_json

REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclasses.dataclass
class Pipeline:
    """Modules, params and configs of an SD pipeline (see module docstring)."""

    path: str
    unet: Any
    unet_params: dict
    unet_config: Any
    vae: Any
    vae_params: dict
    vae_config: Any
    text_encoder: Any
    text_encoder_params: dict
    text_encoder_config: Any
    tokenizer: Any
    scheduler_config: dict
    image_encoder: Any = None
    image_encoder_params: dict | None = None
    image_encoder_config: Any = None
    ip_adapter: Any = None  # jharm.models.ip_adapter.IPAdapter, already merged into the UNet

    @property
    def vae_scaling_factor(self) -> float:
        return self.vae_config.scaling_factor


def _variables(params) -> dict:
    return params if isinstance(params, dict) and set(params) == {"params"} else {"params": params}


def load_pipeline(path: str, *, dtype: str = "float32", remat: bool = False, ip_adapter: str | None = None,
                  image_encoder: str | None = None) -> Pipeline:
    """Load a local diffusers SD folder into a :class:`Pipeline`.

    Args:
      path: folder with the sub-folders ``unet``, ``vae``, ``text_encoder``,
        ``tokenizer`` and ``scheduler`` (a missing one is named in the error).
      dtype: compute dtype of the UNet, VAE and encoders (params stay float32).
      remat: rematerialise UNet blocks in the backward pass (training memory).
      ip_adapter: optional IP-Adapter file (official SD 1.5 layout), merged into
        the UNet (``unet_config.ip_adapter_tokens`` > 0 afterwards).
      image_encoder: CLIP vision folder; defaults to ``path/image_encoder`` if present.
    """
    from jharm.models.unet import UNet2DConditionModel
    from jharm.tokenizer import CLIPTokenizer
    from jharm.weights.clip import load_clip_text_model, load_clip_vision_model
    from jharm.weights.diffusers import load_unet, load_vae

    if not os.path.isdir(path):
        raise WeightsError(f"pipeline folder not found: {path}")
    missing = [name + "/" for name in REQUIRED if not os.path.isdir(os.path.join(path, name))]
    if missing:
        raise WeightsError(f"{path}: not a diffusers SD pipeline folder; missing sub-folders: {', '.join(missing)}")
    unet, unet_params, unet_config = load_unet(os.path.join(path, "unet"), dtype=dtype, remat=remat)
    vae, vae_params, vae_config = load_vae(os.path.join(path, "vae"), dtype=dtype)
    text_encoder, text_params, text_config = load_clip_text_model(os.path.join(path, "text_encoder"), dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    scheduler_config = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    pipe = Pipeline(path, unet, unet_params, unet_config, vae, vae_params, vae_config, text_encoder,
                    _variables(text_params), text_config, tokenizer, scheduler_config)
    if image_encoder is None and os.path.isdir(os.path.join(path, "image_encoder")):
        image_encoder = os.path.join(path, "image_encoder")
    if image_encoder is not None:
        module, params, config = load_clip_vision_model(image_encoder, dtype=dtype)
        pipe.image_encoder, pipe.image_encoder_params, pipe.image_encoder_config = module, _variables(params), config
    if ip_adapter is not None:
        from jharm.models.ip_adapter import load_ip_adapter

        pipe.ip_adapter = load_ip_adapter(ip_adapter, unet_config)
        pipe.unet_config, pipe.unet_params = pipe.ip_adapter.merge(unet_config, unet_params)
        pipe.unet = UNet2DConditionModel(pipe.unet_config)
    return pipe


def pipeline_params(path: str) -> dict:
    """``{"unet", "vae", "text_encoder"[, "image_encoder"]}`` bare param trees of a
    local SD folder (the ``pipeline`` kind of ``jharm convert``)."""
    pipe = load_pipeline(path)
    out = {"unet": pipe.unet_params["params"], "vae": pipe.vae_params["params"],
           "text_encoder": pipe.text_encoder_params["params"]}
    if pipe.image_encoder_params is not None:
        out["image_encoder"] = pipe.image_encoder_params["params"]
    return out
