"""Train the ShapesWorld tiny text-to-image UNet (pixel space, frozen tiny CLIP text encoder).

Needs ``--config.task.clip_dir`` (an asset folder with the CLIP); run by
``jharm shapesworld build`` as its third stage. ``guidance_scale`` is the CFG
scale the report samples with (DDIM 50 steps).
"""
from jharm.shapesworld.tasks import t2i_task_config
from jharm.train.defaults import base_config


def get_config():
    config = base_config()
    config.train.steps = 2000
    config.train.batch_size = 32
    config.train.log_every = 250
    config.train.ckpt_every = 500
    config.optim.lr = 2e-3
    config.optim.warmup_steps = 100
    config.optim.schedule = "cosine"
    config.optim.final_lr_ratio = 0.1
    config.task = t2i_task_config()
    return config
