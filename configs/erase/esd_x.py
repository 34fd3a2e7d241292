"""ESD-x on a local SD folder: `jharm train --config=configs/erase/esd_x.py:sd15 --workdir=runs/esd_x
--config.task.concept=nudity --config.task.model_path=/path/to/sd15` (arg: sd14 | sd15 | sd21)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import sd_config  # noqa: E402


def get_config(model: str = "sd15"):
    return sd_config("esd", "esd-x", model)
