"""Train the ShapesWorld tiny CLIP (text + vision towers, contrastive on captioned renders).

``jharm train --config=configs/shapesworld_clip.py --workdir=runs/sw_clip``; run by
``jharm shapesworld build`` as its second stage.
"""
from jharm.shapesworld.tasks import clip_task_config
from jharm.train.defaults import base_config


def get_config():
    config = base_config()
    config.train.steps = 1000
    config.train.batch_size = 64
    config.train.log_every = 50
    config.train.ckpt_every = 500
    config.optim.lr = 2e-3
    config.optim.warmup_steps = 50
    config.optim.schedule = "cosine"
    config.optim.final_lr_ratio = 0.05
    config.optim.weight_decay = 1e-4
    config.task = clip_task_config()
    return config
