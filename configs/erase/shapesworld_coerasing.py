"""Co-Erasing + ESD on ShapesWorld (stage 2 after configs/erase/shapesworld_esd.py)::

    jharm train --config=configs/erase/shapesworld_coerasing.py --workdir=runs/sw_co \
      --config.task.stage1_unet=runs/sw_esd/params.safetensors --config.task.concept_images=runs/star_images
"""
from jharm.erase_demo import erase_config


def get_config():
    return erase_config("co_erasing")
