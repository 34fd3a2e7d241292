"""Train the ShapesWorld judge (shape/colour/background classifier, FD-judge features).

``jharm train --config=configs/shapesworld_judge.py --workdir=runs/judge``; renders of the build
world (16x16, larger shapes), about half a minute on 2 CPU cores, >= 99 % shape and colour
accuracy on fresh renders (shipped: 1.000 / 1.000).
"""
from jharm.shapesworld.judge import judge_task_config
from jharm.shapesworld.world import BUILD_WORLD
from jharm.train.defaults import base_config


def get_config():
    config = base_config()
    config.train.steps = 1000
    config.train.batch_size = 64
    config.train.log_every = 50
    config.train.ckpt_every = 1000
    config.optim.name = "adam"
    config.optim.lr = 3e-3
    config.optim.warmup_steps = 50
    config.optim.schedule = "cosine"
    config.optim.final_lr_ratio = 0.05
    config.task = judge_task_config()
    config.task.world.update(BUILD_WORLD)  # 16x16, larger shapes (jharm/shapesworld/world.py)
    return config
