"""LightFair on SD 2.1: ``configs/fair/sd21.py:gender|race|age|gender_race``.

1. ``jharm fair centroids --config configs/fair/sd21.py:gender --config.fair.model=SD21 --config.fair.clip=OPENCLIP_H14
   --config.fair.concepts_file=occupations.txt --out runs/fair/sd21_gender.safetensors``
2. ``jharm train --config configs/fair/sd21.py:gender --workdir runs/fair/sd21_gender
   --config.task.text_encoder=SD21/text_encoder --config.task.projection=OPENCLIP_H14
   --config.task.centroids=runs/fair/sd21_gender.safetensors --config.task.generator=$(realpath SD21)``
"""
from jharm.train.tasks.fairness import sd_config


def get_config(attribute: str = "gender"):
    return sd_config(768, attribute)
