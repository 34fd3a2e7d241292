"""Train the ShapesWorld tiny IP-Adapter (image projection + to_k_ip/to_v_ip) on the frozen T2I UNet.

Needs ``--config.task.clip_dir`` and ``--config.task.t2i_dir``; run by
``jharm shapesworld build`` as its last stage (16x16, the T2I's resolution; 291 s on
2 CPU cores). Shipped: the generated shape matches the image prompt's 0.19 of the time
(gate 0.85): the T2I under it does not draw shapes reliably yet.
"""
from jharm.shapesworld.tasks import ip_task_config
from jharm.train.defaults import base_config


def get_config():
    config = base_config()
    config.train.steps = 400
    config.train.batch_size = 32
    config.train.log_every = 20
    config.train.ckpt_every = 200
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 20
    config.optim.schedule = "cosine"
    config.task = ip_task_config()
    config.task.world.resolution = 16
    return config
