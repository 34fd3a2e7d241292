"""Train the ShapesWorld tiny CLIP (text + vision towers, contrastive on captioned renders).

``jharm train --config=configs/shapesworld_clip.py --workdir=runs/sw_clip``; run by
``jharm shapesworld build`` as its second stage.

Why 5000 steps: the tiny ViT learns colour within ~100 steps and then sits on
the colour-only plateau (loss ~log(64/6) = 2.4, shape at chance) until ~1500
steps; at 1000 steps zero-shot shape accuracy was 0.18.

Why the build world's shape sizes (outer radius 0.32-0.44 of the width) at 32x32: with the
default world's smaller shapes (0.22-0.36) the same recipe measured zero-shot shape 0.943 and
colourless 8-way synonyms 0.836, star and cross confused most; with the larger shapes
0.994 / 0.911 (build seed 0, 1570 s on one core; docs/shapesworld.md). They are also the
shapes the CLIP reads in the T2I's and IP-Adapter's world (16x16 renders resized to 32x32).

Why patch 8 (a 4x4 grid of patches, 17 tokens) instead of 4 (65 tokens): the vision tower was
74 % of a step (0.109 of 0.148 s at batch 64); with patch 8 the stage runs 5000 steps in 344 s
instead of 741 s on 2 cores (2 host devices), and the gates hold: zero-shot shape / colour
0.988 / 1.000, synonyms 0.989 (patch 4: 0.994 / 1.000 / 0.995; build seed 0, 2026-12-07).
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
    config.task.vision.patch_size = 8
    return config
