"""Train the ShapesWorld tiny IP-Adapter (image projection + to_k_ip/to_v_ip) on the frozen T2I UNet.

Needs ``--config.task.clip_dir`` and ``--config.task.t2i_dir``; run by
``jharm shapesworld build`` as its last stage (the T2I's world: 16x16, larger shapes;
1200 steps, 659 s on 2 CPU cores). Shipped (2026-12-07): with an image prompt and empty
text the generated shape matches the reference's 0.953 of the time (64 references, DDIM 50;
gate 0.85). On the T2I of 2026-11-29 the same recipe gave 0.81 (0.61 at 400 steps, 0.81 at
2000).
"""
from jharm.shapesworld.tasks import ip_task_config
from jharm.shapesworld.world import BUILD_WORLD
from jharm.train.defaults import base_config


def get_config():
    config = base_config()
    config.train.steps = 1200
    config.train.batch_size = 32
    config.train.log_every = 20
    config.train.ckpt_every = 200
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 20
    config.optim.schedule = "cosine"
    config.task = ip_task_config()
    config.task.world.update(BUILD_WORLD)  # 16x16, larger shapes (jharm/shapesworld/world.py)
    return config
