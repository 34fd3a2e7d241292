"""Co-Erasing + ESD (stage 2) on a local SD folder (arg: sd14 | sd15 | sd21)::

    jharm train --config=configs/erase/co_erasing.py:sd15 --workdir=runs/co_erasing \
      --config.task.model_path=/path/to/sd15 --config.task.stage1_unet=runs/esd_u/unet \
      --config.task.ip_adapter=/path/to/ip-adapter_sd15.safetensors \
      --config.task.image_encoder=/path/to/image_encoder --config.task.concept_images=runs/nudity_images

Stage 1 (ESD-u) gives ``stage1_unet``: the student's start and the frozen teacher.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import sd_config  # noqa: E402


def get_config(model: str = "sd15"):
    c = sd_config("co_erasing", "full", model, steps=1000)
    c.task.blur_kernel = 3
    return c
