"""Train the ShapesWorld tiny text-to-image UNet (pixel space, frozen tiny CLIP text encoder).

Needs ``--config.task.clip_dir`` (an asset folder with the CLIP); run by
``jharm shapesworld build`` as its third stage. ``guidance_scale`` is the CFG
scale the report samples with (DDIM 50 steps).

v-prediction (``t2i_task_config``): the epsilon-trained model of the same size and
steps sampled colour blobs with shape at chance and text ignored (high-noise x0
error 1.1 vs the data's 0.45 variance). Measured on the shipped assets (v, 2000
steps, build seed 0): FD-judge 320 (epsilon: 688), colour+shape right on 7 % of
colour-shape prompts (1 %), shape accuracy 0.125 (chance): colour follows the
prompt and the neutral-prompt bias appears (circle: 88 % green / 9 % yellow vs
80 / 20 in the data) but shapes are not formed yet; the gates need many more steps
than 2 CPU cores give in the build budget. 2566 s for this stage and the
IP-Adapter on the shared 2-core machine.
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
