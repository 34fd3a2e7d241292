"""jharm.models: Flax modules with diffusers/transformers parameter names.

``from jharm.models import UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPVisionModel, IPAdapter``; submodules are imported on first use so that
importing one model does not pull in the others.
"""
import importlib

_EXPORTS = {
    "UNet2DConditionModel": "jharm.models.unet",
    "UNetConfig": "jharm.models.unet",
    "AutoencoderKL": "jharm.models.vae",
    "VAEConfig": "jharm.models.vae",
    "IPAdapter": "jharm.models.ip_adapter",
    "ImageProjModel": "jharm.models.ip_adapter",
    "CLIPTextModel": "jharm.models.clip",
    "CLIPVisionModel": "jharm.models.clip",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jharm.models' has no attribute {name!r}")
