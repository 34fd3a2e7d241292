"""Train the ShapesWorld tiny CLIP (text + vision towers, contrastive on captioned renders).

``jharm train --config=configs/shapesworld_clip.py --workdir=runs/sw_clip``; run by
``jharm shapesworld build`` as its second stage.

Why 5000 steps: the tiny ViT learns colour within ~100 steps and then sits on
the colour-only plateau (loss ~log(64/6) = 2.4, shape at chance) until ~1500
steps; at 1000 steps zero-shot shape accuracy was 0.18.

Why the build world's shape sizes (outer radius 0.32-0.44 of the width) at 32x32: with the
default world's smaller shapes (0.22-0.36) the same recipe measured zero-shot shape 0.943 and
synonyms 0.836 (gates 0.95 / 0.90), star and cross confused most; with the larger shapes
0.994 / 0.911 (build seed 0, 1570 s on one core). They are also the shapes the CLIP reads in
the T2I's and IP-Adapter's world (16x16 renders resized to 32x32).
"""
from jharm.shapesworld.tasks import clip_task_config
from jharm.shapesworld.world import BUILD_WORLD
from jharm.train.defaults import base_config


def get_config():
    config = base_config()
    config.train.steps = 5000
    config.train.batch_size = 64
    config.train.log_every = 250
    config.train.ckpt_every = 1000
    config.optim.lr = 2e-3
    config.optim.warmup_steps = 50
    config.optim.schedule = "cosine"
    config.optim.final_lr_ratio = 0.05
    config.optim.weight_decay = 1e-4
    config.task = clip_task_config()
    config.task.world.size_range = BUILD_WORLD["size_range"]  # at the CLIP's own 32x32
    return config
