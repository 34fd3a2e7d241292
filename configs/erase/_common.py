"""Shared pieces of the erasure configs (not a config file itself)."""
from jharm.train.defaults import base_config
from jharm.train.tasks.erasure import default_task_config

# Local folder defaults; override with --config.task.model_path=... (nothing is downloaded).
MODELS = {"sd14": ("models/stable-diffusion-v1-4", 512), "sd15": ("models/stable-diffusion-v1-5", 512),
          "sd21": ("models/stable-diffusion-2-1", 768)}


def sd_config(method: str, param_set: str, model: str, steps: int = 1000):
    """ESD defaults (METHODS §1): Adam lr 1e-5, batch 1, eta 1, 50 DDIM steps, CFG 3."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {sorted(MODELS)}")
    path, resolution = MODELS[model]
    c = base_config()
    c.train.update(steps=steps, batch_size=1, log_every=10, ckpt_every=250, seed=0)
    c.optim.update(name="adam", lr=1e-5, clip_norm=0.0)
    c.task = default_task_config(method)
    c.task.update(source="sd", model_path=path, param_set=param_set, resolution=resolution)
    return c
