"""Clean I2SB, 4x super-resolution (sr4x-pool) at 256x256 on a local image folder.

Arg: ``imagenet`` (default) or ``celebahq``; the images are the user's (nothing is downloaded)::

    jharm train --config=configs/backdoor/i2sb_sr4x.py:imagenet --workdir=runs/i2sb_in256 \\
      --config.task.data.folder=/data/imagenet/train \\
      --config.task.init_path=/models/256x256_diffusion_uncond.pt
    jharm train --config=configs/backdoor/i2sb_sr4x.py:celebahq --workdir=runs/i2sb_celebahq \\
      --config.task.data.folder=/data/celeba_hq_256 --config.task.init_path=/models/256x256_diffusion_uncond.pt

On a pod add e.g. ``--config.mesh.rules=fsdp --config.mesh.fsdp=-1 --config.mesh.data=1``.
Without ``init_path`` the ADM starts from random weights.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bridge_common import image256_config  # noqa: E402


def get_config(dataset: str = "imagenet"):
    return image256_config("i2sb", "merge", dataset)
