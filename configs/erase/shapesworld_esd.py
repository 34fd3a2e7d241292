"""ESD-u erasing "star" from the shipped ShapesWorld T2I model (CPU-sized)::

    jharm train --config=configs/erase/shapesworld_esd.py --workdir=runs/sw_esd
"""
from jharm.erase_demo import erase_config


def get_config():
    return erase_config("esd")
