"""LightFair on SD 1.5: ``configs/fair/sd15.py:gender|race|age|gender_race``.

1. ``jharm fair centroids --config configs/fair/sd15.py:gender --config.fair.model=SD15 --config.fair.clip=CLIP_L14
   --config.fair.concepts_file=occupations.txt --out runs/fair/sd15_gender.safetensors``
2. ``jharm train --config configs/fair/sd15.py:gender --workdir runs/fair/sd15_gender
   --config.task.text_encoder=SD15/text_encoder --config.task.projection=CLIP_L14
   --config.task.centroids=runs/fair/sd15_gender.safetensors --config.task.generator=$(realpath SD15)``
"""
from jharm.train.tasks.fairness import sd_config


def get_config(attribute: str = "gender"):
    return sd_config(512, attribute)
