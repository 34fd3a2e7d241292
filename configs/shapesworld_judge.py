"""Train the ShapesWorld judge (shape/colour/background classifier, FD-judge features).

``jharm train --config=configs/shapesworld_judge.py --workdir=runs/judge``; about
a minute or two on 2 CPU cores, >= 99 % shape and colour accuracy on fresh renders.
"""
from jharm.shapesworld.judge import judge_task_config
from jharm.train.defaults import base_config


def get_config():
    config = base_config()
    config.train.steps = 500
    config.train.batch_size = 64
    config.train.log_every = 50
    config.train.ckpt_every = 500
    config.optim.name = "adam"
    config.optim.lr = 3e-3
    config.optim.warmup_steps = 50
    config.optim.schedule = "cosine"
    config.optim.final_lr_ratio = 0.05
    config.task = judge_task_config()
    return config
